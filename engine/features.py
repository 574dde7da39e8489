"""Side features of items and users as a version stores them: fixed arrays indexed like the tokens.

Row 0 of every table is the unknown/padding row; catalogue row r is array row r + 1 (the
encoder's token, so `codes[tokens]` needs no shift) and training user u is row u + 1. Coded
columns (categorical, multi-valued categorical, numeric quantile buckets) are int32 arrays
(rows, width) with 0 = unknown or padding; text columns are the raw strings, "" when unknown.

On disk they are `.npy` (codes) and `.json` (vocabularies, strings, user ids) files under the
version's `features/` folder, each with its sha256 in the manifest's `features` section
(engine/repository.py); nothing is pickled. numpy only: serving reads them without torch.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .repository import (
    ArtifactError,
    FeatureColumnSection,
    FeaturesSection,
    FeatureTableSection,
    FileEntry,
    Manifest,
    sha256_file,
)

CODED_ROLES = ("categorical", "multi", "numeric")
TEXT_ROLE = "text"
FOLDER = "features"


@dataclass(frozen=True, eq=False)
class CodedColumn:
    """Categorical, multi-valued categorical or numeric (quantile bucket) codes per row."""

    name: str
    role: str  # one of CODED_ROLES
    codes: np.ndarray  # (rows, width) int32; 0 = unknown / padding
    vocab: tuple[str, ...]  # code -> value (numeric: the bucket's range); [0] = "" is the unknown
    min_count: int | None = None
    rare_values: int = 0
    edges: tuple[float, ...] = ()  # numeric: code = 1 + number of edges <= value
    missing: int = 0

    def __post_init__(self) -> None:
        if self.role not in CODED_ROLES:
            raise ValueError(f"{self.name}: role {self.role!r} is not one of {CODED_ROLES}")
        if self.codes.dtype != np.int32 or self.codes.ndim != 2:
            raise ValueError(
                f"{self.name}: codes must be int32 (rows, width), got {self.codes.dtype} {self.codes.shape}"
            )
        if len(self.codes) and (self.codes.min() < 0 or self.codes.max() >= len(self.vocab)):
            raise ValueError(f"{self.name}: codes outside 0..{len(self.vocab) - 1}")

    @property
    def width(self) -> int:
        return self.codes.shape[1]


@dataclass(frozen=True, eq=False)
class TextColumn:
    """Raw strings per row, for a content encoder; "" when unknown."""

    name: str
    strings: np.ndarray  # (rows,) object array of str
    missing: int = 0
    role: str = TEXT_ROLE


Column = Union[CodedColumn, TextColumn]


@dataclass(frozen=True, eq=False)
class FeatureTable:
    """One feature file encoded against a version's rows (see the module docstring)."""

    kind: str  # "item" or "user"
    columns: tuple[Column, ...]
    source: str
    source_sha256: str
    format: str
    id_column: str
    matched: int
    unknown: int
    unused: int
    ids: np.ndarray | None = None  # user tables: (rows,) str, the external id of each row ([0] = "")

    def __post_init__(self) -> None:
        if self.kind not in ("item", "user"):
            raise ValueError(f"feature table kind must be item or user, got {self.kind!r}")
        lengths = {len(c.codes) if isinstance(c, CodedColumn) else len(c.strings) for c in self.columns}
        if self.ids is not None:
            lengths.add(len(self.ids))
        if len(lengths) > 1:
            raise ValueError(f"{self.kind} features: columns differ in rows ({sorted(lengths)})")
        if self.kind == "user" and self.ids is None:
            raise ValueError("a user feature table needs its ids (users have no id map in the version)")

    @property
    def rows(self) -> int:
        """1 + items (or users): row 0 is the unknown row."""
        if self.columns:
            c = self.columns[0]
            return len(c.codes) if isinstance(c, CodedColumn) else len(c.strings)
        return len(self.ids) if self.ids is not None else 1

    @functools.cached_property
    def _row_of_id(self) -> dict[str, int]:
        return {} if self.ids is None else {k: i for i, k in enumerate(self.ids.tolist()) if i}

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """Array rows of external ids (compared as strings); 0 for an id the table does not hold."""
        return np.array([self._row_of_id.get(str(k), 0) for k in ids], dtype=np.int64)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Column name -> values of `rows` (any shape): codes (*shape, width) int32, text (*shape) str."""
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise ValueError(f"{self.kind} feature rows must be integers, got {rows.dtype}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise ValueError(f"{self.kind} feature rows must lie in 0..{self.rows - 1}, got {rows.min()}..{rows.max()}")
        return {c.name: (c.codes if isinstance(c, CodedColumn) else c.strings)[rows] for c in self.columns}


@dataclass(frozen=True, eq=False)
class FeatureTables:
    """A version's side features; either table may be absent."""

    item: FeatureTable | None = None
    user: FeatureTable | None = None

    def __bool__(self) -> bool:
        return self.item is not None or self.user is not None


def item_features(tables: FeatureTables, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Item features of encoder tokens (row + 1; 0 = padding gets the unknown row); {} without an item table."""
    return {} if tables.item is None else tables.item.take(tokens)


def user_features(tables: FeatureTables, user_ids: list[str]) -> dict[str, np.ndarray]:
    """User features of external user ids, one row each; an id the version does not know gets the
    unknown row (never an error); {} without a user table."""
    if tables.user is None:
        return {}
    return tables.user.take(tables.user.rows_of(user_ids))


# ── storage ─────────────────────────────────────────────────────────────────────────────────────
def write_features(version_dir: Path, tables: FeatureTables) -> FeaturesSection | None:
    """Write the tables under `version_dir/features/` and return their manifest section (None: no tables)."""
    if not tables:
        return None
    (Path(version_dir) / FOLDER).mkdir(exist_ok=True)
    return FeaturesSection(
        item=_write_table(Path(version_dir), tables.item) if tables.item is not None else None,
        user=_write_table(Path(version_dir), tables.user) if tables.user is not None else None,
    )


def _write_table(root: Path, t: FeatureTable) -> FeatureTableSection:
    columns = []
    for i, c in enumerate(t.columns):
        # The index keeps names unique once odd characters are replaced.
        stem = f"{FOLDER}/{t.kind}.{i}.{re.sub(r'[^A-Za-z0-9_-]', '_', c.name)}"
        if isinstance(c, CodedColumn):
            np.save(root / f"{stem}.codes.npy", c.codes, allow_pickle=False)
            columns.append(
                FeatureColumnSection(
                    name=c.name,
                    role=c.role,
                    values=_entry(root, f"{stem}.codes.npy"),
                    vocab=_write_json(root, f"{stem}.vocab.json", list(c.vocab)),
                    width=c.width,
                    n_codes=len(c.vocab),
                    min_count=c.min_count,
                    rare_values=c.rare_values,
                    edges=tuple(float(e) for e in c.edges),
                    missing=c.missing,
                )
            )
        else:
            entry = _write_json(root, f"{stem}.text.json", [str(s) for s in c.strings.tolist()])
            columns.append(FeatureColumnSection(name=c.name, role=TEXT_ROLE, values=entry, missing=c.missing))
    ids = None if t.ids is None else _write_json(root, f"{FOLDER}/{t.kind}.ids.json", [str(s) for s in t.ids.tolist()])
    return FeatureTableSection(
        kind=t.kind,
        source=t.source,
        source_sha256=t.source_sha256,
        format=t.format,
        id_column=t.id_column,
        rows=t.rows,
        matched=t.matched,
        unknown=t.unknown,
        unused=t.unused,
        columns=tuple(columns),
        ids=ids,
    )


def _write_json(root: Path, rel: str, value: list) -> FileEntry:
    (root / rel).write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return _entry(root, rel)


def _entry(root: Path, rel: str) -> FileEntry:
    path = root / rel
    return FileEntry(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size)


def load_features(version_dir: Path | str, manifest: Manifest) -> FeatureTables:
    """The version's feature tables, each file checked against its sha256 (also when the manifest
    was opened without verification); empty tables for a version without features."""
    section = manifest.features
    if section is None:
        return FeatureTables()
    root = Path(version_dir)
    item = _load_table(root, section.item) if section.item is not None else None
    if item is not None and item.rows != manifest.model.n_items + 1:
        raise ArtifactError(f"{root}: item features have {item.rows} rows, the catalogue {manifest.model.n_items} + 1")
    return FeatureTables(item=item, user=_load_table(root, section.user) if section.user is not None else None)


def _load_table(root: Path, s: FeatureTableSection) -> FeatureTable:
    columns: list[Column] = []
    for c in s.columns:
        if c.role == TEXT_ROLE:
            strings = _read_json(root, c.values)
            columns.append(TextColumn(c.name, np.array(strings, dtype=object), missing=c.missing))
            continue
        if c.vocab is None:
            raise ArtifactError(f"{root}: {s.kind} feature {c.name!r} ({c.role}) has no vocabulary file")
        codes = np.load(_verified(root, c.values), allow_pickle=False)
        vocab = tuple(_read_json(root, c.vocab))
        if codes.shape != (s.rows, c.width) or len(vocab) != c.n_codes:
            raise ArtifactError(
                f"{root / c.values.path}: codes {codes.shape} with {len(vocab)} values, the manifest says "
                f"({s.rows}, {c.width}) with {c.n_codes}"
            )
        try:
            columns.append(CodedColumn(c.name, c.role, codes, vocab, c.min_count, c.rare_values, c.edges, c.missing))
        except ValueError as exc:
            raise ArtifactError(f"{root / c.values.path}: {exc}") from None
    ids = None if s.ids is None else np.array(_read_json(root, s.ids), dtype=object)
    try:
        return FeatureTable(
            s.kind,
            tuple(columns),
            s.source,
            s.source_sha256,
            s.format,
            s.id_column,
            s.matched,
            s.unknown,
            s.unused,
            ids,
        )
    except ValueError as exc:
        raise ArtifactError(f"{root}: {exc}") from None


def _read_json(root: Path, entry: FileEntry) -> list:
    value = json.loads(_verified(root, entry).read_text(encoding="utf-8"))
    if not isinstance(value, list):
        raise ArtifactError(f"{root / entry.path}: expected a JSON list")
    return value


def _verified(root: Path, entry: FileEntry) -> Path:
    path = root / entry.path
    if not path.is_file():
        raise ArtifactError(f"{root}: feature file {entry.path} is missing")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ArtifactError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    return path
