"""Which ranker feature group buys what: one encoder per seed, one ranker per feature group on it.

    python -m attnrec.benchmarks.ranker_ablation --data NAME=PATH [--item-features F] [--user-features F] \
        --seeds 0,1,2 --groups none,item,user,time,cf,time+trend,item+user+time+cf+trend [--train-args "..."]
        [--export-args "..."]

Per dataset and seed: `attnrec train --no-ranker` trains and publishes the encoder (its checkpoint is
the one every ranker of that seed is trained on); then, per group, `attnrec export --checkpoint` with
`--ranker-features GROUP` ("+" joins groups, "none" = ids only) publishes a version with that ranker,
evaluated by the publishing code on the same users as `attnrec evaluate` (its manifest's
`metrics.pipeline`). Only the ranker differs between a seed's groups: the encoder, index tuning
queries and evaluation users are the same. Writes `ranker-<date>.md` and `.json` into `--out`: per
seed and group the exact stage one's and the served pipeline's (FAISS top-N + ranker) test NDCG@10,
their ratio, whether the ranker shipped as the identity (best epoch 0: no epoch beat stage one's
validation NDCG@10), the ranker's validation NDCG@10 and its onnxruntime latency at batch 1 (200
candidates, history 200, features on, measured at export); and the mean over seeds per group.
Runs in this process, one step after another, through `attnrec.cli.main`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import statistics
import time
from pathlib import Path

from attnrec.export.config import FEATURE_GROUPS as GROUPS


def parse_groups(spec: str) -> list[str]:
    """ "none,item,item+user+time" → ["none", "item", "item+user+time"], each group checked."""
    out = []
    for g in (x.strip() for x in spec.split(",")):
        if not g:
            continue
        parts = [p.strip() for p in g.split("+")]
        bad = [p for p in parts if p not in GROUPS and not (p == "none" and len(parts) == 1)]
        if bad:
            raise ValueError(f"--groups {spec!r}: {bad} not among none, {', '.join(GROUPS)} (join with '+')")
        out.append(g)
    if not out:
        raise ValueError("--groups names no group")
    return out


def _cli(argv: list[str]) -> None:
    from attnrec.cli import main

    code = main(["-q", *argv])
    if code != 0:
        raise RuntimeError(f"attnrec {' '.join(argv)} exited with {code}")


def _manifest(repo: Path, name: str) -> dict:
    from attnrec.engine.repository import newest_valid_version

    version_dir, _ = newest_valid_version(repo, name)
    return json.loads((Path(version_dir) / "manifest.json").read_text())


def run_seed(
    name: str,
    data: Path,
    seed: int,
    groups: list[str],
    work: Path,
    *,
    features: list[str],
    train_args: list[str],
    export_args: list[str],
    quiet: bool = True,
) -> dict:
    """One encoder and one ranker per group; the rows of this seed."""
    repo = work / "repo"
    encoder = f"{name}-s{seed}"
    for stale in [encoder, *(f"{encoder}-{g}" for g in groups)]:
        shutil.rmtree(repo / stale, ignore_errors=True)
    source = ["--data", str(data), *features]
    t = time.perf_counter()
    _cli(["train", *source, "--out", str(repo), "--name", encoder, "--seed", str(seed), "--no-ranker", *train_args])
    train_s = time.perf_counter() - t
    base = _manifest(repo, encoder)
    checkpoint = base["training"]["checkpoint"]
    if not quiet:
        print(f"[ablation] {name} seed {seed}: encoder trained ({train_s:.0f}s)", flush=True)
    rows = []
    for g in groups:
        t = time.perf_counter()
        ranker = ["--ranker-features", "none" if g == "none" else g.replace("+", ",")]
        out = ["--out", str(repo), "--name", f"{encoder}-{g}"]
        _cli(["export", "--checkpoint", checkpoint, *source, *out, *ranker, *export_args])
        m = _manifest(repo, f"{encoder}-{g}")
        pipe, rk = m["metrics"]["pipeline"], m["ranker"]
        exact, served = pipe["exact"]["test"]["ndcg@10"], pipe["ranked"]["test"]["ndcg@10"]
        batch1 = next(s for s in rk["speed_cpu"] if s["batch"] == 1)
        rows.append(
            {
                "seed": seed,
                "group": g,
                "exact_test_ndcg10": exact,
                "ann_test_ndcg10": pipe["ann"]["test"]["ndcg@10"],
                "served_test_ndcg10": served,
                "ratio": served / exact if exact else float("nan"),
                "identity": rk["training"]["best_epoch"] == 0,
                "best_epoch": rk["training"]["best_epoch"],
                "ranker_valid_ndcg10": rk["training"]["best_valid_ndcg10"],
                # the best trained epoch, also when its gain was not significant and stage one shipped
                "rejected_epoch": rk["training"].get("rejected_epoch", 0),
                "valid_gain_z": rk["training"].get("valid_gain_z"),
                "trained_valid_ndcg10": _trained_valid(rk["training"]),
                "stage1_valid_ndcg10": rk["training"]["stage1_valid_ndcg10"],
                "ranker_inputs": list(rk["inputs"]),
                "ranker_features": rk["features"],
                "ranker_ms_batch1": batch1["ms"],
                "ranker_ms_batch1_case": {k: batch1[k] for k in ("length", "candidates")},
                "stage1_recall": pipe["stage1_recall"]["test"],
                "export_s": time.perf_counter() - t,
            }
        )
        if not quiet:
            r = rows[-1]
            print(
                f"[ablation] {name} seed {seed} {g}: exact {exact:.4f}, served {served:.4f} "
                f"({r['ratio']:.3f}x){' identity' if r['identity'] else ''}, ranker {r['ranker_ms_batch1']:.3f} ms",
                flush=True,
            )
    return {
        "seed": seed,
        "train_s": train_s,
        "encoder_valid_ndcg10": base["training"]["best_valid_ndcg10"],
        "rows": rows,
    }


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _trained_valid(training: dict) -> float:
    """The validation NDCG@10 of the best trained epoch (the shipped one, or the one rejected as not significant)."""
    epoch = training.get("rejected_epoch") or training["best_epoch"]
    return next(
        (h["valid_ndcg@10"] for h in training.get("history", ()) if h["epoch"] == epoch),
        training["best_valid_ndcg10"],
    )


def _epoch(row: dict) -> str:
    rejected = row.get("rejected_epoch", 0)
    return f"{row['best_epoch']} ({rejected} rejected)" if rejected else str(row["best_epoch"])


def _z(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    lines = [
        f"# Ranker feature ablation ({report['date']})",
        "",
        "Protocol: leave-one-out by time, full ranking over all items for the exact row, the served pipeline "
        "(FAISS top-N re-ordered by the ranker) for the served row, seen items excluded; test NDCG@10. One encoder "
        "per seed (`attnrec train --no-ranker`), one ranker per feature group on that checkpoint (`attnrec export "
        "--checkpoint --ranker-features GROUP`). Identity: no ranker epoch beat stage one on validation by "
        "`--ranker-min-gain-z` standard errors of the paired per-user gain (z; the best epoch, rejected when below, "
        "in brackets), so the shipped ranker is stage one's order. Ranker ms: onnxruntime, batch 1, 200 "
        "candidates, history 200, features on, measured at export on this (shared) machine.",
        "",
        f"Machine: {report['machine']}. Train args: `{' '.join(report['train_args']) or '(defaults)'}`; export "
        f"args: `{' '.join(report['export_args']) or '(defaults)'}`.",
        "",
    ]
    for name, ds in report["datasets"].items():
        lines += [f"## {name} (`{ds['data']}`)", ""]
        if ds["features"]:
            lines += [f"Feature files: `{' '.join(ds['features'])}`.", ""]
        lines += [
            "| group | exact | served | served / exact | identity (seeds) | ranker ms (batch 1) |",
            "|---|---|---|---|---|---|",
        ]
        rows = [r for s in ds["seeds"] for r in s["rows"]]
        for g in ds["groups"]:
            mine = [r for r in rows if r["group"] == g]
            exact = [r["exact_test_ndcg10"] for r in mine]
            served = [r["served_test_ndcg10"] for r in mine]
            ratio = statistics.mean(served) / statistics.mean(exact) if statistics.mean(exact) else float("nan")
            ident = sum(r["identity"] for r in mine)
            ms = [r["ranker_ms_batch1"] for r in mine]
            lines.append(
                f"| {g} | {_mean_sd(exact)} | {_mean_sd(served)} | {ratio:.3f} | {ident} of {len(mine)} | "
                f"{_mean_sd(ms, 3)} |"
            )
        lines += [
            "",
            "| seed | group | exact | served | ratio | identity | best epoch | valid: stage one → ranker (trained) | "
            "gain z | ranker ms | ranker inputs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['seed']} | {r['group']} | {r['exact_test_ndcg10']:.4f} | {r['served_test_ndcg10']:.4f} | "
                f"{r['ratio']:.3f} | {'yes' if r['identity'] else 'no'} | {_epoch(r)} | "
                f"{r['stage1_valid_ndcg10']:.4f} → {r['ranker_valid_ndcg10']:.4f} "
                f"({r.get('trained_valid_ndcg10', r['ranker_valid_ndcg10']):.4f}) | {_z(r.get('valid_gain_z'))} | "
                f"{r['ranker_ms_batch1']:.3f} | "
                f"{', '.join(r['ranker_inputs'])} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> Path:
    groups = parse_groups(args.groups)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    features = []
    for flag, path in (("--item-features", args.item_features), ("--user-features", args.user_features)):
        if path is not None:
            if not path.is_file():
                raise SystemExit(f"{flag} {path}: not a file")
            features += [flag, str(path)]
    datasets = {}
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--data {spec!r}: expected NAME=PATH, e.g. synth=log.parquet")
        if not Path(path).is_file():
            raise SystemExit(f"--data {spec!r}: {path} is not a file")
        datasets[name] = Path(path)
    date = args.date or _dt.date.today().isoformat()
    load = os.getloadavg()
    machine = f"{os.cpu_count()} cores, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    if args.note:
        machine += f"; {args.note}"
    train_args, export_args = shlex.split(args.train_args), shlex.split(args.export_args)
    report = {"date": date, "machine": machine, "train_args": train_args, "export_args": export_args, "datasets": {}}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name, path in datasets.items():
        runs = [
            run_seed(
                name,
                path,
                seed,
                groups,
                args.work_dir,
                features=features,
                train_args=train_args,
                export_args=export_args,
                quiet=args.quiet,
            )
            for seed in seeds
        ]
        report["datasets"][name] = {"data": str(path), "features": features, "groups": groups, "seeds": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"ranker-{date}.md", args.out / f"ranker-{date}.json"
    md.write_text(markdown(report))
    js.write_text(json.dumps(report, indent=2))
    print(f"wrote {md} and {js}")
    return js


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m attnrec.benchmarks.ranker_ablation",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an interaction log (any format `attnrec train` reads) as NAME=PATH; repeatable",
    )
    p.add_argument("--item-features", type=Path, help="item side-feature file for every dataset (attnrec train's)")
    p.add_argument("--user-features", type=Path, help="user side-feature file for every dataset (attnrec train's)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument(
        "--groups",
        default="none,item,user,time,cf,time+trend,item+user+time+cf+trend",
        help="comma-separated ranker feature groups, '+' joining several; none = ids only (default: %(default)s)",
    )
    p.add_argument("--train-args", default="", help="extra `attnrec train` flags for the encoders, one string")
    p.add_argument("--export-args", default="", help="extra `attnrec export` flags for the rankers (--ranker-...)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report folder (default: %(default)s)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".cache/ranker-ablation"),
        help="model repository and checkpoints (default: %(default)s)",
    )
    p.add_argument("--date", help="date in the report's name (default: today)")
    p.add_argument("--note", default="", help="a note on the machine, for the report")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
