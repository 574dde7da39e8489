"""`attnrec demo`: the whole offline path on embedded synthetic data, in about 90 seconds on 2 cores.

Generates a log, trains a small SASRec and a ranker on its FAISS candidates, evaluates the
three rows (exact, FAISS, FAISS + ranker), publishes a repository version, then answers a few
example users through the serving pipeline (ONNX encoder + FAISS + ranker, no torch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


def run_demo(out: Path, *, n_users: int = 3000, n_items: int = 2000, seed: int = 0, quiet: bool = False) -> int:
    from attnrec.engine.pipeline import Pipeline
    from attnrec.engine.repository import DataSection, TrainingSection

    from .config import RankerConfig, TrainConfig
    from .data.sequences import build_sequences, leave_one_out
    from .data.synthetic import SyntheticConfig, generate, write
    from .evaluate import load_item_ids, print_report
    from .publish import publish
    from .train import train

    console = Console()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "synthetic.parquet"
    log_ = generate(SyntheticConfig(n_users=n_users, n_items=n_items, mean_length=30, seed=seed))
    write(log_, data_path)
    data = build_sequences(log_)
    split = leave_one_out(data)
    console.print(
        f"[bold]1/4 data[/] {len(log_):,} synthetic interactions, {data.n_users} users, {data.n_items} items "
        f"→ {data_path}"
    )

    # A fixed epoch count, no early stop and no time budget: two runs print the same numbers on any
    # machine (a budget would stop a loaded machine earlier); the best validation epoch is exported.
    cfg = TrainConfig(
        max_len=50,
        dim=64,
        n_blocks=2,
        n_heads=1,
        dropout=0.2,
        batch_size=128,
        epochs=15,
        patience=15,
        length_batches=True,  # 80 s instead of 133 s on 2 cores; the demo's numbers are no protocol row
        seed=seed,
    )
    console.print(
        "[bold]2/4 training[/] SASRec, softmax cross-entropy (the loss chosen for the catalogue's size, logged), "
        "the best validation NDCG@10 epoch kept"
    )
    # the demo always starts over: a checkpoint of an earlier demo in the same folder is overwritten
    result = train(split, cfg, checkpoint=out / "checkpoint.pt", fresh=True, progress=not quiet)

    console.print(
        "[bold]3/4 export[/] ONNX encoder (verified against torch) + FAISS index + target-attention ranker "
        "(trained on the index's candidates, verified) + evaluation"
    )
    # No hold-out encoder (a second training): the demo keeps to its time; its numbers are no protocol row.
    ranker = RankerConfig(n_candidates=100, samples_per_user=3, epochs=6, patience=2, holdout=0, seed=seed)
    repo = out / "repo"
    version_dir, manifest, metrics = publish(
        result.model,
        split,
        repo,
        "demo",
        seed=seed,
        ranker=ranker,
        progress=not quiet,
        training=TrainingSection(
            config=asdict(result.config),
            best_epoch=result.best_epoch,
            epochs_run=result.epochs_run,
            train_seconds=result.seconds,
            history=tuple(result.history),
        ),
        data=DataSection(
            source=str(data_path),
            synthetic=True,
            users=data.n_users,
            items=data.n_items,
            interactions=len(log_),
        ),
    )
    print_report(metrics, console)

    console.print(f"[bold]4/4 serving pipeline[/] {version_dir}: onnxruntime + FAISS + ranker (no torch)")
    pipeline = Pipeline.load(version_dir)
    item_ids = load_item_ids(version_dir, manifest)
    table = Table(title="example recommendations (test users: full history → top 5, seen items excluded)")
    for col in ("user", "last 5 items of history", "top 5", "held-out next item", "hit"):
        table.add_column(col)
    for j in range(min(5, len(split.test))):
        hist = split.test.history(j) - 1  # catalogue rows
        rows = pipeline.recommend([hist], 5, exclude=[hist]).rows[0]
        target = split.test.targets[j] - 1
        table.add_row(
            str(data.user_ids[split.test.users[j]]),
            " ".join(map(str, item_ids[hist[-5:]])),
            " ".join(map(str, item_ids[rows])),
            str(item_ids[target]),
            "✓" if target in rows else "",
        )
    console.print(table)
    rows = metrics["pipeline"]
    pop = metrics["baselines"]["popularity"]["test"]
    console.print(
        f"test NDCG@10: exact {rows['exact']['test']['ndcg@10']:.4f}, FAISS {rows['ann']['test']['ndcg@10']:.4f}, "
        f"FAISS + ranker {rows['ranked']['test']['ndcg@10']:.4f}, popularity {pop['ndcg@10']:.4f}; "
        f"repository: {repo}; total {time.perf_counter() - t0:.0f}s"
    )
    return 0
