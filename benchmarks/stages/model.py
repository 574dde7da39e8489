"""Model stage: the encoder (and ranker) per call, torch eager vs onnxruntime, over batch size × history length.

Per point: p50/p99 ms per call, sequences/s, achieved GFLOP/s (analytic FLOPs, see
benchmarks/flops.py) next to the machine's measured sgemm GFLOP/s. Without a repository
version the encoder is a SASRec of the issue's reference shape (10,000 items, dim 64,
2 blocks, 1 head, FFN 256, max length 200) with random weights, exported by
attnrec.export.onnx_export and parity-checked against torch; with one (`--model`), onnxruntime
runs that version's encoder.onnx (and ranker.onnx) and torch a same-shaped SASRec with
random weights (the repository holds no torch weights; speed does not depend on them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..flops import sasrec_flops, target_attention_flops
from ..machine import matmul_roofline
from ..ranker_speed import side_feeds
from ..report import Section, fmt_spread
from ..settings import Settings
from ..timing import measure

TITLE = "Model stage: torch eager vs onnxruntime, per call"
REFERENCE_SHAPE = dict(n_items=10_000, max_len=200, dim=64, n_blocks=2, n_heads=1, ffn_dim=256)
N_CANDIDATES = 200  # the pipeline's default candidates per request (attnrec.engine.repository.DEFAULT_CANDIDATES)
RANKER_MLP = 128


TINY_SHAPE = dict(n_items=500, max_len=20, dim=16, n_blocks=1, n_heads=1, ffn_dim=32)


def shape_for(settings: Settings) -> dict:
    return TINY_SHAPE if settings.tiny else REFERENCE_SHAPE


def grid(settings: Settings) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(encoder batches, encoder lengths, ranker batches, ranker lengths)."""
    if settings.tiny:
        return (1, 4), (5, 20), (2,), (10,)
    if settings.quick:
        return (1, 32), (10, 50), (1, 32), (50,)
    return (1, 8, 32, 128, 256), (10, 50, 200), (1, 8, 32, 128), (50, 200)


def _models(settings: Settings, section: Section):
    """(SASRecConfig, encoder ONNX path, torch encoder, hidden?, ranker ONNX path, torch ranker or None, source)."""
    import torch

    from attnrec.engine.repository import open_version
    from attnrec.export.config import SASRecConfig
    from attnrec.export.model import SASRec
    from attnrec.export.onnx_export import check_parity, export_encoder

    from ..synthetic_ranker import TargetAttentionRanker, export_ranker

    torch.manual_seed(settings.seed)
    work = Path(settings.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if settings.model_path is not None:
        path = Path(settings.model_path)
        manifest = open_version(path)
        cfg = SASRecConfig(**manifest.model.shape())
        encoder_path = path / manifest.files.encoder.path
        hidden = "hidden" in manifest.encoder.outputs
        source = f"repository version {path} (torch: same shape, random weights)"
    else:
        cfg = SASRecConfig(**shape_for(settings))
        encoder_path, hidden, source = None, False, "synthetic SASRec of the reference shape, random weights"
    model = SASRec(cfg).eval()
    if encoder_path is None:
        encoder_path = export_encoder(model, work / "encoder.onnx")
        parity = check_parity(model, encoder_path)
        section.data["encoder_parity_max_abs_diff"] = parity.max_abs_diff
        section.note(
            f"Encoder ONNX vs torch: max |difference| {parity.max_abs_diff:.1e} over {parity.n_histories} histories."
        )
    if settings.model_path is not None and manifest.files.ranker is not None:
        ranker_path, ranker = Path(settings.model_path) / manifest.files.ranker.path, None
        section.note("Ranker: the version's ranker.onnx (onnxruntime only: the repository holds no torch weights).")
    else:
        ranker = TargetAttentionRanker(cfg.n_items, cfg.dim, cfg.max_len, RANKER_MLP).eval()
        ranker_path = export_ranker(ranker, work / "ranker-synthetic.onnx")
        section.note(
            "Ranker: SYNTHETIC target-attention ranker (benchmarks/synthetic_ranker.py, random weights, "
            f"MLP {RANKER_MLP}) following engine/ranker.py's contract, {N_CANDIDATES} candidates per sequence."
        )
    return cfg, encoder_path, model, hidden, ranker_path, ranker, source


def _ort_fn(session, feeds: dict[str, np.ndarray]):
    names = [i.name for i in session.get_inputs()]
    feeds = {n: feeds[n] for n in names}
    return lambda: session.run(None, feeds)


def _torch_fn(module, args: list[np.ndarray], device: str):
    import torch

    def fn():
        with torch.inference_mode():
            out = module(*[torch.from_numpy(a).to(device) for a in args])
            # The copy back to the host is part of the call, as onnxruntime's outputs are host arrays.
            return [o.cpu() for o in out] if isinstance(out, tuple) else out.cpu()

    return fn


def run(settings: Settings, section: Section) -> None:
    import torch

    from attnrec.engine.encoder import make_session

    if settings.threads:
        torch.set_num_threads(settings.threads)
    enc_batches, enc_lengths, rk_batches, rk_lengths = grid(settings)
    cfg, encoder_path, model, hidden, ranker_path, ranker, source = _models(settings, section)
    model.to(settings.device)
    if ranker is not None:
        ranker.to(settings.device)
    session_kw = dict(providers=settings.providers, intra_op_threads=settings.threads)
    enc_session = make_session(encoder_path, **session_kw)
    rk_session = make_session(ranker_path, **session_kw)
    section.data.update(
        source=source,
        encoder_config=cfg.to_dict(),
        encoder_outputs_hidden=hidden,
        onnxruntime_session_providers=enc_session.get_providers(),
        torch_threads=torch.get_num_threads(),
        torch_device=settings.device,
    )

    settings.progress("model", "measuring the matmul roofline")
    roof = matmul_roofline(
        settings.threads,
        duration_s=0.2 if settings.quick else 0.5,
        sizes=(256, 512) if settings.tiny else (512, 1024, 2048),
        device=settings.device,
    )
    section.data["roofline"] = roof
    rng = np.random.default_rng(settings.seed)
    points: list[dict] = section.data.setdefault("points", [])  # filled as measured: a failure keeps them

    class _WithHidden(torch.nn.Module):  # the graph the ONNX exports when it outputs hidden states
        def forward(self, tokens):
            h = model.hidden(tokens)
            return h[:, -1], h

    torch_encoder = _WithHidden() if hidden else model
    shape = dict(dim=cfg.dim, n_blocks=cfg.n_blocks, ffn_dim=cfg.ffn_dim)
    total = len(enc_batches) * len([x for x in enc_lengths if x <= cfg.max_len]) * 2
    total += len(rk_batches) * len([x for x in rk_lengths if x <= cfg.max_len]) * (2 if ranker is not None else 1)
    done = 0

    def record(model_name: str, engine: str, batch: int, length: int, fn, flops: int) -> None:
        nonlocal done
        done += 1
        p = measure(fn, settings.method, items_per_call=batch)
        p.update(model=model_name, engine=engine, batch=batch, length=length, gflop_per_call=flops / 1e9)
        p["gflops"] = flops / 1e9 * p["calls_per_s"]
        p["gflops_spread"] = [flops / 1e9 * c for c in p["calls_per_s_spread"]]
        p["roofline_fraction"] = p["gflops"] / roof["gflops"]
        points.append(p)
        settings.progress(
            "model",
            f"[{done}/{total}] {model_name:7} {engine:11} B={batch:<3} L={length:<3} "
            f"p50 {p['p50_ms']:.3f} ms  p99 {p['p99_ms']:.3f} ms  {p['items_per_s']:,.0f} seq/s  "
            f"{p['gflops']:.1f} GFLOP/s",
        )

    for length in [x for x in enc_lengths if x <= cfg.max_len]:
        for batch in enc_batches:
            tokens = rng.integers(1, cfg.n_items + 1, size=(batch, length), dtype=np.int64)
            flops = sasrec_flops(batch, length, hidden=hidden, **shape)
            record("encoder", "torch", batch, length, _torch_fn(torch_encoder, [tokens], settings.device), flops)
            record("encoder", "onnxruntime", batch, length, _ort_fn(enc_session, {"history": tokens}), flops)

    for length in [x for x in rk_lengths if x <= cfg.max_len]:
        for batch in rk_batches:
            feeds = {
                "history": rng.integers(1, cfg.n_items + 1, size=(batch, length), dtype=np.int64),
                "hidden": rng.standard_normal((batch, length, cfg.dim), dtype=np.float32),
                "candidates": rng.integers(1, cfg.n_items + 1, size=(batch, N_CANDIDATES), dtype=np.int64),
                "candidate_scores": rng.standard_normal((batch, N_CANDIDATES), dtype=np.float32),
            }
            feeds.update(side_feeds(rk_session, rng, batch, length))
            flops = target_attention_flops(batch, length, N_CANDIDATES, dim=cfg.dim, mlp_dim=RANKER_MLP)
            if ranker is not None:
                args = [feeds["history"], feeds["candidates"], feeds["candidate_scores"]]
                record("ranker", "torch", batch, length, _torch_fn(ranker, args, settings.device), flops)
            else:
                flops = 0  # unknown architecture: no analytic count
            record("ranker", "onnxruntime", batch, length, _ort_fn(rk_session, feeds), flops)

    section.data["points"] = points
    _tables(section, points, roof, cfg, settings)
    _figure(section, points, roof)


def _tables(section: Section, points: list[dict], roof: dict, cfg, settings: Settings) -> None:
    section.note(
        f"Roofline: best float32 n×n matmul {roof['gflops']:.1f} GFLOP/s "
        + ", ".join(f"{k.split('_')[0]} {v:.1f}" for k, v in roof.items() if k.endswith("_gflops"))
        + f" (n in {roof['sizes']}, {settings.device}). The encoder's products are thin (D = {cfg.dim}), "
        "so a fraction of it is what BLAS reaches on such shapes."
    )
    section.note(
        "FLOPs: analytic matrix-product count (benchmarks/flops.py); GFLOP/s = FLOPs per call × calls/s. "
        "Histories are full length (no padding); tokens uniform over the catalogue."
    )
    cols = ["model", "engine", "batch", "length", "p50 ms [min–max]", "p99 ms", "seq/s [min–max]"]
    cols += ["GFLOP/call", "GFLOP/s", "% roofline", "calls"]
    rows = []
    for p in points:
        rows.append(
            [
                p["model"],
                p["engine"],
                p["batch"],
                p["length"],
                fmt_spread(p, "p50_ms"),
                p["p99_ms"],
                fmt_spread(p, "items_per_s"),
                p["gflop_per_call"] or None,
                p["gflops"] or None,
                round(100 * p["roofline_fraction"], 1) if p["gflops"] else None,
                sum(r["calls"] for r in p["repeats"]),
            ]
        )
    section.table("Per call, median of repeats (spread = [min–max] over repeats)", cols, rows)
    speed = []
    for p in points:
        if p["engine"] != "onnxruntime":
            continue
        t = next((q for q in points if q["engine"] == "torch" and _key(q) == _key(p)), None)
        if t is not None:
            speed.append([p["model"], p["batch"], p["length"], round(t["p50_ms"] / p["p50_ms"], 2)])
    if speed:
        section.table("onnxruntime speed-up over torch eager (p50 ratio)", ["model", "batch", "length", "×"], speed)


def _key(p: dict) -> tuple:
    return p["model"], p["batch"], p["length"]


def _figure(section: Section, points: list[dict], roof: dict) -> None:
    from .. import plots

    groups = sorted({(p["model"], p["length"]) for p in points})
    fig, axes = plots.new_figure(len(groups) + 1, cols=3)
    for ax, (model_name, length) in zip(axes, groups):
        series = {}
        for engine in ("onnxruntime", "torch"):
            pts = [p for p in points if p["model"] == model_name and p["length"] == length and p["engine"] == engine]
            if pts:
                series[engine] = sorted(pts, key=lambda p: p["batch"])
        plots.latency_vs_throughput(
            ax,
            series,
            labels_key="batch",
            title=f"{model_name}, history {length} (labels: batch size)",
            xlabel="sequences/s",
        )
    ax = axes[-1]
    for ci, key in enumerate(sorted({(p["model"], p["engine"], p["length"]) for p in points if p["gflops"]})):
        pts = sorted([p for p in points if (p["model"], p["engine"], p["length"]) == key], key=lambda p: p["batch"])
        ax.plot(
            [p["batch"] for p in pts],
            [p["gflops"] for p in pts],
            marker="o",
            markersize=3,
            label=" ".join(map(str, key)),
        )
    ax.axhline(roof["gflops"], color="k", linestyle="--", label=f"sgemm roofline {roof['gflops']:.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("achieved GFLOP/s vs the machine's sgemm", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    section.figure(fig)
