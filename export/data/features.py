"""Read side-feature files (`--item-features`, `--user-features`) and encode them against a training split.

Formats, detected from the file: RecBole atomic (`.item`, `.user`, or any file whose first line is a
tab-separated `name:type` header), Parquet (`.parquet`, `.pq`), TSV (`.tsv`, or a first line with
tabs and no comma) and CSV (anything else; `"` quotes fields). One row per id; a duplicate id, a
missing id column or a malformed line stops the run with the file and the line.

Each column gets one role, by the first rule that applies (`--feature-columns NAME=ROLE,...`
overrides any of them; roles are `id`, `categorical`, `multi`, `numeric`, `text`, `drop`):

1. the id column: for items `item_id`, `itemId`, `movieId`, `item`, `iid`; for users `user_id`,
   `userId`, `user`, `uid` (exactly, then ignoring case) -> `id`;
2. a name with a word in TEXT_WORDS (`movie_title`, `description`, `name`, ...) -> `text`;
3. RecBole `float` -> `numeric`; RecBole `float_seq` (vectors) -> `drop`, with a warning;
4. RecBole `token_seq`, a Parquet list column, or a CSV/TSV/Parquet string column with a `|` in
   some value -> `multi` (several values per row);
5. a name with a word in CODE_WORDS (`category_id`, `zip_code`, ...) -> `categorical`;
6. at least NUMERIC_MIN_SHARE (99%) of the values plain numbers (no leading zero: "01002" is a
   code) and more than NUMERIC_MIN_DISTINCT distinct ones -> `numeric` (few distinct numbers,
   like a 1-5 rating, behave as categories);
7. otherwise -> `categorical`.

Multi-valued values are separated by whitespace in RecBole files (token_seq) and by `|` in CSV,
TSV and Parquet string columns (MovieLens' `Action|Comedy`); Parquet lists are taken as they are.
An empty field is a missing value; so is a value of a numeric column that is not a number (ml-100k
has two release years "unkonwn" and "V"): counted and logged with its line.

Encoding (attnrec.engine.features holds the result): array row r + 1 is catalogue row r (the
encoder's token) or training user r, row 0 the unknown row. Ids of the interactions that the file
lacks get the unknown row's values (counted and logged, never an error); file rows whose id is not
in the interactions are not used. A categorical value on fewer than MIN_COUNT rows (1 for items, 2
for users) becomes unknown.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attnrec.engine.features import CodedColumn, FeatureTable, FeatureTables, TextColumn
from attnrec.engine.repository import sha256_file

from .log import DataError
from .readers import (
    ITEM_NAMES,
    USER_NAMES,
    Where,
    _first_repeat,
    _header,
    _ids,
    _line_locator,
    _pick_column,
    _read_delimited,
    _single,
)

log = logging.getLogger(__name__)

ROLES = ("id", "categorical", "multi", "numeric", "text", "drop")
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
TEXT_WORDS = frozenset({"title", "name", "description", "desc", "summary", "overview", "plot", "abstract", "text"})
CODE_WORDS = frozenset({"id", "code", "zip", "zipcode", "postcode"})
NUMERIC_MIN_DISTINCT = 20
NUMERIC_MIN_SHARE = 0.99  # real files hold the odd "unknown" in a number column
# A categorical value on fewer rows becomes unknown. Items keep every value: business filters
# (include/exclude_attributes) must match a one-item brand too, and the ranker's per-item embedding
# already carries what a one-item value could. A user value seen once (a zip code) is an id in
# disguise that teaches nothing that transfers to another user.
MIN_COUNT = {"item": 1, "user": 2}
# Numbers become quantile buckets, not standardised floats: every non-text feature is then one kind
# of input (a code for an embedding), heavy tails (price) and non-linear effects (release year) need
# no care, and a missing value is code 0 like every other unknown.
NUMERIC_BUCKETS = 10
MULTI_DELIMITER = "|"

_PLAIN_NUMBER = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$"  # what rule 6 takes as a number
_ANY_NUMBER = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"  # what `=numeric` accepts
_TYPED_FIELD = re.compile(rf"^[^:]+:({'|'.join(RECBOLE_TYPES)})$")


@dataclass(frozen=True, eq=False)
class FileColumn:
    """One column of a feature file with its role, as numpy: categorical and text values are str
    ("" = missing), numeric float64 (NaN = missing); multi values are flat, row i's being
    `values[offsets[i]:offsets[i + 1]]`."""

    name: str
    role: str
    rule: str  # why it has this role, for the summary
    values: np.ndarray
    offsets: np.ndarray | None = None  # multi only: (n + 1,) int64


@dataclass(frozen=True, eq=False)
class FeatureFile:
    """A feature file as read: one row per id (ids as str, in file order)."""

    path: Path
    format: str
    sha256: str
    id_column: str
    ids: np.ndarray  # (n,) str
    columns: tuple[FileColumn, ...]
    header: tuple[str, ...]
    where: Where


def parse_column_roles(spec: str) -> dict[str, str]:
    """`movie_title=text,release_year=numeric,zip_code=drop` -> {column: role}."""
    roles: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, role = part.rpartition("=")
        name, role = name.strip(), role.strip()
        if not eq or not name:
            raise ValueError(f"expected COLUMN=ROLE, found {part!r}")
        if role not in ROLES:
            raise ValueError(f"{part!r}: role {role!r} is not one of {', '.join(ROLES)}")
        if name in roles and roles[name] != role:
            raise ValueError(f"column {name!r} is given two roles ({roles[name]}, {role})")
        roles[name] = role
    return roles


# ── reading ─────────────────────────────────────────────────────────────────────────────────────
def detect_feature_format(path: Path) -> str:
    """recbole, csv, tsv or parquet (the module docstring says how)."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline().rstrip("\r\n")
    fields = first.split("\t")
    if suffix in (".item", ".user") or all(_TYPED_FIELD.match(x.strip()) for x in fields):
        return "recbole"
    if suffix == ".tsv" or ("\t" in first and "," not in first):
        return "tsv"
    return "csv"


def read_feature_file(path: str | Path, *, kind: str, roles: Mapping[str, str] | None = None) -> FeatureFile:
    """Read an item or user feature file and give each column its role (module docstring)."""
    if kind not in ("item", "user"):
        raise ValueError(f"kind must be item or user, got {kind!r}")
    path, roles = Path(path), dict(roles or {})
    if not path.is_file():
        raise DataError(f"{path}: {kind} feature file not found" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (no {kind} features)")
    fmt = detect_feature_format(path)
    declared: dict[str, str] = {}
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
        names, where = table.column_names, (lambda i: f"row {i + 1}")
        _unique_header(path, names)
        arrays = {n: _single(table[n]) for n in names}
    else:
        delimiter = "," if fmt == "csv" else "\t"
        names = _header(path, delimiter, quoted=fmt == "csv")
        if fmt == "recbole":
            for i, f in enumerate(names):
                if not _TYPED_FIELD.match(f):
                    raise DataError(
                        f"{path}: line 1: header field {i + 1} {f!r} is not 'name:type' with a RecBole type "
                        f"({', '.join(RECBOLE_TYPES)})"
                    )
            declared = dict(f.rsplit(":", 1) for f in names)
            names = [f.rsplit(":", 1)[0] for f in names]
        _unique_header(path, names)
        table = _read_delimited(path, delimiter, names, skip_rows=1, quoted=fmt == "csv")
        where = _line_locator(path, header_rows=1)
        arrays = {n: _single(table[n]) for n in names}
    n = len(next(iter(arrays.values()))) if arrays else 0
    if n == 0:
        raise DataError(f"{path}: no data rows (the file has a header only)")

    given_id = [c for c, r in roles.items() if r == "id" and c in names]
    if len(given_id) > 1:
        raise DataError(f"{path}: two id columns given ({', '.join(given_id)})")
    defaults = ITEM_NAMES if kind == "item" else USER_NAMES
    id_col = _pick_column(path, names, given_id[0] if given_id else None, defaults, f"{kind} id")
    ids = _ids(arrays[id_col], path, kind, where).astype(str)  # matched as strings, as the server maps ids
    dup = _first_repeat(ids)
    if dup is not None:
        first, again = dup
        raise DataError(f"{path}: {where(again)}: {kind} {str(ids[again])!r} already has a row ({where(first)})")
    columns = []
    for name in names:
        if name == id_col:
            continue
        role, rule = (roles[name], "given") if name in roles else _auto_role(name, arrays[name], declared.get(name))
        if role == "id":
            raise DataError(f"{path}: column {name!r} given as id, but the id column is {id_col!r}")
        if role == "drop":
            if rule != "given":
                log.warning("%s: column %r (%s) is not used: %s", path, name, declared.get(name), rule)
            continue
        columns.append(_column(path, where, name, role, rule, arrays[name], declared.get(name)))
    return FeatureFile(path, fmt, sha256_file(path), id_col, ids, tuple(columns), tuple(names), where)


def _unique_header(path: Path, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: line 1: column {name!r} appears twice in the header")
        seen.add(name)


def _words(name: str) -> set[str]:
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return {w for w in re.split(r"[^a-z0-9]+", snake) if w} | {name.lower()}


def _auto_role(name: str, arr: pa.Array, declared: str | None) -> tuple[str, str]:
    words = _words(name)
    if words & TEXT_WORDS:
        return "text", "text name"
    if declared == "float":
        return "numeric", "float"
    if declared == "float_seq":
        return "drop", "float_seq vectors are not read as features"
    if declared == "token_seq":
        return "multi", "token_seq"
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return "multi", "list column"
    if declared is None and _is_string(arr) and pc.any(pc.match_substring(arr, MULTI_DELIMITER)).as_py():
        return "multi", f"'{MULTI_DELIMITER}'-separated"
    if words & CODE_WORDS:
        return "categorical", "code name"
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        distinct = pc.count_distinct(pc.drop_null(arr)).as_py()
    elif _is_string(arr):
        present = _present_strings(arr)
        numbers = pc.filter(present, pc.match_substring_regex(present, _PLAIN_NUMBER))
        if len(present) == 0 or len(numbers) < NUMERIC_MIN_SHARE * len(present):
            return "categorical", "not numbers"
        distinct = pc.count_distinct(numbers).as_py()
    else:
        return "categorical", str(arr.type)
    if distinct > NUMERIC_MIN_DISTINCT:
        return "numeric", f"numbers, {distinct} distinct"
    return "categorical", f"numbers, {distinct} distinct"


def _is_string(arr: pa.Array) -> bool:
    return pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)


def _present_strings(arr: pa.Array) -> pa.Array:
    trimmed = pc.utf8_trim_whitespace(arr)
    return pc.filter(trimmed, pc.greater(pc.utf8_length(trimmed), 0))


def _as_strings(path, name: str, arr: pa.Array) -> np.ndarray:
    """str per row, trimmed, "" for missing."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not _is_string(arr):
        try:
            arr = pc.cast(arr, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{path}: column {name!r} has type {arr.type}, which is not read as a feature") from e
    arr = pc.fill_null(pc.utf8_trim_whitespace(arr), "")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=str)


def _column(path, where: Where, name, role, rule, arr: pa.Array, declared) -> FileColumn:
    if role in ("categorical", "text"):
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            raise DataError(f"{path}: column {name!r} holds lists; give it role multi")
        return FileColumn(name, role, rule, _as_strings(path, name, arr))
    if role == "numeric":
        return FileColumn(name, role, rule, _numbers(path, where, name, arr))
    # multi
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        parts = arr
    else:
        text = pc.fill_null(pc.utf8_trim_whitespace(arr if _is_string(arr) else pc.cast(arr, pa.string())), "")
        # RecBole's token_seq is space separated; CSV, TSV and Parquet strings use MULTI_DELIMITER.
        parts = pc.utf8_split_whitespace(text) if declared is not None else pc.split_pattern(text, MULTI_DELIMITER)
    flat = _as_strings(path, name, pc.list_flatten(parts))
    parent = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = flat != ""  # "a||b", a null list item
    counts = np.bincount(parent[keep], minlength=len(arr))
    return FileColumn(name, role, rule, flat[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def _numbers(path, where: Where, name, arr: pa.Array) -> np.ndarray:
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        out = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        return np.where(np.isfinite(out), out, np.nan)
    text = _as_strings(path, name, arr)
    number = np.zeros(len(text), dtype=bool)
    present = text != ""
    number[present] = pc.match_substring_regex(pa.array(text[present]), _ANY_NUMBER).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(present & ~number)
    if len(bad):
        log.warning(
            "%s: column %r is numeric; %d values are not numbers and count as missing (first: %s, %r)",
            path,
            name,
            len(bad),
            where(int(bad[0])),
            str(text[bad[0]]),
        )
    out = np.full(len(text), np.nan)
    out[number] = text[number].astype(np.float64)
    return np.where(np.isfinite(out), out, np.nan)


# ── encoding ────────────────────────────────────────────────────────────────────────────────────
def encode_features(
    file: FeatureFile,
    ids: np.ndarray,
    *,
    kind: str,
    min_count: int | None = None,
    buckets: int = NUMERIC_BUCKETS,
) -> FeatureTable:
    """Encode `file` against `ids` (the external ids of catalogue rows, or of training users, in row order).
    `min_count`: rows a categorical value needs to keep its own code (default: MIN_COUNT of the kind)."""
    if min_count is None:
        min_count = MIN_COUNT[kind]
    keys = np.asarray([str(v) for v in np.asarray(ids).tolist()], dtype=str)
    src = _match(file.ids, keys)  # file row of each id, -1 when the file lacks it
    hit = src >= 0
    columns = []
    for col in file.columns:
        if col.role == "text":
            strings = np.full(len(keys) + 1, "", dtype=object)
            strings[1:][hit] = col.values[src[hit]].tolist()
            columns.append(TextColumn(col.name, strings, missing=int((strings[1:][hit] == "").sum())))
        elif col.role == "numeric":
            columns.append(_encode_numeric(col, src, hit, buckets))
        else:
            columns.append(_encode_categorical(col, src, hit, min_count))
    return FeatureTable(
        kind=kind,
        columns=tuple(columns),
        source=str(file.path),
        source_sha256=file.sha256,
        format=file.format,
        id_column=file.id_column,
        matched=int(hit.sum()),
        unknown=int((~hit).sum()),
        unused=int(len(file.ids) - hit.sum()),
        ids=np.concatenate([np.array([""], dtype=object), keys.astype(object)]) if kind == "user" else None,
    )


def _match(file_ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if len(file_ids) == 0 or len(keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    order = np.argsort(file_ids, kind="stable")
    sorted_ids = file_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, keys), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == keys, order[pos], -1).astype(np.int64)


def _encode_numeric(col: FileColumn, src, hit, buckets: int) -> CodedColumn:
    values = np.full(len(src), np.nan)
    values[hit] = col.values[src[hit]]
    present = ~np.isnan(values)
    # Edges from the rows the model sees, not the whole file; repeated quantiles collapse.
    qs = np.linspace(0, 1, buckets + 1)[1:-1]
    edges = np.unique(np.quantile(values[present], qs)) if present.any() else np.zeros(0)
    codes = np.zeros((len(src) + 1, 1), dtype=np.int32)
    codes[1:, 0][present] = 1 + np.searchsorted(edges, values[present], side="right")
    bounds = [-np.inf, *edges.tolist(), np.inf]
    vocab = ("", *(f"[{lo:g}, {hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])))
    return CodedColumn(
        col.name, "numeric", codes, vocab, edges=tuple(edges.tolist()), missing=int((hit & ~present).sum())
    )


def _encode_categorical(col: FileColumn, src, hit, min_count: int) -> CodedColumn:
    n = len(src)
    rows = np.flatnonzero(hit)
    if col.role == "multi":
        # Gather each table row's values from the file's CSR layout, in file order.
        starts = col.offsets[src[hit]]
        counts = col.offsets[src[hit] + 1] - starts
        row = np.repeat(rows, counts)
        values = col.values[np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())]
        missing = int((counts == 0).sum())
    else:
        values = col.values[src[hit]]
        keep = values != ""
        row, values, missing = rows[keep], values[keep], int((~keep).sum())
    uniq, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1)
    # A value named twice on one row counts, and is kept, once (its first place).
    _, once = np.unique(row * max(len(uniq), 1) + inverse, return_index=True)
    once = np.sort(once)
    row, inverse = row[once], inverse[once]
    kept = np.bincount(inverse, minlength=len(uniq)) >= min_count  # rows per value
    code_of = np.zeros(len(uniq), dtype=np.int32)
    code_of[kept] = 1 + np.arange(int(kept.sum()), dtype=np.int32)
    code = code_of[inverse]
    row, code = row[code > 0], code[code > 0]
    per_row = np.bincount(row, minlength=n)
    slot = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    codes = np.zeros((n + 1, max(int(per_row.max(initial=0)), 1)), dtype=np.int32)
    codes[row + 1, slot] = code
    return CodedColumn(
        col.name,
        col.role,
        codes,
        ("", *uniq[kept].tolist()),
        min_count=min_count,
        rare_values=int((~kept).sum()),
        missing=missing,
    )


# ── both files of a training run ────────────────────────────────────────────────────────────────
def summary(table: FeatureTable, file: FeatureFile | None = None) -> str:
    """One line: ids matched and unknown, and each column with its role (and, given the file, why)."""
    what = "catalogue items" if table.kind == "item" else "users"
    rules = {c.name: c.rule for c in file.columns} if file is not None else {}
    cols = []
    for c in table.columns:
        notes = [rules[c.name]] if c.name in rules else []
        if isinstance(c, CodedColumn):
            notes.append(f"{len(c.vocab) - 1} {'buckets' if c.role == 'numeric' else 'values'}")
            if c.role == "multi":
                notes.append(f"up to {c.width} per row")
            if c.rare_values:
                notes.append(f"{c.rare_values} rare -> unknown")
        if c.missing:
            notes.append(f"{c.missing} missing")
        cols.append(f"{c.name}={c.role} ({'; '.join(notes)})" if notes else f"{c.name}={c.role}")
    return (
        f"{table.kind} features {table.source} ({table.format}, id column {table.id_column}): "
        f"{table.matched} of {table.matched + table.unknown} {what} found, {table.unknown} unknown, "
        f"{table.unused} file rows unused; columns: {', '.join(cols) or 'none'}"
    )


def feature_tables(
    item_ids: np.ndarray,
    user_ids: np.ndarray,
    *,
    item_path: str | Path | None = None,
    user_path: str | Path | None = None,
    roles: Mapping[str, str] | None = None,
) -> FeatureTables:
    """Read and encode the item and user feature files of a training run (either may be None) and
    log one summary line per file. `item_ids`: the external id of each catalogue row (the version's
    id map, without padding); `user_ids`: the training split's users. A column named in `roles` must
    be in one of the files."""
    roles = dict(roles or {})
    if roles and item_path is None and user_path is None:
        raise ValueError("--feature-columns needs --item-features or --user-features")
    tables, headers = {}, set()
    for kind, path, ids in (("item", item_path, item_ids), ("user", user_path, user_ids)):
        if path is None:
            continue
        file = read_feature_file(path, kind=kind, roles=roles)
        headers |= set(file.header)
        tables[kind] = table = encode_features(file, ids, kind=kind)
        (log.warning if table.unknown else log.info)("%s", summary(table, file))
    absent = sorted(set(roles) - headers)
    if absent:
        raise DataError(f"--feature-columns names {', '.join(map(repr, absent))}, which no feature file has")
    return FeatureTables(item=tables.get("item"), user=tables.get("user"))
