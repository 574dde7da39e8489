"""The model versions the e2e and peer stages serve: built once, cached under .cache/bench-models/.

    version_dir, info = bench_version(settings, "e2e")    # 10^5 items, history 50, + synthetic ranker
    version_dir, info = bench_version(settings, "peer")   # 10^4 items, history 50, dim 64, 2 blocks

A cached version is a synthetic log (attnrec.export.data.synthetic) → SASRec with RANDOM weights (not
trained: speed does not depend on the weights, and training a 10^5-item softmax would cost
minutes of the suite's budget) → `attnrec.export.publish.publish` (ONNX encoder, tuned FAISS index,
id map, popularity) → a second version with the suite's SYNTHETIC ranker attached. The torch
weights are saved beside the repository (`sasrec.pt`), so the naive torch-eager baseline serves
the very same encoder. With `--model VERSION_DIR` the given version is copied into the cache
(never modified), with the synthetic ranker attached when it has none; the naive baseline then
rebuilds the torch SASRec from the ONNX file's weights (`torch_encoder`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings

SHAPES = {
    # users × mean length: enough interactions that (nearly) every catalogue item occurs
    "e2e": dict(n_items=100_000, n_users=40_000, mean_length=60.0, max_len=50, dim=64, n_blocks=2),
    "peer": dict(n_items=10_000, n_users=5_000, mean_length=40.0, max_len=50, dim=64, n_blocks=2),
    "tiny": dict(n_items=400, n_users=200, mean_length=20.0, max_len=20, dim=16, n_blocks=1),
}
RANKER_MLP = 128
N_CANDIDATES = 200


@dataclass(frozen=True)
class BenchVersion:
    path: Path  # the version folder served (newest in its repository)
    repo: Path
    name: str
    ranker: str  # "trained" | "synthetic" | "none"
    torch_weights: Path | None  # sasrec.pt when the suite built the model
    source: str

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def bench_version(settings: Settings, kind: str, *, cache: Path | None = None) -> BenchVersion:
    """The version a stage serves: `settings.model_path` (copied) or the cached synthetic one of `kind`.
    The cache is `bench-models/` beside --work-dir (default .cache/bench-models)."""
    cache = Path(cache) if cache is not None else Path(settings.work_dir).parent / "bench-models"
    if settings.model_path is not None:
        return _from_given(Path(settings.model_path), cache, settings)
    shape_name = "tiny" if settings.tiny else kind
    root = Path(cache) / f"{shape_name}-seed{settings.seed}"
    info = root / "bench-version.json"
    if info.is_file():
        raw = json.loads(info.read_text())
        v = BenchVersion(
            **{**raw, "path": Path(raw["path"]), "repo": Path(raw["repo"]), "torch_weights": Path(raw["torch_weights"])}
        )
        if v.path.is_dir():
            return v
    settings.progress(kind, f"building the {shape_name} bench model under {root} (once)")
    shutil.rmtree(root, ignore_errors=True)
    v = _build(SHAPES[shape_name], root, settings.seed)
    info.write_text(json.dumps(v.to_dict(), indent=1) + "\n")
    return v


def _build(shape: dict, root: Path, seed: int) -> BenchVersion:
    import torch

    from attnrec.export.config import SASRecConfig
    from attnrec.export.data.sequences import build_sequences, leave_one_out
    from attnrec.export.data.synthetic import SyntheticConfig, generate
    from attnrec.export.model import SASRec
    from attnrec.export.publish import publish

    log_ = generate(
        SyntheticConfig(n_users=shape["n_users"], n_items=shape["n_items"], mean_length=shape["mean_length"], seed=seed)
    )
    split = leave_one_out(build_sequences(log_))
    torch.manual_seed(seed)
    cfg = SASRecConfig(
        n_items=split.data.n_items, max_len=shape["max_len"], dim=shape["dim"], n_blocks=shape["n_blocks"]
    )
    model = SASRec(cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    weights = root / "sasrec.pt"
    torch.save({"config": cfg.to_dict(), "state_dict": model.state_dict()}, weights)
    repo, name = root / "repo", "bench"
    base, _, _ = publish(
        model,
        split,
        repo,
        name,
        training={"note": "random weights: a benchmark model, never trained"},
        data_info={"source": log_.source, "synthetic": True, "users": split.data.n_users},
        tune_queries=500,
        eval_users=200,
        seed=seed,
        progress=False,
    )
    path = attach_synthetic_ranker(base, repo, name, cfg.n_items, cfg.dim, cfg.max_len, seed)
    source = f"synthetic log {log_.source}, SASRec {cfg.to_dict()} with random weights (not trained)"
    return BenchVersion(path, repo, name, "synthetic", weights, source)


def attach_synthetic_ranker(src: Path, repo: Path, name: str, n_items: int, dim: int, max_len: int, seed: int) -> Path:
    """Publish a copy of the version at `src` as the next version of repo/name, with the suite's synthetic ranker."""
    import torch

    from attnrec.engine.repository import VersionWriter, open_version

    from .synthetic_ranker import TargetAttentionRanker, export_ranker

    manifest = open_version(src)
    torch.manual_seed(seed)
    with VersionWriter(repo, name) as w:
        files = {}
        for role, entry in manifest.files.items():
            shutil.copy(src / entry.path, w.path / entry.path)
            files[role] = entry.path
        export_ranker(TargetAttentionRanker(n_items, dim, max_len, RANKER_MLP), w.path / "ranker.onnx")
        files["ranker"] = "ranker.onnx"
        ranker = {
            "inputs": ["history", "candidates", "candidate_scores"],
            "n_candidates": N_CANDIDATES,
            "synthetic": True,
            "note": "benchmarks/synthetic_ranker.py: random weights, for timing only",
        }
        sections = {k: getattr(manifest, k) for k in ("model", "encoder", "index", "metrics", "training", "data")}
        return w.commit(files=files, ranker=ranker, **sections)


def _from_given(version: Path, cache: Path, settings: Settings) -> BenchVersion:
    from attnrec.engine.repository import VersionWriter, open_version

    manifest = open_version(version)
    root = Path(cache) / f"given-{manifest.name}-v{manifest.version}"
    repo = root / "repo"
    source = f"repository version {version}"
    if "ranker" in manifest.files:
        shutil.rmtree(root, ignore_errors=True)
        with VersionWriter(repo, manifest.name) as w:  # a pinned copy: the server serves the newest version
            for entry in manifest.files.values():
                shutil.copy(version / entry.path, w.path / entry.path)
            sections = {
                k: getattr(manifest, k) for k in ("model", "encoder", "index", "metrics", "training", "data", "ranker")
            }
            path = w.commit(files={r: e.path for r, e in manifest.files.items()}, **sections)
        return BenchVersion(path, repo, manifest.name, "trained", None, source)
    shutil.rmtree(root, ignore_errors=True)
    m = manifest.model
    path = attach_synthetic_ranker(version, repo, manifest.name, m["n_items"], m["dim"], m["max_len"], settings.seed)
    return BenchVersion(path, repo, manifest.name, "synthetic", None, source + " + synthetic ranker")


def torch_encoder(v: BenchVersion):
    """The version's SASRec in torch: from sasrec.pt, or rebuilt from the ONNX encoder's weights."""
    import torch

    from attnrec.engine.repository import open_version
    from attnrec.export.config import SASRecConfig
    from attnrec.export.model import SASRec

    if v.torch_weights is not None:
        state = torch.load(v.torch_weights, weights_only=False)
        model = SASRec(SASRecConfig(**state["config"]))
        model.load_state_dict(state["state_dict"])
        return model.eval(), "sasrec.pt saved when the bench model was built"
    import onnx
    from onnx import numpy_helper

    manifest = open_version(v.path)
    keys = ("n_items", "max_len", "dim", "n_blocks", "n_heads", "ffn_dim")
    model = SASRec(SASRecConfig(**{k: manifest.model[k] for k in keys})).eval()
    graph = onnx.load(str(v.path / manifest.files["encoder"].path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = model.state_dict()
    loaded = 0
    for key, tensor in state.items():
        w = weights.get(key)
        if w is not None and tuple(w.shape) == tuple(tensor.shape):
            tensor.copy_(torch.from_numpy(w.copy()))
            loaded += 1
    model.load_state_dict(state)
    return model, f"rebuilt from encoder.onnx: {loaded}/{len(state)} tensors matched by name (others random)"
