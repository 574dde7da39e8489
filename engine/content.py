"""Item content embeddings and the cold-start map, as a version stores them (numpy only).

Content embeddings are a sentence encoder's vectors of each catalogue item's text (attnrec.export.content
makes them at export time): a float32 (n_items + 1, dim) array in token layout, row r + 1 for
catalogue row r and row 0 the padding/unknown row; an item without text has a zero row, every other
row has unit length.

The cold-start map is a ridge regression from content to the encoder's item vectors, fitted on the
warm items (attnrec.export.cold_start). Items with text but no training interactions (the "cold"
rows) got `content @ W + b` as their item vector before the encoder and the index were exported, so
serving retrieves them with no step of its own; the map stays in the version to say how, and to map
items that arrive later.

On disk: `content/item_content.npy`, `content/cold_map.npy` ((content dim + 1, dim): W, then b as
the last row) and `content/cold_rows.npy`, each with its sha256 in the manifest's `content` section
(engine/repository.py), checked again on load; nothing is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .repository import ArtifactError, ColdStartSection, ContentSection, FileEntry, Manifest, sha256_file

FOLDER = "content"
EMBEDDINGS = f"{FOLDER}/item_content.npy"
COLD_MAP = f"{FOLDER}/cold_map.npy"
COLD_ROWS = f"{FOLDER}/cold_rows.npy"
_UNIT = 1e-3  # how far from 1 a stored row's norm may be (float32 sums of 384 squares)


@dataclass(frozen=True, eq=False)
class ItemContent:
    """Content vectors of the catalogue in token layout (module docstring)."""

    vectors: np.ndarray  # (n_items + 1, dim) float32; row 0 and rows without text are zero
    columns: tuple[str, ...]  # the text columns that were embedded
    encoder: str  # which sentence encoder made them

    def __post_init__(self) -> None:
        v = self.vectors
        if v.dtype != np.float32 or v.ndim != 2 or len(v) < 1:
            raise ValueError(f"content vectors must be float32 (rows, dim), got {v.dtype} {v.shape}")
        norms = np.linalg.norm(v, axis=1)
        if norms[0] != 0:
            raise ValueError("content row 0 (padding) must be zero")
        if not np.all((norms == 0) | (np.abs(norms - 1) < _UNIT)):
            raise ValueError("content rows must have unit length (or be zero: no text)")

    @property
    def rows(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def has_text(self) -> np.ndarray:
        """(n_items,) bool per catalogue row: it has a content vector."""
        return self.vectors[1:].any(axis=1)


@dataclass(frozen=True, eq=False)
class ColdStartMap:
    """content (n, content dim) → item vectors (n, dim): `content @ weights + bias` (a ridge fit whose
    output was scaled by `norm_scale`, already folded into weights and bias)."""

    weights: np.ndarray  # (content dim, dim) float32
    bias: np.ndarray  # (dim,) float32
    cold_rows: np.ndarray  # (n,) int64 catalogue rows whose item vector is their mapped content
    ridge_lambda: float
    norm_scale: float
    fit_items: int
    min_interactions: int
    valid_cosine: float
    valid_r2: float

    def __post_init__(self) -> None:
        if self.weights.ndim != 2 or self.bias.shape != (self.weights.shape[1],):
            raise ValueError(f"cold-start map: weights {self.weights.shape} and bias {self.bias.shape} do not fit")
        if self.cold_rows.dtype != np.int64 or self.cold_rows.ndim != 1:
            raise ValueError(f"cold rows must be int64 (n,), got {self.cold_rows.dtype} {self.cold_rows.shape}")

    def map(self, content: np.ndarray) -> np.ndarray:
        """(n, content dim) content vectors → (n, dim) float32 item vectors."""
        return (np.asarray(content, dtype=np.float32) @ self.weights + self.bias).astype(np.float32)


# ── storage ─────────────────────────────────────────────────────────────────────────────────────
def write_content(version_dir: Path, content: ItemContent, cold_start: ColdStartMap | None = None) -> ContentSection:
    """Write the arrays under `version_dir/content/` and return the manifest's `content` section."""
    root = Path(version_dir)
    (root / FOLDER).mkdir(exist_ok=True)
    section = None
    if cold_start is not None:
        packed = np.vstack([cold_start.weights, cold_start.bias[None, :]]).astype(np.float32)
        section = ColdStartSection(
            weights=_save(root, COLD_MAP, packed),
            cold_rows=_save(root, COLD_ROWS, cold_start.cold_rows),
            ridge_lambda=float(cold_start.ridge_lambda),
            norm_scale=float(cold_start.norm_scale),
            fit_items=int(cold_start.fit_items),
            min_interactions=int(cold_start.min_interactions),
            valid_cosine=float(cold_start.valid_cosine),
            valid_r2=float(cold_start.valid_r2),
        )
    return ContentSection(
        encoder=content.encoder,
        dim=content.dim,
        columns=tuple(content.columns),
        embeddings=_save(root, EMBEDDINGS, content.vectors),
        rows=content.rows,
        with_text=int(content.has_text.sum()),
        cold_start=section,
    )


def _save(root: Path, rel: str, array: np.ndarray) -> FileEntry:
    path = root / rel
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return FileEntry(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size)


def load_content(version_dir: Path | str, manifest: Manifest) -> ItemContent | None:
    """The version's content embeddings, checked against their sha256 (also when the manifest was
    opened without verification); None for a version without them."""
    section = manifest.content
    if section is None:
        return None
    root = Path(version_dir)
    vectors = _load(root, section.embeddings)
    if vectors.shape != (manifest.model.n_items + 1, section.dim) or section.rows != len(vectors):
        raise ArtifactError(
            f"{root / section.embeddings.path}: shape {vectors.shape}, the manifest says "
            f"({manifest.model.n_items} + 1 catalogue rows, {section.dim})"
        )
    try:
        return ItemContent(vectors, tuple(section.columns), section.encoder)
    except ValueError as exc:
        raise ArtifactError(f"{root / section.embeddings.path}: {exc}") from None


def load_cold_start(version_dir: Path | str, manifest: Manifest) -> ColdStartMap | None:
    """The version's cold-start map, checked like `load_content`; None without one."""
    if manifest.content is None or manifest.content.cold_start is None:
        return None
    root, content, section = Path(version_dir), manifest.content, manifest.content.cold_start
    packed = _load(root, section.weights)
    if packed.shape != (content.dim + 1, manifest.model.dim) or packed.dtype != np.float32:
        raise ArtifactError(
            f"{root / section.weights.path}: {packed.dtype} {packed.shape}, expected float32 "
            f"({content.dim} + 1, {manifest.model.dim})"
        )
    rows = _load(root, section.cold_rows)
    if rows.dtype != np.int64 or rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= content.rows - 1)):
        raise ArtifactError(f"{root / section.cold_rows.path}: expected int64 catalogue rows 0..{content.rows - 2}")
    return ColdStartMap(
        weights=packed[:-1],
        bias=packed[-1],
        cold_rows=rows,
        ridge_lambda=section.ridge_lambda,
        norm_scale=section.norm_scale,
        fit_items=section.fit_items,
        min_interactions=section.min_interactions,
        valid_cosine=section.valid_cosine,
        valid_r2=section.valid_r2,
    )


def _load(root: Path, entry: FileEntry) -> np.ndarray:
    path = root / entry.path
    if not path.is_file():
        raise ArtifactError(f"{root}: content file {entry.path} is missing")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ArtifactError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{path}: not a numpy array ({exc})") from None
