"""Read interaction logs from CSV, TSV, Parquet, MovieLens, RecBole `.inter`, SASRec and S3-Rec text files.

Every reader returns an `InteractionLog` or fails with a `DataError` that names the file, the
1-based line (or Parquet row) and what was wrong: a malformed row is never dropped silently.
Parsing is done by pyarrow, column-wise; Python loops run only to locate an error.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .log import DataError, InteractionLog

log = logging.getLogger(__name__)

FORMATS = ("auto", "csv", "tsv", "parquet", "movielens", "recbole", "sasrec", "s3rec")

# Column names tried, in order, when the caller names none. Matched exactly, then ignoring case.
USER_NAMES = ("user_id", "userId", "user", "uid")
ITEM_NAMES = ("item_id", "itemId", "movieId", "item", "iid")
TIME_NAMES = ("timestamp", "time", "ts", "datetime")

# Canonical integers only: "007" or "+5" stay strings, so an id always reads back as written.
_INT_RE = r"^-?(0|[1-9][0-9]*)$"

Where = Callable[[int], str]  # row index (0-based) -> "line 7" / "row 7", for messages


def read_interactions(
    path: str | Path,
    fmt: str = "auto",
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
) -> InteractionLog:
    """Read an interaction log; `fmt` is one of FORMATS ("auto" guesses from the name and content).

    Column names apply to csv, tsv, parquet, recbole and MovieLens `ratings.csv`; when not
    given they are found among USER_NAMES, ITEM_NAMES and TIME_NAMES.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _check_file(path)
    if fmt == "auto":
        fmt = detect_format(path)
    cols = {"user_col": user_col, "item_col": item_col, "time_col": time_col}
    if fmt == "csv":
        return _read_with_header(path, ",", quoted=True, **cols)
    if fmt == "tsv":
        return _read_with_header(path, "\t", quoted=True, **cols)
    if fmt == "parquet":
        return _read_parquet(path, **cols)
    if fmt == "recbole":
        return _read_recbole(path, **cols)
    if fmt == "movielens":
        return _read_movielens(path, **cols)
    _no_columns(fmt, cols)
    return _read_sasrec(path) if fmt == "sasrec" else _read_user_sequences(path)


def detect_format(path: Path) -> str:
    """Guess a file's format from its name, or for `.txt` from its first lines."""
    name = path.name.lower()
    if name in ("u.data", "ratings.dat", "ratings.csv"):
        return "movielens"
    suffix = path.suffix.lower()
    by_suffix = {".parquet": "parquet", ".pq": "parquet", ".inter": "recbole", ".csv": "csv", ".tsv": "tsv"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix == ".txt":
        first = _first_lines(path, _SNIFF_LINES)
        if any(len(line.split()) > 2 for line in first):
            return "s3rec"
        if _looks_like_sasrec(first):
            return "sasrec"
    raise DataError(
        f"{path}: cannot tell the format from the name or content; pass fmt= one of {', '.join(FORMATS[1:])}"
    )


# ---------------------------------------------------------------------------------------------
# Formats


def _read_with_header(
    path, delimiter, *, quoted, user_col, item_col, time_col, defaults=(USER_NAMES, ITEM_NAMES, TIME_NAMES)
) -> InteractionLog:
    """CSV/TSV with a header line naming the columns."""
    header = _header(path, delimiter, quoted)
    return _read_named_columns(path, header, delimiter, quoted, user_col, item_col, time_col, defaults)


def _read_recbole(path, *, user_col, item_col, time_col) -> InteractionLog:
    """RecBole atomic file: tab separated, header fields typed as `name:type`."""
    typed = _header(path, "\t", quoted=False)
    untyped = [f for f in typed if ":" not in f]
    if untyped:
        raise DataError(
            f"{path}: line 1: header field {untyped[0]!r} has no ':type' (RecBole headers look like 'user_id:token')"
        )
    names = [f.split(":", 1)[0] for f in typed]
    return _read_named_columns(
        path, names, "\t", False, user_col, item_col, time_col, (("user_id",), ("item_id",), ("timestamp",))
    )


def _read_named_columns(path, header, delimiter, quoted, user_col, item_col, time_col, defaults):
    user = _pick_column(path, header, user_col, defaults[0], "user")
    item = _pick_column(path, header, item_col, defaults[1], "item")
    time = _pick_column(path, header, time_col, defaults[2], "timestamp", required=False)
    wanted = [c for c in (user, item, time) if c is not None]
    table = _read_delimited(path, delimiter, header, skip_rows=1, quoted=quoted, include=wanted)
    where = _line_locator(path, header_rows=1)
    if time is None:
        log.warning(
            "%s: no timestamp column (looked for %s); taking row order as time order", path, ", ".join(defaults[2])
        )
    return _to_log(path, table[user], table[item], table[time] if time else None, where)


def _read_movielens(path, *, user_col, item_col, time_col) -> InteractionLog:
    """ml-100k `u.data`, ml-1m/10m `ratings.dat` or ml-20m/25m/latest `ratings.csv`."""
    layout = _movielens_layout(path)
    if layout == "csv":
        return _read_with_header(
            path,
            ",",
            quoted=True,
            user_col=user_col,
            item_col=item_col,
            time_col=time_col,
            defaults=(("userId",), ("movieId",), ("timestamp",)),
        )
    _no_columns(f"movielens {layout}", {"user_col": user_col, "item_col": item_col, "time_col": time_col})
    where = _line_locator(path, header_rows=0)
    if layout == "u.data":
        names = ["user", "item", "rating", "timestamp"]
        table = _read_delimited(path, "\t", names, include=["user", "item", "timestamp"])
        return _to_log(path, table["user"], table["item"], table["timestamp"], where)
    # ratings.dat separates by "::"; pyarrow takes one-character delimiters, so split on ":" and
    # require the fields between the two colons of each separator to be empty.
    names = ["user", "_1", "item", "_2", "rating", "_3", "timestamp"]
    table = _read_delimited(path, ":", names, include=names, count_fields=lambda t: len(t.split("::")), expected=4)
    for sep in ("_1", "_2", "_3"):
        bad = pc.not_equal(pc.utf8_length(table[sep].combine_chunks()), 0)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise DataError(f"{path}: {where(i)}: fields must be separated by '::', found a single ':'")
    return _to_log(path, table["user"], table["item"], table["timestamp"], where)


def _read_sasrec(path) -> InteractionLog:
    """`user item` per line, whitespace separated, lines in time order."""
    # One column per line: \x1f (unit separator) does not occur in such files.
    table = _read_delimited(path, "\x1f", ["line"], count_fields=lambda t: len(t.split()), expected=2)
    where = _line_locator(path, header_rows=0)
    parts = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(table["line"].combine_chunks()))
    bad = pc.not_equal(pc.list_value_length(parts), 2)
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        found = len(str(table["line"][i]).split())
        raise DataError(f"{path}: {where(i)}: expected 2 fields (user item), found {found}")
    user, item = pc.list_element(parts, 0), pc.list_element(parts, 1)
    return _to_log(path, user, item, None, where)


def _read_user_sequences(path) -> InteractionLog:
    """`user item item …` per line (one user per line, items oldest first): the layout of the
    S3-Rec, CL4SRec, ICLRec and DuoRec repositories' data files."""
    table = _read_delimited(path, "\x1f", ["line"])
    line_where = _line_locator(path, header_rows=0)
    parts = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(table["line"].combine_chunks()))
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    short = np.flatnonzero(counts < 2)
    if len(short):
        at = int(short[0])
        raise DataError(f"{path}: {line_where(at)}: expected a user and at least one item, found {counts[at]} fields")
    users = pc.list_element(parts, 0).to_numpy(zero_copy_only=False)
    dup = _first_repeat(users)
    if dup is not None:
        first, again = dup
        raise DataError(
            f"{path}: {line_where(again)}: user {users[again]!r} already has a line ({line_where(first)}); "
            "this format holds one line per user"
        )
    n_items = counts - 1
    line_of = np.repeat(np.arange(len(counts)), n_items)  # the line of each interaction, for messages
    user = pa.array(np.repeat(users, n_items), type=pa.string())
    item = pc.list_flatten(pc.list_slice(parts, 1))
    return _to_log(path, user, item, None, lambda i: line_where(int(line_of[i])))


def _first_repeat(values: np.ndarray) -> tuple[int, int] | None:
    """(first index, index of its first repeat) of the earliest repeated value, or None."""
    _, first_at, inverse = np.unique(values, return_index=True, return_inverse=True)
    repeated = np.flatnonzero(first_at[inverse] != np.arange(len(values)))
    if not len(repeated):
        return None
    again = int(repeated[0])
    return int(first_at[inverse[again]]), again


def _read_parquet(path, *, user_col, item_col, time_col) -> InteractionLog:
    try:
        names = pq.read_schema(path).names
        _no_duplicates(path, names)
        user = _pick_column(path, names, user_col, USER_NAMES, "user")
        item = _pick_column(path, names, item_col, ITEM_NAMES, "item")
        time = _pick_column(path, names, time_col, TIME_NAMES, "timestamp", required=False)
        table = pq.read_table(path, columns=[c for c in (user, item, time) if c is not None])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    if time is None:
        log.warning(
            "%s: no timestamp column (looked for %s); taking row order as time order", path, ", ".join(TIME_NAMES)
        )
    return _to_log(path, table[user], table[item], table[time] if time else None, lambda i: f"row {i + 1}")


# ---------------------------------------------------------------------------------------------
# Columns -> InteractionLog


def _to_log(path, user, item, time, where: Where) -> InteractionLog:
    """Validate and convert arrow columns; `time=None` means row order is time order."""
    n = len(user)
    if n == 0:
        raise DataError(f"{path}: no interactions (the file has no data rows)")
    users = _ids(_single(user), path, "user", where)
    items = _ids(_single(item), path, "item", where)
    times = np.arange(n, dtype=np.float64) if time is None else _timestamps(_single(time), path, where)
    return InteractionLog(users, items, times, str(path), timed=time is not None)


def _ids(arr: pa.Array, path, what, where: Where) -> np.ndarray:
    """int64 when every id is a canonical integer, else a numpy str array."""
    if arr.null_count:
        raise DataError(f"{path}: {where(pc.index(pc.is_null(arr), True).as_py())}: empty {what} id")
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.int64()).to_numpy()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise DataError(f"{path}: {what} column has type {arr.type}; expected integers or strings")
    arr = pc.utf8_trim_whitespace(arr)
    empty = pc.equal(pc.utf8_length(arr), 0)
    if pc.any(empty).as_py():
        raise DataError(f"{path}: {where(pc.index(empty, True).as_py())}: empty {what} id")
    if pc.all(pc.match_substring_regex(arr, _INT_RE)).as_py():
        try:
            return pc.cast(arr, pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            pass  # beyond int64: keep them as strings
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=str)


def _timestamps(arr: pa.Array, path, where: Where) -> np.ndarray:
    """float64 seconds from numbers, timestamps, dates or strings (numbers or ISO 8601)."""
    if arr.null_count:
        raise DataError(f"{path}: {where(pc.index(pc.is_null(arr), True).as_py())}: empty timestamp")
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        out = arr.cast(pa.float64()).to_numpy()
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        out = _datetime_seconds(arr)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        out = _parse_time_strings(pc.utf8_trim_whitespace(arr), path, where)
    else:
        raise DataError(f"{path}: timestamp column has type {t}; expected numbers, date-times or strings")
    finite = np.isfinite(out)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{path}: {where(i)}: unparsable timestamp {arr[i].as_py()!r} (not finite)")
    return out


def _as_float(a):
    return pc.cast(a, pa.float64()).to_numpy()


def _as_utc_datetime(a):  # ISO 8601 with a zone: "2020-01-01T10:00:00+02:00", "...Z"
    return _datetime_seconds(pc.cast(a, pa.timestamp("us", tz="UTC")))


def _as_naive_datetime(a):  # ISO 8601 without a zone, taken as UTC: "2020-01-01 10:00:00"
    return _datetime_seconds(pc.cast(a, pa.timestamp("us")))


_TIME_PARSERS = (_as_float, _as_utc_datetime, _as_naive_datetime)


def _parse_time_strings(arr: pa.Array, path, where: Where) -> np.ndarray:
    for parse in _TIME_PARSERS:
        try:
            return parse(arr)
        except pa.ArrowInvalid:
            continue
    # No parser takes the whole column: the first row decides the kind, the first misfit is the error.
    first_ok = [p for p in _TIME_PARSERS if _parses(p, arr.slice(0, 1))]
    i = _first_failure(arr, first_ok[0]) if first_ok else 0
    raise DataError(
        f"{path}: {where(i)}: unparsable timestamp {arr[i].as_py()!r} "
        f"(expected seconds or an ISO 8601 date-time{', like the first row' if first_ok else ''})"
    )


def _parses(parse, a) -> bool:
    try:
        parse(a)
        return True
    except pa.ArrowInvalid:
        return False


def _first_failure(arr: pa.Array, parse, step: int = 1 << 16) -> int:
    """Index of the first value `parse` rejects: chunk-wise, then value by value in the bad chunk."""
    for start in range(0, len(arr), step):
        chunk = arr.slice(start, step)
        if not _parses(parse, chunk):
            return start + next(j for j in range(len(chunk)) if not _parses(parse, chunk.slice(j, 1)))
    return 0


def _datetime_seconds(arr: pa.Array) -> np.ndarray:
    if pa.types.is_date(arr.type):
        arr = arr.cast(pa.timestamp("s"))
    per_second = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[arr.type.unit]
    return arr.cast(pa.int64()).to_numpy().astype(np.float64) / per_second


def _single(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


# ---------------------------------------------------------------------------------------------
# Delimited text


@dataclass
class _BadRow:
    ordinal: int  # 1-based among non-empty lines, as pyarrow counts them
    text: str
    expected: int
    actual: int


def _read_delimited(
    path,
    delimiter,
    names,
    *,
    skip_rows=0,
    quoted=False,
    include=None,
    count_fields: Callable[[str], int] | None = None,
    expected: int | None = None,
) -> pa.Table:
    """Read a delimited file with all wanted columns as strings; a row of the wrong width fails.

    `count_fields`/`expected` describe a row's width in the file's own terms for the message
    (e.g. '::'-separated fields where pyarrow splits on ':').
    """
    bad: list[_BadRow] = []

    def on_invalid(row) -> str:
        bad.append(_BadRow(row.number, row.text, row.expected_columns, row.actual_columns))
        return "error"  # an exception raised here would be swallowed by pyarrow

    include = include or names
    try:
        return pacsv.read_csv(
            path,
            # Single-threaded so pyarrow numbers the rows; blank lines are skipped (they hold no data).
            read_options=pacsv.ReadOptions(
                use_threads=False, column_names=names, skip_rows=skip_rows, block_size=1 << 24
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quoted else False, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in include}, include_columns=include
            ),
        )
    except pa.ArrowInvalid as e:
        if not bad:
            raise DataError(f"{path}: {e}") from e
        row = bad[0]
        found = count_fields(row.text) if count_fields else row.actual
        want = expected if expected is not None else row.expected
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        line = _physical_line(path, row.ordinal)
        raise DataError(f"{path}: line {line}: expected {want} fields, found {found}: {text!r}") from None


def _header(path, delimiter, quoted) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
    if not first.strip():
        raise DataError(f"{path}: line 1: expected a header line naming the columns, found an empty line")
    fields = next(
        csv.reader([first.rstrip("\r\n")], delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    )
    names = [f.strip() for f in fields]
    _no_duplicates(path, names)
    return names


def _no_duplicates(path, names) -> None:
    """A column named twice is refused: which one is meant would be a guess."""
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(f"{path}: line 1: column {name!r} appears twice in the header (field {i + 1})")
        seen.add(name)


def _pick_column(path, names, given, candidates, what, required=True) -> str | None:
    """The caller's column, else the first candidate present (exactly, then ignoring case)."""
    if given is not None:
        if given not in names:
            raise DataError(f"{path}: line 1: missing required {what} column {given!r}; the header has {names}")
        return given
    for cand in candidates:
        if cand in names:
            return cand
    lower = {n.lower(): n for n in names}
    for cand in candidates:
        if cand.lower() in lower:
            return lower[cand.lower()]
    if required:
        raise DataError(
            f"{path}: line 1: no {what} column (looked for {', '.join(candidates)}); "
            f"the header has {names}; pass {what.split()[0]}_col="
        )
    return None


def _line_locator(path, header_rows: int) -> Where:
    return lambda i: f"line {_physical_line(path, header_rows + i + 1)}"


def _physical_line(path, ordinal: int) -> int:
    """The file line holding the `ordinal`-th non-empty line (pyarrow skips blank lines).

    Called only to report an error, so a plain scan is fine.
    """
    seen = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.rstrip(b"\r\n"):
                seen += 1
                if seen == ordinal:
                    return lineno
    return ordinal


# ---------------------------------------------------------------------------------------------
# Detection helpers


def _movielens_layout(path: Path) -> str:
    name = path.name.lower()
    if name == "u.data" or re.fullmatch(r"u[0-9a-z]*\.(base|test)", name):
        return "u.data"
    if name.endswith(".dat"):
        return "dat"
    if name.endswith(".csv"):
        return "csv"
    first = _first_lines(path, 1)
    if first and "::" in first[0]:
        return "dat"
    if first and len(first[0].split("\t")) == 4:
        return "u.data"
    if first and first[0].startswith("userId,"):
        return "csv"
    raise DataError(f"{path}: line 1: not a MovieLens ratings file (u.data, ratings.dat or ratings.csv)")


_SNIFF_LINES = 20  # a `.txt` file's first lines that decide between sasrec and s3rec


def _looks_like_sasrec(first: list[str]) -> bool:
    # The first line decides; a later malformed line is then reported by the reader, with its number.
    return bool(first) and re.fullmatch(r"\s*\d+\s+\d+\s*", first[0]) is not None


def _first_lines(path: Path, n: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip("\r\n"):
                out.append(line.rstrip("\r\n"))
                if len(out) == n:
                    break
    return out


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"interaction file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (no interactions)")


def _no_columns(fmt: str, cols: dict) -> None:
    given = [k for k, v in cols.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} not accepted for {fmt} files: their columns are fixed")
