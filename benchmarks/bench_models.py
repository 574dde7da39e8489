"""The model versions the e2e and peer stages serve: built once, cached under .cache/bench-models/.

    version_dir, info = bench_version(settings, "e2e")    # 10^5 items, history 50, + synthetic ranker
    version_dir, info = bench_version(settings, "peer")   # 10^4 items, history 50, dim 64, 2 blocks

A cached version is a synthetic log (attnrec.export.data.synthetic) → SASRec TRAINED on it for a few
epochs within a time budget (export/train.py; SHAPES says how long) → `attnrec.export.publish.publish`
(ONNX encoder, FAISS index tuned on the trained embeddings, id map, popularity) → a second version with
the suite's SYNTHETIC ranker attached. Trained, not random: a trained model's item embeddings have
the log's structure, so its IVF index tunes to few probed lists as a user's would (random embeddings
need nearly every list probed), and the served path costs what it costs users. Random-weight models
remain only where nothing but the shapes matter: the model stage's FLOP counts (stages/model.py).
The torch weights are saved beside the repository (`sasrec.pt`), so the naive torch-eager baseline
serves the very same encoder. With `--model VERSION_DIR` the given version is copied into the cache
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
    # users × mean length: enough interactions that (nearly) every catalogue item occurs; training:
    # at most `epochs` epochs, stopping after the first epoch that ends past `train_s` seconds
    "e2e": dict(
        n_items=100_000, n_users=40_000, mean_length=60.0, max_len=50, dim=64, n_blocks=2, epochs=3, train_s=180
    ),
    "peer": dict(n_items=10_000, n_users=5_000, mean_length=40.0, max_len=50, dim=64, n_blocks=2, epochs=6, train_s=90),
    "tiny": dict(n_items=400, n_users=200, mean_length=20.0, max_len=20, dim=16, n_blocks=1, epochs=1, train_s=30),
}
VAL_USERS = 1000  # validation users per epoch (early stopping is not the point here)
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
    root = Path(cache) / f"{shape_name}-trained-seed{settings.seed}"
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

    from attnrec.engine.repository import DataSection
    from attnrec.export.config import TrainConfig
    from attnrec.export.data.sequences import build_sequences, leave_one_out
    from attnrec.export.data.synthetic import SyntheticConfig, generate
    from attnrec.export.publish import publish
    from attnrec.export.train import train

    log_ = generate(
        SyntheticConfig(n_users=shape["n_users"], n_items=shape["n_items"], mean_length=shape["mean_length"], seed=seed)
    )
    split = leave_one_out(build_sequences(log_))
    config = TrainConfig(
        max_len=shape["max_len"],
        dim=shape["dim"],
        n_blocks=shape["n_blocks"],
        epochs=shape["epochs"],
        patience=shape["epochs"],
        val_users=VAL_USERS,
        time_budget_s=shape["train_s"],
        seed=seed,
    )
    result = train(split, config, progress=False)
    model = result.model.eval().cpu()
    cfg = model.cfg
    root.mkdir(parents=True, exist_ok=True)
    weights = root / "sasrec.pt"
    torch.save({"config": cfg.to_dict(), "state_dict": model.state_dict()}, weights)
    repo, name = root / "repo", "bench"
    trained = (
        f"trained {result.epochs_run} epoch(s) in {result.seconds:.0f}s (budget {shape['train_s']}s), "
        f"validation NDCG@10 {result.best_valid_ndcg10:.4f}"
    )
    base, _, _ = publish(
        model,
        split,
        repo,
        name,
        training=result.section(
            note=f"a benchmark model: {trained}",
        ),
        data=DataSection(source=log_.source, synthetic=True, users=split.data.n_users),
        tune_queries=500,
        eval_users=200,
        seed=seed,
        progress=False,
    )
    path = attach_synthetic_ranker(base, repo, name, cfg.n_items, cfg.dim, cfg.max_len, seed)
    source = f"synthetic log {log_.source}, SASRec {cfg.to_dict()} {trained}"
    return BenchVersion(path, repo, name, "synthetic", weights, source)


def attach_synthetic_ranker(src: Path, repo: Path, name: str, n_items: int, dim: int, max_len: int, seed: int) -> Path:
    """Publish a copy of the version at `src` as the next version of repo/name, with the suite's synthetic ranker."""
    import tempfile

    import torch

    from attnrec.engine.repository import RankerSection, copy_version

    from .synthetic_ranker import TargetAttentionRanker, export_ranker

    torch.manual_seed(seed)
    ranker = RankerSection(
        type="synthetic_target_attention",
        n_candidates=N_CANDIDATES,
        note="benchmarks/synthetic_ranker.py: random weights, for timing only",
    )
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_ranker(TargetAttentionRanker(n_items, dim, max_len, RANKER_MLP), Path(tmp) / "ranker.onnx")
        return copy_version(src, repo, name, ranker=ranker, ranker_file=onnx_path)


def _from_given(version: Path, cache: Path, settings: Settings) -> BenchVersion:
    from attnrec.engine.repository import copy_version, open_version

    manifest = open_version(version)
    root = Path(cache) / f"given-{manifest.name}-v{manifest.version}"
    repo = root / "repo"
    source = f"repository version {version}"
    shutil.rmtree(root, ignore_errors=True)
    if manifest.files.ranker is not None:  # a pinned copy: the server serves the newest version
        ranker_file = version / manifest.files.ranker.path
        path = copy_version(version, repo, manifest.name, ranker=manifest.ranker, ranker_file=ranker_file)
        return BenchVersion(path, repo, manifest.name, "trained", None, source)
    m = manifest.model
    path = attach_synthetic_ranker(version, repo, manifest.name, m.n_items, m.dim, m.max_len, settings.seed)
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
    model = SASRec(SASRecConfig(**manifest.model.shape())).eval()
    graph = onnx.load(str(v.path / manifest.files.encoder.path)).graph
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
