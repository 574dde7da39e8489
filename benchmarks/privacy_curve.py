"""The privacy / accuracy trade-off: test NDCG@10 of user-level DP-SGD training at several epsilons.

    python -m attnrec.benchmarks.privacy_curve --data LOG [--epsilons 1,4,8,inf] [--seeds 0,1,2]
        [--label ml-100k] [--out benchmarks/results] [-- TRAIN FLAGS, e.g. --dim 64 --lr 0.003]

For each epsilon and seed: export/dp_train.py's `train_dp` (what `attnrec train --dp-epsilon` runs)
on the leave-one-out split, then the exact full ranking of every test user (seen items excluded) by
the trained encoder; epsilon `inf` is the same loop with clipping and no noise. The popularity ranking
is scored beside them. Writes `privacy-<label>-<date>.md`, `.json` and `.png` into `--out`.
Trailing flags are `attnrec train`'s model/training and `--dp-*` flags (all but --dp-epsilon).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .report import add_curve_args, run_curve


def _configs(train_flags: list[str]):
    """TrainConfig and the PrivacyConfig (at epsilon inf, replaced per run) from `attnrec train` flags (its own
    parser, `attnrec train`'s own builders)."""
    from attnrec.export.cli.train import _add_privacy_args, _add_train_args, _privacy_config, _train_config

    p = argparse.ArgumentParser(prog="train flags")
    _add_train_args(p)
    _add_privacy_args(p)
    args = p.parse_args(train_flags)
    return _train_config(args), _privacy_config(args, epsilon=math.inf)


def measure(data: Path, epsilons: list[float], seeds: list[int], train_flags: list[str], quiet: bool) -> dict:
    import dataclasses

    from attnrec.export.data.readers import read_interactions
    from attnrec.export.data.sequences import build_sequences, leave_one_out
    from attnrec.export.dp_train import train_dp
    from attnrec.export.evaluate import evaluate_query_fn
    from attnrec.export.train import validate

    split = leave_one_out(build_sequences(read_interactions(data)))
    cfg, privacy = _configs(train_flags)
    pop = split.train_popularity()[1:].astype(np.float64)
    everyone = np.arange(len(split.test))
    runs = []
    for eps in epsilons:
        for seed in seeds:
            t0 = time.perf_counter()
            run_cfg, run_privacy = dataclasses.replace(cfg, seed=seed), dataclasses.replace(privacy, epsilon=eps)
            result, section = train_dp(split, run_cfg, run_privacy, progress=not quiet)
            test = validate(result.model, split, everyone, pop, which="test")
            run = {
                "epsilon_target": eps if math.isfinite(eps) else None,
                "seed": seed,
                "test": test,
                "privacy": section.to_dict(),
                "config": asdict(result.config),
                "history": result.history,
                "seconds": time.perf_counter() - t0,
            }
            runs.append(run)
            spent = "inf" if section.epsilon is None else f"{section.epsilon:.3f}"
            print(
                f"[privacy] epsilon {eps:g} seed {seed}: test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hr@10']:.4f} "
                f"(epsilon spent {spent}, sigma {section.noise_multiplier:.3f}, {run['seconds']:.0f}s)",
                flush=True,
            )
    popularity = evaluate_query_fn(
        lambda h: np.ones((len(h), 1), np.float32), pop.astype(np.float32)[:, None], split, progress=False
    )["test"]
    return {"users": len(split.test), "runs": runs, "popularity": popularity}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _by_epsilon(result: dict) -> dict:
    groups: dict = {}
    for r in result["runs"]:
        groups.setdefault(r["epsilon_target"], []).append(r)
    return groups


def markdown(result: dict, label: str, date: str, command: str, machine: str) -> str:
    first = result["runs"][0]
    cfg, priv = first["config"], first["privacy"]
    lines = [
        f"# User-level DP-SGD on {label} ({date})",
        "",
        f"Command: `{command}`. Machine: {machine}.",
        "",
        f"{result['users']} test users; leave-one-out, exact full ranking by the encoder, seen items excluded. "
        f"Training (every row): dim {cfg['dim']}, {cfg['n_blocks']} blocks, max_len {cfg['max_len']}, lr {cfg['lr']}, "
        f"full softmax; {priv['steps']} steps at sampling rate q = {priv['sample_rate']:.4f} "
        f"over {priv['users']} users, "
        f"clip norm C = {priv['max_grad_norm']}, delta = {priv['delta']:.3g}, {priv['accountant']} accountant. "
        "epsilon inf = the same loop with clipping and no noise. Fixed length, last weights (no early stopping).",
        "",
        "| epsilon (target) | epsilon spent | noise multiplier | seeds | test NDCG@10 | test HR@10 |",
        "|---|---|---|---|---|---|",
    ]
    for eps, runs in _by_epsilon(result).items():
        spent = [r["privacy"].get("epsilon") for r in runs]
        spent_s = "∞" if spent[0] is None else f"{max(spent):.3f}"
        lines.append(
            f"| {'∞' if eps is None else f'{eps:g}'} | {spent_s} | {runs[0]['privacy']['noise_multiplier']:.3f} | "
            f"{','.join(str(r['seed']) for r in runs)} | {_mean_sd([r['test']['ndcg@10'] for r in runs])} | "
            f"{_mean_sd([r['test']['hr@10'] for r in runs])} |"
        )
    b = result["popularity"]
    lines += [f"| popularity baseline | – | – | – | {b['ndcg@10']:.4f} | {b['hr@10']:.4f} |", ""]
    lines += [
        "Per run:",
        "",
        "| epsilon | seed | test NDCG@10 | last valid NDCG@10 | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        eps = "∞" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
        lines.append(
            f"| {eps} | {r['seed']} | {r['test']['ndcg@10']:.4f} | {r['history'][-1]['valid_ndcg@10']:.4f} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, label: str, path: Path) -> None:
    from .plots import new_figure

    fig, (ax,) = new_figure(1, width=6.0, height=4.2)
    groups = _by_epsilon(result)
    finite = sorted(e for e in groups if e is not None)
    xs = finite + ([max(finite) * 2 if finite else 1.0] if None in groups else [])
    keys = finite + ([None] if None in groups else [])
    means = [statistics.mean(r["test"]["ndcg@10"] for r in groups[k]) for k in keys]
    sds = [statistics.stdev([r["test"]["ndcg@10"] for r in groups[k]]) if len(groups[k]) > 1 else 0.0 for k in keys]
    ax.errorbar(xs, means, yerr=sds, fmt="o-", capsize=3, label="DP-SGD (user level)")
    ax.axhline(result["popularity"]["ndcg@10"], color="grey", ls="--", label="popularity")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{k:g}" for k in finite] + (["∞ (no noise)"] if None in groups else []))
    ax.set_xlabel("epsilon")
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"{label}: privacy vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, _, train_flags = (
        (argv[: argv.index("--")], None, argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None, [])
    )
    p = argparse.ArgumentParser(prog="python -m attnrec.benchmarks.privacy_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="interaction log (any format `attnrec train` reads)")
    p.add_argument(
        "--epsilons", default="1,4,8,inf", help="comma-separated targets; inf = no noise (default: %(default)s)"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    add_curve_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(own)
    epsilons = [float(x) for x in args.epsilons.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    return run_curve(
        args,
        "privacy",
        "privacy_curve",
        argv,
        lambda: measure(args.data, epsilons, seeds, train_flags, args.quiet),
        markdown,
        plot,
    )


if __name__ == "__main__":
    raise SystemExit(main())
