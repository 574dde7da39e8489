"""`attnrec quality`: stage-one (and served-pipeline) quality on standard datasets over seeds, beside published rows.

For each dataset and seed it runs `attnrec train` (defaults unless flags are passed through) as a
subprocess, alone, timing it and reading its peak RSS, then `attnrec evaluate --json` on the
version it published, and writes `quality-<date>.md` and `.json` into `--out`: per dataset our
rows (exact stage one and the served pipeline; mean ± sd over seeds, each seed too), the
popularity baseline, coverage, training time and memory, and the published numbers for that
file with their protocol. Every number uses the project's protocol (docs/architecture.md):
leave-one-out, full ranking over all items, seen items excluded; tuned on validation, reported on test.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Published numbers on exactly these files under this protocol, as (model, HR@10, NDCG@10, source).
PUBLISHED = {
    "Toys_and_Games.txt": {
        "protocol": "leave-one-out, full ranking over all items, seen items filtered",
        "source": "eSASRec benchmark, arXiv 2508.06450, table 'Amazon datasets' (see the data folder's README)",
        "rows": [
            ("SASRec+SS (sampled softmax, 1 block, dim 64, max length 50)", 0.0970, 0.0580),
            ("eSASRec", 0.0939, 0.0538),
            ("HSTU (recomputed)", 0.0778, 0.0450),
            ("S3Rec (reported)", 0.0700, 0.0376),
        ],
    },
}


def _run(cmd: list[str], log_path: Path) -> tuple[float, float]:
    """Run a command alone with its output in `log_path`; (wall seconds, the child's peak RSS in MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode} (log {log_path}):\n{tail}")
    # ru_maxrss of children is the largest of any child so far: meaningful when it grew.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, (peak if peak > before else before) / 1024


def run_one(name: str, data: Path, seed: int, work: Path, train_args: list[str], quiet: bool) -> dict:
    attnrec = [sys.executable, "-m", "attnrec", "-q"]
    repo, model = work / "repo", f"{name}-s{seed}"
    shutil.rmtree(repo / model, ignore_errors=True)
    train = [*attnrec, "train", "--data", str(data), "--out", str(repo), "--name", model, "--seed", str(seed)]
    if not quiet:
        print(f"[quality] {name} seed {seed}: training …", flush=True)
    wall, rss = _run([*train, *train_args], work / f"{model}-train.log")
    out = work / f"{model}-eval.json"
    evaluate = [*attnrec, "evaluate", "--repo", str(repo), "--name", model, "--data", str(data), "--json", str(out)]
    _run(evaluate, work / f"{model}-eval.log")
    report = json.loads(out.read_text())
    manifest = json.loads((repo / model / "1" / "manifest.json").read_text())
    if not quiet:
        print(f"[quality] {name} seed {seed}: test NDCG@10 {report['test']['ndcg@10']:.4f} ({wall:.0f}s)", flush=True)
    return {"seed": seed, "train_wall_s": wall, "train_peak_rss_mb": rss, "report": report, "manifest": manifest}


def _slim(run: dict) -> dict:
    return {**{k: v for k, v in run.items() if k != "manifest"}, "training": run["manifest"]["training"]}


def _rows(run: dict) -> dict[str, dict[str, float]]:
    pipe = run["report"]["pipeline"]
    rows = {"exact stage one": pipe["exact"]["test"], "FAISS top-k (ann)": pipe["ann"]["test"]}
    if "ranked" in pipe:
        rows["FAISS top-N + ranker"] = pipe["ranked"]["test"]
    rows["served pipeline"] = run["report"]["test"]
    rows["popularity baseline"] = run["report"]["baselines"]["popularity"]["test"]
    return rows


# Exposure fairness beside accuracy (definitions: export/ranking_metrics.py), as (report key, column).
EXPOSURE = (
    ("coverage@10", "coverage@10"),
    ("gini@10", "Gini@10"),
    ("long_tail@10", "long-tail@10"),
    ("popcal_js@10", "pop. calibration JS@10"),
)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(results: dict, machine: str, date: str, train_args: list[str]) -> str:
    lines = [
        f"# Quality on standard datasets ({date})",
        "",
        "Protocol (every row): leave-one-out by time (last item test, the one before validation), full ranking "
        "over all items, items the user already interacted with excluded; settings tuned on validation only, "
        "numbers on test. Our rows: mean ± sd over seeds (each seed below).",
        "",
        "Exposure over all test users' top 10: coverage@10 = share of the catalogue recommended to anyone; Gini@10 "
        "of how often each item is recommended (0 = equal exposure); long-tail@10 = share of the recommended slots "
        "outside the 20% most popular items; pop. calibration JS@10 = mean Jensen-Shannon divergence (base 2) "
        "between the head/mid/tail mix of each user's history and of their top 10 (0 = the same mix).",
        "",
        f"Machine: {machine}. Command: `attnrec quality` running `attnrec train "
        f"{' '.join(train_args) or '(defaults)'}` and `attnrec evaluate` per dataset and seed, one at a time.",
        "",
    ]
    for name, ds in results.items():
        runs = ds["runs"]
        lines += [f"## {name} (`{ds['data']}`)", ""]
        first = runs[0]["report"]
        lines.append(
            f"{first['protocol']['users_evaluated']} test users; seeds {', '.join(str(r['seed']) for r in runs)}."
        )
        head = " | ".join(label for _, label in EXPOSURE)
        lines += ["", f"| model | HR@10 | NDCG@10 | {head} |", "|---|---|---|" + "---|" * len(EXPOSURE)]
        per_row = [_rows(r) for r in runs]
        for row in per_row[0]:
            hr = [p[row]["hr@10"] for p in per_row]
            nd = [p[row]["ndcg@10"] for p in per_row]
            cells = []
            for key, _ in EXPOSURE:  # reports from before a figure existed lack it
                values = [p[row].get(key) for p in per_row]
                cells.append(_mean_sd(values) if None not in values else "–")
            lines.append(f"| attnrec: {row} | {_mean_sd(hr)} | {_mean_sd(nd)} | {' | '.join(cells)} |")
        published = PUBLISHED.get(Path(ds["data"]).name)
        if published:
            for model, hr, nd in published["rows"]:
                lines.append(f"| published: {model} | {hr:.4f} | {nd:.4f} |" + " – |" * len(EXPOSURE))
            lines += ["", f"Published rows: {published['source']}; protocol: {published['protocol']}."]
        else:
            lines += ["", "No published numbers for this exact file under this protocol are recorded here."]
        lines += [
            "",
            "| seed | test NDCG@10 exact | served | valid NDCG@10 (best epoch) | max_len | epochs | "
            "train wall s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r, rows in zip(runs, per_row):
            tr = r["manifest"]["training"]
            cfg = tr["config"]
            lines.append(
                f"| {r['seed']} | {rows['exact stage one']['ndcg@10']:.4f} | "
                f"{rows['served pipeline']['ndcg@10']:.4f} | "
                f"{tr['best_valid_ndcg10']:.4f} ({tr['best_epoch']}) | {cfg['max_len']} | {tr['epochs_run']} | "
                f"{r['train_wall_s']:.0f} | {r['train_peak_rss_mb']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    datasets = {}
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--data {spec!r}: expected NAME=PATH, e.g. toys=Toys_and_Games.txt")
        if not Path(path).is_file():
            raise SystemExit(f"--data {spec!r}: {path} is not a file")
        datasets[name] = Path(path)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    date = args.date or _dt.date.today().isoformat()
    load = os.getloadavg()
    machine = f"{os.cpu_count()} cores, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    if args.note:
        machine += f"; {args.note}"
    results = {}
    for name, path in datasets.items():
        runs = [run_one(name, path, seed, work, args.train_args, args.quiet) for seed in seeds]
        results[name] = {"data": str(path), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"quality-{date}.md", args.out / f"quality-{date}.json"
    md.write_text(markdown(results, machine, date, args.train_args))
    slim = {
        n: {
            "data": d["data"],
            "runs": [
                {**{k: v for k, v in r.items() if k != "manifest"}, "training": r["manifest"]["training"]}
                for r in d["runs"]
            ],
        }
        for n, d in results.items()
    }
    js.write_text(
        json.dumps({"date": date, "machine": machine, "train_args": args.train_args, "datasets": slim}, indent=2)
    )
    print(f"wrote {md} and {js}")
    return 0


def _quality(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a dataset to train and evaluate on, as NAME=PATH (any format `attnrec train` reads); repeatable",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report folder (default: %(default)s)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".cache/quality"),
        help="where the trained versions and the runs' logs go (default: %(default)s)",
    )
    p.add_argument("--date", help="date in the file names (default: today)")
    p.add_argument("--note", default="", help="a line recorded with the machine")
    p.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after `--`: flags passed to every `attnrec train` run (default: none, the training defaults)",
    )
    p.set_defaults(func=_run_quality)


def _run_quality(args: argparse.Namespace) -> int:
    args.train_args = [a for a in args.train_args if a != "--"]
    return run(args)


COMMANDS = {"quality": _quality}  # for attnrec/cli.py
