"""Ranker latency in onnxruntime: N candidates scored against an L-item history, per batch size.

    python -m attnrec.benchmarks.ranker_speed REPO_DIR/MODEL_NAME/VERSION [--threads 1] [--batches 1,64]

Feeds random tokens and hidden states of the version's shapes (the cost does not depend on
the values), and the ranker's user features and timestamps when it reads them (all known);
reports the median of `--repeats` calls after a warm-up, per batch size, and the
encoder's cost at the same history length (at most the version's max_len) for scale. No torch.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from attnrec.engine.encoder import make_session
from attnrec.engine.repository import open_version
from attnrec.engine.timing import median_ms


def side_feeds(session, rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    """A version ranker's optional inputs, every feature known (the cost with features on): user
    feature codes 1, a timestamp per history position and a request time."""
    out = {}
    for i in session.get_inputs():
        if i.name == "user_features":
            out[i.name] = np.ones((batch, i.shape[1]), dtype=np.int64)
        elif i.name == "request_time":
            out[i.name] = np.full((batch, 1), 1_700_000_000, dtype=np.int64)
        elif i.name == "history_timestamps":
            ages = np.sort(rng.integers(1, 10**7, size=(batch, length)), axis=1)[:, ::-1]
            out[i.name] = (1_700_000_000 - ages).astype(np.int64)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("version_dir", type=Path, help="a repository version with a ranker: REPO_DIR/MODEL_NAME/VERSION")
    p.add_argument("--length", type=int, default=200, help="history length (default: 200)")
    p.add_argument("--candidates", type=int, default=200, help="candidates per user (default: 200)")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default: 1,64)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per batch size (default: 200)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    manifest = open_version(args.version_dir)
    if manifest.files.ranker is None:
        p.error(f"{args.version_dir} has no ranker")
    n_items, dim = manifest.model.n_items, manifest.model.dim
    ranker = make_session(args.version_dir / manifest.files.ranker.path, intra_op_threads=args.threads)
    encoder = make_session(args.version_dir / manifest.files.encoder.path, intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        history = rng.integers(1, n_items + 1, size=(batch, args.length))
        feeds = {
            "history": history,
            "hidden": rng.normal(size=(batch, args.length, dim)).astype(np.float32),
            "candidates": rng.integers(1, n_items + 1, size=(batch, args.candidates)),
            "candidate_scores": rng.normal(size=(batch, args.candidates)).astype(np.float32),
        }
        feeds.update(side_feeds(ranker, rng, batch, args.length))  # every feature known: the cost with them on
        feeds = {i.name: feeds[i.name] for i in ranker.get_inputs()}
        ms = median_ms(lambda: ranker.run(["scores"], feeds), args.repeats, warmup=10)
        # The encoder reads at most max_len items (its position table): a longer history is cut, as served.
        tokens = history[:, -manifest.model.max_len :]
        enc_ms = median_ms(lambda: encoder.run(None, {"history": tokens}), args.repeats, warmup=10)
        rows.append(
            {
                "batch": batch,
                "length": args.length,
                "candidates": args.candidates,
                "ranker_ms": ms,
                "ranker_ms_per_user": ms / batch,
                "ranker_users_per_s": batch * 1e3 / ms,
                "encoder_ms": enc_ms,
            }
        )
        print(
            f"batch {batch:4d}: ranker {ms:.3f} ms ({ms / batch:.4f} ms/user, {batch * 1e3 / ms:,.0f} users/s); "
            f"encoder {enc_ms:.3f} ms"
        )
    if args.json:
        env = {"onnxruntime": ort.__version__, "python": platform.python_version(), "threads": args.threads}
        args.json.write_text(json.dumps({"version_dir": str(args.version_dir), "env": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
