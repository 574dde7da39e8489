"""The ceiling of a second stage on the synthetic generator: stage one's candidates re-ordered by the
generator's TRUE next-item probabilities (export/data/synthetic.py `NextItemTruth`).

    python -m attnrec.benchmarks.synthetic_oracle --repo REPO --name NAME [--version V] \\
        --users 2000 --items 1000 --mean-length 20 --categories 12 --stay-prob 0.5 --context-rate 1.0 \\
        [--json OUT]

The generator flags are `attnrec synth`'s: the log is regenerated from them (bit for bit the file
`attnrec synth` wrote), and every evaluated target is checked against it, so a version trained on
another log is an error, not a wrong number. Protocol (docs/DESIGN.md): leave-one-out by time, full
ranking, seen items excluded, the same users for every row. Rows, valid and test:

- exact / ann / served: `attnrec evaluate`'s three (encoder full ranking; FAISS top-k; FAISS top-N
  re-ordered by the version's ranker, or top-k again without one);
- oracle (candidates): the served FAISS top-N, same N, re-ordered by the true probability: what a
  perfect ranker could reach with these candidates;
- oracle (full): every unseen catalogue item by the true probability: the ceiling of any model.

The oracle knows what no model can see (the walk's state under noise, the user's home topics), so
it is an upper bound, not a target a ranker should be expected to meet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KS = (10,)


def ndcg_of_order(scores: np.ndarray, rows: np.ndarray, targets: np.ndarray, k: int = 10) -> np.ndarray:
    """Per list, NDCG@k (one relevant item) of `rows` (E, N) re-ordered by `scores` (E, N), highest
    first, ties in the given order; slots with row < 0 are empty (never ranked). 0 when the target is
    not in the top k (or not among the rows)."""
    scores = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(rows, order, axis=1)
    top = np.where(np.take_along_axis(scores, order, axis=1) > -np.inf, top, -1)
    hit = top == np.asarray(targets)[:, None]
    rank = hit.argmax(axis=1)
    return np.where(hit.any(axis=1), 1.0 / np.log2(rank + 2.0), 0.0)


def _true_probabilities(truth, split, es, back: int, hour_known: bool = True) -> np.ndarray:
    """(E, catalogue rows) true probability of every row for each target of `es` (`back` = 1 for the
    validation targets, 0 for test), after checking each target against the regenerated log."""
    data = split.data
    users = np.asarray(data.user_ids[es.users], dtype=np.int64) - 1  # external ids 1..n_users
    if users.min() < 0 or users.max() >= len(truth.lengths):
        raise ValueError("the version's users are not this generator's (flags differ from `attnrec synth`'s)")
    steps = truth.lengths[users] - 1 - back
    offsets = np.concatenate([[0], np.cumsum(truth.lengths)[:-1]])
    hist_len = np.diff(es.hist_offsets)
    expected = truth.log.item[offsets[users] + steps]
    if not (np.array_equal(hist_len, steps) and np.array_equal(data.item_ids[es.targets], expected)):
        raise ValueError("the version's log is not this generator's output (flags differ from `attnrec synth`'s)")
    probs = truth.next_item_probabilities(users, steps, hour_known=hour_known)  # column j: external id j + 1
    return probs[:, np.asarray(data.item_ids[1:], dtype=np.int64) - 1]


def oracle_rows(pipeline, truth, split, n: int) -> dict[str, dict[str, dict[str, float]]]:
    """{"oracle (candidates)", "oracle (full)", and with attributes "oracle (candidates, hour unknown)"}
    → {valid, test} → ndcg@10, hr@10. Without the hour, the oracle is the best any model could do
    without time features: the part of the oracle's gain only time can buy is the difference."""
    names = ["oracle (candidates)", "oracle (full)"] + (["oracle (candidates, hour unknown)"] * bool(truth.context))
    out: dict[str, dict] = {name: {} for name in names}
    for which, es, back in (("valid", split.valid, 1), ("test", split.test, 0)):
        probs = _true_probabilities(truth, split, es, back)
        blind = _true_probabilities(truth, split, es, back, hour_known=False) if truth.context else None
        targets = es.targets - 1  # tokens → rows
        cand_gain, full_gain, blind_gain = [], [], []
        for s in range(0, len(es), 256):
            j = np.arange(s, min(s + 256, len(es)))
            hist = [es.history(i) - 1 for i in j]
            rows = pipeline.recommend(hist, n, exclude=hist, rank=False).rows
            p = probs[j]
            cand_gain.append(ndcg_of_order(np.take_along_axis(p, rows.clip(0), axis=1), rows, targets[j]))
            if blind is not None:
                blind_gain.append(ndcg_of_order(np.take_along_axis(blind[j], rows.clip(0), axis=1), rows, targets[j]))
            seen = p.copy()
            for r, h in enumerate(hist):
                seen[r, h] = -np.inf
            full = np.broadcast_to(np.arange(p.shape[1]), p.shape)
            full_gain.append(ndcg_of_order(seen, np.where(np.isfinite(seen), full, -1), targets[j]))
        for name, gains in zip(names, (cand_gain, full_gain, blind_gain)):
            g = np.concatenate(gains)
            out[name][which] = {"ndcg@10": float(g.mean()), "hr@10": float((g > 0).mean())}
    return out


def measure(
    repo: Path, name: str, config, *, version: int | None = None, threads: int = 1, data: Path | None = None
) -> dict:
    """The rows of `report` for version `version` (default: newest valid) of REPO/NAME, trained on the log
    of generator `config` (checked against the version's user and interaction counts, and against the
    file `data` bit for bit when given)."""
    from attnrec.engine.pipeline import Pipeline, RuntimeOptions
    from attnrec.engine.repository import resolve_version
    from attnrec.export.data.sequences import build_sequences, leave_one_out
    from attnrec.export.data.synthetic import next_item_truth
    from attnrec.export.evaluate import evaluate_pipeline, load_item_ids, load_item_vectors

    truth = next_item_truth(config)
    version_dir, manifest = resolve_version(repo, name, version)
    recorded = (manifest.data.users, manifest.data.interactions)
    if recorded != (config.n_users, len(truth.log)):
        raise ValueError(
            f"{version_dir} was trained on {recorded[0]} users and {recorded[1]} interactions, this generator's "
            f"log has {config.n_users} and {len(truth.log)}: give the flags its `attnrec synth` was given"
        )
    if data is not None:
        from attnrec.export.data.readers import read_interactions

        given = read_interactions(data, "auto")
        same = all(np.array_equal(getattr(given, c), getattr(truth.log, c)) for c in ("user", "item", "timestamp"))
        if not same:
            raise ValueError(f"{data} is not this generator's log: give the flags its `attnrec synth` was given")
    split = leave_one_out(build_sequences(truth.log, item_vocab=load_item_ids(version_dir, manifest)))
    pipeline = Pipeline.load(version_dir, RuntimeOptions(intra_op_threads=threads))
    result = evaluate_pipeline(pipeline, load_item_vectors(version_dir, manifest), split, progress=False)
    pipe = result["pipeline"]
    n = pipe["n_candidates"]
    rows = {"exact": pipe["exact"], "ann": pipe["ann"], "served": pipe.get("ranked", pipe["ann"])}
    rows.update(oracle_rows(pipeline, truth, split, n))
    metrics = {r: {w: {k: m[w][k] for k in ("ndcg@10", "hr@10")} for w in ("valid", "test")} for r, m in rows.items()}
    return {
        "model": {"repo": str(repo), "name": name, "version": manifest.version, "served": pipe["served"]},
        "generator": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "n_candidates": n,
        "stage1_recall": pipe[f"stage1_recall@{n}"],
        "users": len(split.test),
        "rows": metrics,
    }


def report(result: dict) -> str:
    rows, n = result["rows"], result["n_candidates"]
    lines = [
        "| row | valid NDCG@10 | test NDCG@10 | valid / exact | test / exact | test HR@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        ratio = [m[w]["ndcg@10"] / max(rows["exact"][w]["ndcg@10"], 1e-12) for w in ("valid", "test")]
        lines.append(
            f"| {name} | {m['valid']['ndcg@10']:.4f} | {m['test']['ndcg@10']:.4f} | {ratio[0]:.3f} | {ratio[1]:.3f} "
            f"| {m['test']['hr@10']:.4f} |"
        )
    rec = result["stage1_recall"]
    lines.append(
        f"\n{result['users']} users; stage one recall@{n}: valid {rec['valid']:.4f}, test {rec['test']:.4f}; "
        f"served: {result['model']['served']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from attnrec.export.cli.data import add_generator_args, synthetic_config

    p = argparse.ArgumentParser(
        prog="python -m attnrec.benchmarks.synthetic_oracle",
        description="Oracle NDCG@10 of the synthetic generator's true next-item probabilities against a "
        "version's exact, FAISS and served rows (the generator flags are the ones `attnrec synth` was given)",
    )
    p.add_argument("--repo", type=Path, required=True, help="model repository")
    p.add_argument("--name", required=True, help="model name inside the repository")
    p.add_argument("--version", type=int, help="version (default: the newest valid one)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default: 1)")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.add_argument(
        "--data", type=Path, help="the log `attnrec synth` wrote: checked to be the regenerated one, bit for bit"
    )
    add_generator_args(p)
    args = p.parse_args(argv)
    cfg = synthetic_config(args)
    result = measure(args.repo, args.name, cfg, version=args.version, threads=args.threads, data=args.data)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
