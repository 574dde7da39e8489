"""`attnrec quality`: trains and evaluates per dataset and seed and writes the table beside published rows."""

import json
import subprocess
import sys

import numpy as np

from attnrec.export.data.synthetic import SyntheticConfig, generate

TINY = ["--epochs", "1", "--max-len", "10", "--dim", "8", "--n-blocks", "1", "--ffn-dim", "16", "--no-ranker"]


def test_quality_table_has_our_rows_the_published_ones_and_the_evaluated_numbers(tmp_path):
    log = generate(SyntheticConfig(n_users=120, n_items=60, mean_length=8, seed=3))
    # The published rows are keyed by the file's name: write the synthetic log in that file's layout.
    data = tmp_path / "Toys_and_Games.txt"
    order = np.lexsort((log.timestamp, log.user))
    lines = {}
    for u, i in zip(log.user[order], log.item[order]):
        lines.setdefault(int(u), []).append(str(int(i)))
    data.write_text("".join(f"{u} {' '.join(items)}\n" for u, items in lines.items()))
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "-m", "attnrec", "-q", "quality", "--data", f"toys={data}", "--seeds", "0,1"]
    cmd += ["--out", str(out), "--work-dir", str(work), "--date", "2026-01-02", "--", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    md = (out / "quality-2026-01-02.md").read_text()
    summary = json.loads((out / "quality-2026-01-02.json").read_text())
    runs = summary["datasets"]["toys"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert summary["train_args"] == TINY
    # the table's mean ± sd are those of the evaluate reports it ran
    exact = [r["report"]["pipeline"]["exact"]["test"] for r in runs]
    cells = [np.array([e[m] for e in exact]) for m in ("hr@10", "ndcg@10")]
    cells += [np.array([e[m] for e in exact]) for m in ("coverage@10", "gini@10", "long_tail@10", "popcal_js@10")]
    row = " | ".join(f"{c.mean():.4f} ± {c.std(ddof=1):.4f}" for c in cells)
    assert f"| attnrec: exact stage one | {row} |" in md
    assert "| published: SASRec+SS (sampled softmax, 1 block, dim 64, max length 50) | 0.0970 | 0.0580 |" in md
    assert "popularity baseline" in md and "leave-one-out" in md
    for r in runs:
        assert r["train_wall_s"] > 0 and r["train_peak_rss_mb"] > 50
        assert r["training"]["config"]["max_len"] == 10 and r["training"]["epochs_run"] == 1


def test_quality_refuses_a_malformed_dataset_argument(tmp_path):
    cmd = [sys.executable, "-m", "attnrec", "quality", "--data", "no-equals-sign", "--work-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "expected NAME=PATH" in done.stderr
