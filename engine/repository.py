"""The model repository: the one contract between the offline and the online half.

Layout::

    <repo>/<name>/<version>/manifest.json     version = 1, 2, 3, ... (newest = largest)
                            encoder.onnx      history tokens -> query vector [+ hidden states]
                            ranker.onnx       (optional) history x candidates -> scores
                            item_embeddings.npy, items.faiss, item_ids.json, item_popularity.npy
                            features/         (optional) side features of items and users
                            content/          (optional) item content embeddings and the cold-start map

Catalogue rows 0..n_items-1 index every per-item file; the encoder's input token of row r is
r + 1 (token 0 is padding). A version is written in a hidden staging folder and renamed into
place when complete, so a reader never sees half a version. Every file's sha256 is in the
manifest; `open_version` refuses a version whose files do not match.

The manifest's schema is the frozen dataclasses below; this module alone turns them into JSON and
back, so everyone else reads typed attributes (`manifest.model.dim`, `manifest.ranker is None`).
Its `schema_version` is "MAJOR.MINOR": a reader refuses another major version, ignores the keys a
newer minor version added, and upgrades schema 1 (the untyped manifests of earlier releases).
Schema 2.1 added the optional `features` section (a 2.0 reader ignores it, and the features with it);
2.2 the optional `content` section (a 2.1 reader ignores it and still serves the version: the cold
items' mapped vectors are already in item_embeddings.npy, the index and the encoder); 2.3 the ranker
training's `valid_gain_z` and `rejected_epoch` (why a trained ranker shipped as stage one's order); 2.4 its
`memorisation` (the probe that chose the ranker's samples, RankerConfig.holdout_auto).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import types
import typing
import uuid
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Union

log = logging.getLogger(__name__)

SCHEMA_MAJOR, SCHEMA_MINOR = 2, 4
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
MANIFEST = "manifest.json"
_STAGING_PREFIX = ".staging-"
DEFAULT_CANDIDATES = 200  # stage one's top-N for a ranker whose section names none (schema 1)


class ArtifactError(Exception):
    """A model version is missing, malformed or does not match its checksums."""


class _Section:
    """A manifest section: JSON-ready as a plain dict (fields that are None are left out)."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class FileEntry(_Section):
    path: str  # relative to the version folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Files(_Section):
    """The version's files by role; `ranker` only when the version has a second stage."""

    encoder: FileEntry
    item_embeddings: FileEntry
    index: FileEntry
    item_ids: FileEntry
    item_popularity: FileEntry
    ranker: FileEntry | None = None

    def roles(self) -> dict[str, FileEntry]:
        """Role → file, for the files present."""
        return {f.name: entry for f in fields(self) if (entry := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class ModelSection(_Section):
    """The encoder's architecture and how its scores are read."""

    type: str  # "sasrec"
    n_items: int
    max_len: int
    dim: int
    n_blocks: int
    n_heads: int
    ffn_dim: int
    dropout: float
    token_offset: int = 1
    padding_token: int = 0
    score: str = "inner product of the encoder's query with item_embeddings rows"

    def shape(self) -> dict[str, int]:
        """The sizes that fix the graph (SASRecConfig's keyword arguments, dropout aside)."""
        return {k: getattr(self, k) for k in ("n_items", "max_len", "dim", "n_blocks", "n_heads", "ffn_dim")}


@dataclass(frozen=True)
class TensorEntry(_Section):
    """One input or output of an ONNX graph; symbolic dimensions are names."""

    dtype: str
    shape: tuple[str | int, ...]
    note: str | None = None


@dataclass(frozen=True)
class EncoderParity(_Section):
    max_abs_diff: float  # |onnx - torch| over the checked histories
    by_length: dict[str, float]  # history length → max |onnx - torch|
    histories: int
    tolerance: float


@dataclass(frozen=True)
class EncoderSpeed(_Section):
    batch: int
    length: int
    torch_ms: float
    onnxruntime_ms: float
    speedup: float


@dataclass(frozen=True)
class EncoderSection(_Section):
    inputs: dict[str, TensorEntry]
    outputs: dict[str, TensorEntry]  # "query", and "hidden" when the encoder exports its states
    opset: int
    parity: EncoderParity
    speed_cpu: EncoderSpeed | None = None


@dataclass(frozen=True)
class IndexSection(_Section):
    """The FAISS index and the search parameters tuned for it, with what they measured."""

    factory: str
    metric: str
    params: dict[str, int | float]  # FAISS ParameterSpace settings, e.g. {"nprobe": 16}
    recall_n: int
    recall: float  # recall@recall_n against exact search on the tuning queries
    target_recall: float
    reached_target: bool
    search_ms: float
    exact_search_ms: float
    batch_ms_per_query: float
    tuning_queries: int
    tried: tuple[dict[str, int | float], ...] = ()  # each setting tried and its recall
    mips_max_norm2: float | None = None  # set: items were stored MIPS→L2 augmented (attnrec.engine.index)


@dataclass(frozen=True)
class RankerParity(_Section):
    max_abs_diff: float
    cases: tuple[dict[str, int | float], ...]  # batch, length, candidates, max_abs_diff
    tolerance: float


@dataclass(frozen=True)
class RankerTraining(_Section):
    config: dict[str, Any]  # the ranker's training settings as given
    best_epoch: int
    epochs_run: int
    best_valid_ndcg10: float
    stage1_valid_ndcg10: float
    samples: int
    samples_target_retrieved: float
    seconds: float
    history: tuple[dict[str, float], ...] = ()  # per epoch: loss, validation NDCG@10
    valid_gain_z: float | None = None  # the best epoch's paired validation gain, in standard errors (2.3)
    rejected_epoch: int = 0  # the best epoch, when that gain was below the threshold and stage one shipped (2.3)
    # How often stage one retrieved its own training targets against validation targets, and whether that made the
    # samples hold-out ones (RankerConfig.holdout_auto; absent when the sampling was given) (2.4)
    memorisation: dict[str, float] | None = None


@dataclass(frozen=True)
class RankerSection(_Section):
    """The second stage: re-orders stage one's `n_candidates` (present iff `files.ranker` is)."""

    type: str  # "target_attention"
    n_candidates: int = DEFAULT_CANDIDATES
    inputs: dict[str, TensorEntry] = field(default_factory=dict)
    outputs: dict[str, TensorEntry] = field(default_factory=dict)
    features: tuple[str, ...] = ()
    shape: dict[str, int | float | str] = field(default_factory=dict)
    opset: int | None = None
    parity: RankerParity | None = None
    speed_cpu: tuple[dict[str, int | float], ...] = ()
    training: RankerTraining | None = None
    note: str | None = None


@dataclass(frozen=True)
class EvalProtocol(_Section):
    name: str
    split: str
    ranking: str
    exclude_seen: bool
    min_interactions: int
    users_evaluated: int
    users_eligible: int
    users_train_only: int
    ks: tuple[int, ...]


SplitMetrics = dict[str, float]  # metric name → value (hr@10, ndcg@10, ..., users)


@dataclass(frozen=True)
class PipelineMetrics(_Section):
    """The rows through the serving pipeline: (a) exact, (b) ann = FAISS top-k, (c) ranked."""

    exact: dict[str, SplitMetrics]  # split name → metrics
    ann: dict[str, SplitMetrics]
    n_candidates: int
    stage1_recall: dict[str, float]  # split → recall@n_candidates of stage one
    served: str  # "ranked" or "ann": the row the server runs
    ranked: dict[str, SplitMetrics] | None = None


@dataclass(frozen=True)
class MetricsSection(_Section):
    """Evaluation at export time; `test`/`valid` are the pipeline the server runs."""

    test: SplitMetrics
    valid: SplitMetrics
    baselines: dict[str, dict[str, SplitMetrics]]  # baseline → split → metrics
    protocol: EvalProtocol
    pipeline: PipelineMetrics | None = None


@dataclass(frozen=True)
class PrivacySection(_Section):
    """User-level differential privacy of the encoder's training (DP-SGD, export/dp_train.py)."""

    mechanism: str  # what was done, in words
    unit: str  # what one protected record is, and how its contribution is bounded
    delta: float
    max_grad_norm: float  # C, the per-user clipping norm
    noise_multiplier: float  # sigma: Gaussian noise of std sigma * C on each step's summed gradient
    accountant: str  # the Opacus accountant that computed epsilon ("rdp", "prv")
    sample_rate: float  # q: each user is in a step's batch with this probability (Poisson)
    steps: int
    target_epsilon: float | None = None  # what was asked (None: inf, no noise)
    epsilon: float | None = None  # the accountant's epsilon for the steps run (None: no noise, no guarantee)
    users: int = 0  # users with a training window (the sampled population)
    covered: tuple[str, ...] = ()  # the artifacts whose making this epsilon bounds
    not_covered: tuple[str, ...] = ()  # what also read user data without that guarantee
    opacus: str | None = None


@dataclass(frozen=True)
class FederatedSection(_Section):
    """Federated training of the encoder (attnrec train --federated K, export/federated.py)."""

    clients: int  # K, each holding a disjoint shard of the users
    rounds: int  # R asked
    local_epochs: int  # E per client per round
    strategy: str  # the aggregation, in words (FedAvg weighted by client training windows)
    transport: str = ""  # how the server and clients talked
    partition: str = ""  # how users were split into shards
    users_per_client: tuple[int, ...] = ()
    windows_per_client: tuple[int, ...] = ()  # FedAvg's weights
    best_round: int | None = None  # the round whose aggregate was exported
    evaluation: str = ""
    centralised: tuple[str, ...] = ()  # what else read every user's data in one place
    flwr: str | None = None


@dataclass(frozen=True)
class TrainingSection(_Section):
    """How the weights were made, and the library versions that exported them."""

    config: dict[str, Any] = field(default_factory=dict)  # the training settings as given
    best_epoch: int | None = None
    epochs_run: int | None = None
    train_seconds: float | None = None
    best_valid_ndcg10: float | None = None
    history: tuple[dict[str, float], ...] = ()  # per epoch: loss, validation metrics
    checkpoint: str | None = None
    note: str | None = None
    privacy: PrivacySection | None = None  # DP-SGD training (attnrec train --dp-epsilon)
    federated: FederatedSection | None = None  # Flower FedAvg training (attnrec train --federated)
    torch: str | None = None
    onnxruntime: str | None = None
    faiss: str | None = None
    python: str | None = None


@dataclass(frozen=True)
class DataSection(_Section):
    """The interaction log the version was trained on."""

    source: str
    users: int
    items: int | None = None
    interactions: int | None = None
    format: str | None = None
    kcore: int | None = None
    synthetic: bool = False


@dataclass(frozen=True)
class FeatureColumnSection(_Section):
    """One encoded column of a side-feature file (attnrec.engine.features holds the arrays)."""

    name: str  # as the source file names it
    role: str  # "categorical", "multi" (several values per row), "numeric" (quantile buckets) or "text"
    values: FileEntry  # codes: int32 .npy (rows, width), 0 = unknown/padding; text: JSON list of rows strings
    vocab: FileEntry | None = None  # codes: JSON list, code -> value ([0] = "" is the unknown)
    width: int = 1  # codes per row (multi: the most values one row has)
    n_codes: int = 0  # codes run 0..n_codes-1 (an embedding table's size); 0 for text
    min_count: int | None = None  # categorical: values on fewer rows than this became unknown
    rare_values: int = 0  # distinct values that did
    edges: tuple[float, ...] = ()  # numeric: a value's code is 1 + the number of edges <= it
    missing: int = 0  # rows found in the file with no value here


@dataclass(frozen=True)
class FeatureTableSection(_Section):
    """A side-feature file encoded against the version's rows: array row r + 1 is catalogue row r
    (the encoder's token) or training user r; row 0 is the unknown/padding row."""

    kind: str  # "item" or "user"
    source: str  # the file as given
    source_sha256: str  # of that file when it was read
    format: str  # recbole, csv, tsv or parquet
    id_column: str
    rows: int  # array rows: 1 + catalogue items (or users)
    matched: int  # ids of the interactions found in the file
    unknown: int  # ids of the interactions not in the file (their row holds unknown values)
    unused: int  # file rows whose id is not in the interactions
    columns: tuple[FeatureColumnSection, ...]
    ids: FileEntry | None = None  # user tables: JSON list of the external id (str) of rows 1..


@dataclass(frozen=True)
class FeaturesSection(_Section):
    """Side features stored with the version, so serving and offline retrieval read the same values."""

    item: FeatureTableSection | None = None
    user: FeatureTableSection | None = None

    def tables(self) -> tuple[FeatureTableSection, ...]:
        return tuple(t for t in (self.item, self.user) if t is not None)

    def roles(self) -> dict[str, FileEntry]:
        """A name per file (`features.item.genre.values`, ...) → its entry, for verification and copies."""
        out = {}
        for table in self.tables():
            if table.ids is not None:
                out[f"features.{table.kind}.ids"] = table.ids
            for col in table.columns:
                out[f"features.{table.kind}.{col.name}.values"] = col.values
                if col.vocab is not None:
                    out[f"features.{table.kind}.{col.name}.vocab"] = col.vocab
        return out


@dataclass(frozen=True)
class ColdStartSection(_Section):
    """The ridge map from content to item vectors that gave the cold items (no training interactions,
    some text) their stage-one vectors (attnrec.engine.content reads it)."""

    weights: FileEntry  # float32 .npy (content dim + 1, model dim): vector = content @ W[:-1] + W[-1]
    cold_rows: FileEntry  # int64 .npy: the catalogue rows whose item vector is their mapped content
    ridge_lambda: float  # chosen on warm items held out of the fit
    norm_scale: float  # the ridge output's scale (folded into weights): learned norms over predicted ones
    fit_items: int  # warm items the map was fitted on
    min_interactions: int  # an item is warm with at least this many training interactions
    valid_cosine: float  # mean cosine(mapped, learned vector) on the held-out warm items
    valid_r2: float  # share of the learned vectors' variance the map explains there


@dataclass(frozen=True)
class ContentSection(_Section):
    """Item content embeddings (schema 2.2): row r + 1 is catalogue row r, row 0 the padding/unknown
    row; an item without text has a zero row."""

    encoder: str  # the sentence encoder that embedded the text, and its package version
    dim: int
    columns: tuple[str, ...]  # the item-feature text columns embedded (joined per row)
    embeddings: FileEntry  # float32 .npy (rows, dim), L2-normalised rows
    rows: int  # 1 + catalogue items
    with_text: int  # catalogue rows with some text
    cold_start: ColdStartSection | None = None

    def roles(self) -> dict[str, FileEntry]:
        """A name per file → its entry, for verification and copies."""
        out = {"content.embeddings": self.embeddings}
        if self.cold_start is not None:
            out["content.cold_start.weights"] = self.cold_start.weights
            out["content.cold_start.cold_rows"] = self.cold_start.cold_rows
        return out


@dataclass(frozen=True)
class Manifest(_Section):
    """What a version holds."""

    name: str
    version: int
    created_at: str
    files: Files
    model: ModelSection
    encoder: EncoderSection
    index: IndexSection
    ranker: RankerSection | None = None  # None: a single-stage version
    metrics: MetricsSection | None = None
    training: TrainingSection | None = None
    data: DataSection | None = None
    features: FeaturesSection | None = None  # schema 2.1
    content: ContentSection | None = None  # schema 2.2
    schema_version: str = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if (self.files.ranker is None) != (self.ranker is None):
            raise ValueError("a ranker file needs a ranker section and a ranker section a ranker file")

    def all_files(self) -> dict[str, FileEntry]:
        """Every file of the version with its checksum: the roles of `files`, the feature files, the content files."""
        return {
            **self.files.roles(),
            **(self.features.roles() if self.features is not None else {}),
            **(self.content.roles() if self.content is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Manifest":
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        major = _major(found)
        if major == 1:
            raw = _upgrade_v1(raw)
        elif major != SCHEMA_MAJOR:
            raise ArtifactError(
                f"{where}: manifest schema version {found!r}, but this attnrec reads schema {SCHEMA_MAJOR}.x "
                "(and upgrades 1): re-export the model with this attnrec (`attnrec export`), "
                "or serve it with the attnrec that wrote it"
            )
        try:
            return _parse(cls, raw, "")
        except _Malformed as exc:
            raise ArtifactError(f"{where}: malformed manifest: {exc}") from None


# ── JSON ↔ dataclasses ───────────────────────────────────────────────────────────────────────
class _Malformed(Exception):
    pass


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _plain(v) for f in fields(obj) if (v := getattr(obj, f.name)) is not None}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(tp: Any, value: Any, at: str) -> Any:
    """`value` (parsed JSON) as type `tp`, checked all the way down; keys a dataclass lacks are ignored."""
    if tp is Any:
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Malformed(f"{at or 'manifest'}: expected an object, found {value!r:.60}")
        hints = _hints(tp)
        known = {f.name for f in fields(tp)}
        kwargs = {k: _parse(hints[k], v, f"{at}.{k}".lstrip(".")) for k, v in value.items() if k in known}
        missing = [
            f.name for f in fields(tp) if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise _Malformed(f"{at or 'manifest'}: missing {', '.join(missing)}")
        try:
            return tp(**kwargs)
        except ValueError as exc:
            raise _Malformed(f"{at or 'manifest'}: {exc}") from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: X's own, more precise complaint
            return _parse(options[0], value, at)
        for option in options:
            try:
                return _parse(option, value, at)
            except _Malformed:
                pass
    elif origin is dict and isinstance(value, dict):
        return {str(k): _parse(args[1], v, f"{at}.{k}") for k, v in value.items()}
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_parse(args[0], v, f"{at}[{i}]") for i, v in enumerate(value))
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (str, bool) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", None) or str(tp)
    raise _Malformed(f"{at}: expected {name}, found {value!r:.60}")


def _major(found: Any) -> int | None:
    if isinstance(found, int) and not isinstance(found, bool):
        return found
    if isinstance(found, str) and found.split(".")[0].isdigit():
        return int(found.split(".")[0])
    return None


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 → 2: the same sections as untyped dicts, `{}` for an absent one, and keys that
    named a number in them (recall@200, best_valid_ndcg@10, stage1_recall@50)."""

    def renamed(d: dict[str, Any], old: str, new: str) -> dict[str, Any]:
        d = dict(d)
        if old in d:
            d[new] = d.pop(old)
        return d

    out = {k: v for k, v in raw.items() if v != {} or k in ("model", "encoder", "index", "files")}
    out["schema_version"] = SCHEMA_VERSION
    if isinstance(index := out.get("index"), dict):
        out["index"] = renamed(index, f"recall@{index.get('recall_n')}", "recall")
    if isinstance(training := out.get("training"), dict):
        out["training"] = renamed(training, "best_valid_ndcg@10", "best_valid_ndcg10")
    if isinstance(out.get("files"), dict) and "ranker" in out["files"] and isinstance(out.get("ranker", {}), dict):
        ranker = {"type": "target_attention", **out.get("ranker", {})}
        if isinstance(ranker.get("inputs"), list):  # benchmarks' synthetic ranker listed names only
            del ranker["inputs"]
        if isinstance(rt := ranker.get("training"), dict):
            rt = renamed(rt, "best_valid_ndcg@10", "best_valid_ndcg10")
            ranker["training"] = renamed(rt, "stage1_valid_ndcg@10", "stage1_valid_ndcg10")
        out["ranker"] = ranker
    if isinstance(metrics := out.get("metrics"), dict) and isinstance(pipe := metrics.get("pipeline"), dict):
        out["metrics"] = {
            **metrics,
            "pipeline": renamed(pipe, f"stage1_recall@{pipe.get('n_candidates')}", "stage1_recall"),
        }
    return out


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
    inside = path.resolve()
    for role, entry in manifest.all_files().items():
        # checked with or without `verify`: a manifest must never make a reader open a file elsewhere
        if not (path / entry.path).resolve().is_relative_to(inside):
            raise ArtifactError(f"{mpath}: {role} file {entry.path!r} resolves outside the version folder {path}")
    if verify:
        for role, entry in manifest.all_files().items():
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


def _lock_folder(path: Path) -> int | None:
    """An open descriptor of `path` holding an exclusive flock, or None when another process holds
    one. The kernel drops the lock when its holder dies, kill -9 included."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_stale_staging(root: Path, started: float) -> list[Path]:
    """Remove the `.staging-*` folders under a model folder that a crashed publish left behind:
    those older than `started` (this run's start, time.time()) whose writer holds no lock on them
    (a live writer always does). Returns what was removed."""
    removed = []
    for p in sorted(root.glob(_STAGING_PREFIX + "*")) if root.is_dir() else []:
        try:
            if not p.is_dir() or p.stat().st_mtime >= started:
                continue
            fd = _lock_folder(p)
        except FileNotFoundError:  # another run cleaned it first
            continue
        if fd is None:  # a writer is still at work in it
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)
        log.warning("removed %s, left behind by an interrupted publish", p)
        removed.append(p)
    return removed


class VersionWriter:
    """Stage a new version's files, then publish them atomically under the next version number.

        with VersionWriter(repo, name) as w:
            onnx.save(model, w.path / "encoder.onnx")
            ...
            version_dir = w.commit(files={"encoder": "encoder.onnx", ...}, model=ModelSection(...), ...)

    Leaving the block without `commit` (an exception included) removes the staging folder. The
    staging folder is flock-ed while it is written, so that the next writer can tell a folder a
    crashed run left (removed when older than that writer's run: `clean_stale_staging`) from one
    that a concurrent run is still writing.
    """

    def __init__(self, repo: Path | str, name: str, *, started: float | None = None) -> None:
        """`started`: when this run began (time.time(); default: now): older unlocked staging folders are removed."""
        self.root = model_dir(repo, name)
        self.name = name
        self.root.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(self.root, time.time() if started is None else started)
        self.path = self.root / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        self.path.mkdir()
        self._lock = _lock_folder(self.path)
        self.published: Path | None = None

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.published is None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def commit(
        self,
        *,
        files: dict[str, str],  # role (a field of Files) → path relative to the version folder
        model: ModelSection,
        encoder: EncoderSection,
        index: IndexSection,
        ranker: RankerSection | None = None,
        metrics: MetricsSection | None = None,
        training: TrainingSection | None = None,
        data: DataSection | None = None,
        features: FeaturesSection | None = None,  # its entries written by attnrec.engine.features
        content: ContentSection | None = None,  # its entries written by attnrec.engine.content
    ) -> Path:
        entries = {}
        for role, rel in files.items():
            fpath = self.path / rel
            with open(fpath, "rb") as f:
                os.fsync(f.fileno())
            entries[role] = FileEntry(path=rel, sha256=sha256_file(fpath), bytes=fpath.stat().st_size)
        extra = {
            **(features.roles() if features is not None else {}),
            **(content.roles() if content is not None else {}),
        }
        for entry in extra.values():
            with open(self.path / entry.path, "rb") as f:
                os.fsync(f.fileno())
        # Try successive numbers: a concurrent writer may publish the same one first.
        for _ in range(1000):
            version = (list_versions(self.root.parent, self.name) or [0])[-1] + 1
            manifest = Manifest(
                name=self.name,
                version=version,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                files=Files(**entries),
                model=model,
                encoder=encoder,
                index=index,
                ranker=ranker,
                metrics=metrics,
                training=training,
                data=data,
                features=features,
                content=content,
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


def copy_version(
    src: Path | str, repo: Path | str, name: str, *, ranker: RankerSection | None, ranker_file: Path | None
) -> Path:
    """Publish a copy of the version at `src` (files and sections) as the next version of repo/name, with
    `ranker_file` as its ranker.onnx and `ranker` as its section, or without a ranker (both None)."""
    if (ranker is None) != (ranker_file is None):
        raise ValueError("a ranker file needs a ranker section and a ranker section a ranker file")
    src = Path(src)
    manifest = open_version(src)
    with VersionWriter(repo, name) as w:
        files = {role: e.path for role, e in manifest.files.roles().items() if role != "ranker"}
        extra = {role: e for role, e in manifest.all_files().items() if role not in manifest.files.roles()}
        for rel in [*files.values(), *(e.path for e in extra.values())]:
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, w.path / rel)
        if ranker_file is not None:
            shutil.copy(ranker_file, w.path / "ranker.onnx")
            files["ranker"] = "ranker.onnx"
        return w.commit(
            files=files,
            model=manifest.model,
            encoder=manifest.encoder,
            index=manifest.index,
            ranker=ranker,
            metrics=manifest.metrics,
            training=manifest.training,
            data=manifest.data,
            features=manifest.features,
            content=manifest.content,
        )


def iter_models(repo: Path | str) -> Iterator[str]:
    """Model names in a repository (folders holding at least one version)."""
    root = Path(repo)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and list_versions(root, p.name):
                yield p.name
