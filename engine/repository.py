"""The model repository: the one contract between the offline and the online half.

Layout::

    <repo>/<name>/<version>/manifest.json     version = 1, 2, 3, ... (newest = largest)
                            encoder.onnx      history tokens -> query vector [+ hidden states]
                            ranker.onnx       (optional) history x candidates -> scores
                            item_embeddings.npy, items.faiss, item_ids.json, item_popularity.npy

Catalogue rows 0..n_items-1 index every per-item file; the encoder's input token of row r is
r + 1 (token 0 is padding). A version is written in a hidden staging folder and renamed into
place when complete, so a reader never sees half a version. Every file's sha256 is in the
manifest; `open_version` refuses a version whose files do not match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_STAGING_PREFIX = ".staging-"


class ArtifactError(Exception):
    """A model version is missing, malformed or does not match its checksums."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the version folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What a version holds. Roles in `files`: encoder, item_embeddings, index, item_ids, item_popularity,
    and ranker when the version has a second stage (then the `ranker` section describes it)."""

    name: str
    version: int
    created_at: str
    model: dict[str, Any]  # type, dim, max_len, n_items, n_blocks, n_heads, ...
    files: dict[str, FileEntry]  # role -> file
    encoder: dict[str, Any]  # inputs/outputs, opset, parity check
    index: dict[str, Any]  # factory, metric, search params, measured recall and latency
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation at export time
    training: dict[str, Any] = field(default_factory=dict)  # config, seed, epochs, wall time
    data: dict[str, Any] = field(default_factory=dict)  # source, counts
    ranker: dict[str, Any] = field(default_factory=dict)  # inputs, n_candidates, features, parity; {} = none
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "Manifest":
        try:
            if raw.get("schema_version") != SCHEMA_VERSION:
                found = raw.get("schema_version")
                raise ArtifactError(f"{where}: manifest schema version {found!r}, this attnrec reads {SCHEMA_VERSION}")
            files = {role: FileEntry(**entry) for role, entry in raw["files"].items()}
            return cls(**{**raw, "files": files})
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{where}: malformed manifest ({exc})") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_dir(repo: Path | str, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name!r}")
    return Path(repo) / name


def list_versions(repo: Path | str, name: str) -> list[int]:
    """Version numbers present (complete or not), ascending."""
    d = model_dir(repo, name)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def open_version(path: Path | str, *, verify: bool = True) -> Manifest:
    """Read a version's manifest; with `verify`, check every file's size and sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        raw = json.loads(mpath.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no {MANIFEST}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath}: not valid JSON ({exc})") from exc
    manifest = Manifest.from_dict(raw, str(mpath))
    if verify:
        for role, entry in manifest.files.items():
            fpath = path / entry.path
            if not fpath.is_file():
                raise ArtifactError(f"{path}: {role} file {entry.path} is missing")
            size = fpath.stat().st_size
            if size != entry.bytes:
                raise ArtifactError(f"{fpath}: size {size} bytes, manifest says {entry.bytes}")
            digest = sha256_file(fpath)
            if digest != entry.sha256:
                raise ArtifactError(
                    f"{fpath}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…"
                )
    return manifest


def newest_valid_version(repo: Path | str, name: str, *, verify: bool = True) -> tuple[Path, Manifest]:
    """The newest version that opens cleanly; broken newer ones are skipped with a warning."""
    versions = list_versions(repo, name)
    if not versions:
        raise ArtifactError(f"no versions of model {name!r} in {repo}")
    errors = []
    for v in reversed(versions):
        path = model_dir(repo, name) / str(v)
        try:
            return path, open_version(path, verify=verify)
        except ArtifactError as exc:
            log.warning("skipping %s: %s", path, exc)
            errors.append(str(exc))
    raise ArtifactError(f"no valid version of model {name!r} in {repo}: " + "; ".join(errors))


def resolve_version(repo: Path | str, name: str, version: int | None = None) -> tuple[Path, Manifest]:
    if version is None:
        return newest_valid_version(repo, name)
    path = model_dir(repo, name) / str(version)
    return path, open_version(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionWriter:
    """Stage a new version's files, then publish them atomically under the next version number.

        with VersionWriter(repo, name) as w:
            onnx.save(model, w.path / "encoder.onnx")
            ...
            version_dir = w.commit(files={"encoder": "encoder.onnx", ...}, model=..., ...)

    Leaving the block without `commit` (an exception included) removes the staging folder.
    """

    def __init__(self, repo: Path | str, name: str) -> None:
        self.root = model_dir(repo, name)
        self.name = name
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        self.path.mkdir()
        self.published: Path | None = None

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.published is None:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, *, files: dict[str, str], **sections: Any) -> Path:
        entries = {}
        for role, rel in files.items():
            fpath = self.path / rel
            with open(fpath, "rb") as f:
                os.fsync(f.fileno())
            entries[role] = FileEntry(path=rel, sha256=sha256_file(fpath), bytes=fpath.stat().st_size)
        # Try successive numbers: a concurrent writer may publish the same one first.
        for _ in range(1000):
            version = (list_versions(self.root.parent, self.name) or [0])[-1] + 1
            manifest = Manifest(
                name=self.name,
                version=version,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                files=entries,
                **sections,
            )
            tmp = self.path / (MANIFEST + ".tmp")
            tmp.write_text(manifest.to_json())
            os.replace(tmp, self.path / MANIFEST)
            _fsync_dir(self.path)
            target = self.root / str(version)
            try:
                os.rename(self.path, target)  # atomic; fails if the target exists
            except OSError:
                continue
            _fsync_dir(self.root)
            self.published = target
            log.info("published %s", target)
            return target
        raise ArtifactError(f"could not publish a new version under {self.root}")


def iter_models(repo: Path | str) -> Iterator[str]:
    """Model names in a repository (folders holding at least one version)."""
    root = Path(repo)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and list_versions(root, p.name):
                yield p.name
