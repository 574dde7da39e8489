"""The re-rank's trade-off: accuracy against exposure as diversity or popularity calibration goes 0 → 1.

    python -m attnrec.benchmarks.rerank_curve --repo REPO --name NAME --data LOG \\
        [--lambdas 0,0.25,0.5,0.75,1] [--label ml-100k] [--out benchmarks/results] [--date YYYY-MM-DD]

For each strength λ, the version's served answer (`Pipeline.recommend`, engine/rerank.py) for every
test user of the leave-one-out split, once with `diversity=λ` and once with `popularity_calibration=λ`,
scored under the quality protocol (export/ranking_metrics.py: NDCG/HR@10, coverage, Gini, long-tail
share, popularity-calibration JS, ARP) plus ild@10 (intra-list diversity). The popularity ranking is
scored beside them. Writes `rerank-<label>-<date>.md`, `.json` and `.png` into `--out`. No torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .report import add_curve_args, run_curve

COLUMNS = (
    ("ndcg@10", "NDCG@10"),
    ("hr@10", "HR@10"),
    ("coverage@10", "coverage@10"),
    ("gini@10", "Gini@10"),
    ("long_tail@10", "long-tail@10"),
    ("popcal_js@10", "pop. calibration JS@10"),
    ("arp@10", "ARP@10"),
    ("ild@10", "ILD@10"),
)
MODES = ("diversity", "popularity_calibration")


def measure(repo: Path, name: str, data: Path, lambdas: list[float], threads: int = 0) -> dict:
    from attnrec.engine.pipeline import Pipeline, RuntimeOptions
    from attnrec.engine.repository import resolve_version
    from attnrec.export.data.readers import read_interactions
    from attnrec.export.data.sequences import build_sequences, leave_one_out
    from attnrec.export.evaluate import evaluate_query_fn, evaluate_reranked, load_item_ids

    version_dir, manifest = resolve_version(repo, name, None)
    split = leave_one_out(build_sequences(read_interactions(data), item_vocab=load_item_ids(version_dir, manifest)))
    pipeline = Pipeline.load(version_dir, RuntimeOptions(intra_op_threads=threads))
    pop = split.train_popularity()[1:].astype(np.float64)
    curves: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for mode in MODES:
        for lam in lambdas:
            t0 = time.perf_counter()
            m = evaluate_reranked(pipeline, split.test, pop, user_ids=split.data.user_ids, **{mode: lam})
            curves[mode].append({"lambda": lam, **m, "seconds": time.perf_counter() - t0})
            print(
                f"[rerank] {mode} {lam:g}: NDCG@10 {m['ndcg@10']:.4f}, Gini@10 {m['gini@10']:.4f}, "
                f"long-tail@10 {m['long_tail@10']:.4f}, popcal JS@10 {m['popcal_js@10']:.4f}",
                flush=True,
            )
    baseline = evaluate_query_fn(
        lambda h: np.ones((len(h), 1), np.float32), pop.astype(np.float32)[:, None], split, progress=False
    )["test"]
    return {
        "model": {"name": manifest.name, "version": manifest.version, "path": str(version_dir)},
        "served": "ranked" if pipeline.ranker is not None else "ann",
        "pool": pipeline.n_candidates or "200 (stage one, no ranker)",
        "users": len(split.test),
        "training": manifest.training.to_dict() if manifest.training else {},
        "curves": curves,
        "popularity": baseline,
    }


def markdown(result: dict, label: str, date: str, command: str, machine: str) -> str:
    tr = result["training"]
    lines = [
        f"# Re-rank trade-off on {label} ({date})",
        "",
        f"Model: {result['model']['name']} version {result['model']['version']} (served: {result['served']}; "
        f"re-rank pool: {result['pool']}); {result['users']} test users; leave-one-out, full ranking, seen items "
        "excluded. Training: "
        + (
            f"{tr.get('epochs_run')} epochs, best valid NDCG@10 {tr.get('best_valid_ndcg10', float('nan')):.4f}."
            if tr
            else "unknown."
        ),
        "",
        f"Command: `{command}`. Machine: {machine}.",
        "",
        "λ is the request's `diversity` (MMR over item embeddings) or `popularity_calibration` (toward the "
        "user's head/mid/tail mix); the other is 0. λ = 0 is the plain served answer. ILD@10 = 1 - mean "
        "pairwise cosine of the top 10's item embeddings.",
        "",
    ]
    head = " | ".join(c for _, c in COLUMNS)
    for mode in MODES:
        lines += [f"## {mode}", "", f"| λ | {head} |", "|---|" + "---|" * len(COLUMNS)]
        for p in result["curves"][mode]:
            cells = [f"{p[k]:.1f}" if k == "arp@10" else f"{p[k]:.4f}" for k, _ in COLUMNS]
            lines.append(f"| {p['lambda']:g} | {' | '.join(cells)} |")
        lines.append("")
    b = result["popularity"]
    cells = [("–" if k not in b else f"{b[k]:.1f}" if k == "arp@10" else f"{b[k]:.4f}") for k, _ in COLUMNS]
    lines += ["## popularity baseline", "", f"| | {head} |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| popularity | {' | '.join(cells)} |", ""]
    return "\n".join(lines)


def plot(result: dict, label: str, path: Path) -> None:
    from .plots import new_figure

    panels = [
        ("ndcg@10", "test NDCG@10"),
        ("gini@10", "Gini@10 of item exposure"),
        ("long_tail@10", "long-tail share@10"),
        ("popcal_js@10", "popularity-calibration JS@10"),
    ]
    fig, axes = new_figure(len(panels), width=5.0, height=3.8, cols=4)
    for ax, (key, title) in zip(axes, panels):
        for mode, style in zip(MODES, ("o-", "s-")):
            pts = result["curves"][mode]
            ax.plot([p["lambda"] for p in pts], [p[key] for p in pts], style, label=mode)
        if key in result["popularity"]:
            ax.axhline(result["popularity"][key], color="grey", ls="--", lw=1, label="popularity")
        ax.set_xlabel("λ")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{label}: re-rank strength vs accuracy and exposure ({result['users']} test users)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnrec.benchmarks.rerank_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="model repository")
    p.add_argument("--name", required=True, help="model name (its newest valid version is measured)")
    p.add_argument("--data", type=Path, required=True, help="the interaction log the version was trained on")
    p.add_argument("--lambdas", default="0,0.25,0.5,0.75,1", help="comma-separated strengths (default: %(default)s)")
    add_curve_args(p)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = p.parse_args(argv)
    lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    return run_curve(
        args,
        "rerank",
        "rerank_curve",
        sys.argv[1:] if argv is None else argv,
        lambda: measure(args.repo, args.name, args.data, lambdas, args.threads),
        markdown,
        plot,
    )


if __name__ == "__main__":
    raise SystemExit(main())
