"""The naive baseline people write first: torch eager + FAISS in a plain grpc.aio servicer, no batching.

    python -m attnrec.benchmarks.naive_server --version-dir DIR --port 18101 [--torch-weights sasrec.pt] [--threads N]

It speaks the same attnrec.v1.Recommender/Recommend as `attnrec serve` and computes each request
on its own, inside the handler (blocking the event loop, as that first version does): history ids
→ rows → torch SASRec query → FAISS top-N with the history masked → (when the version has a
ranker) a torch target-attention ranker of the suite's synthetic shape over the N candidates →
top-k. Torch weights come from --torch-weights (saved when the bench model was built) or are
rebuilt from the version's encoder.onnx (attnrec.benchmarks.bench_models.torch_encoder); the ranker's
torch weights are random (speed does not depend on them). For timing only, never for answers.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np


def build(version_dir: Path, torch_weights: Path | None, threads: int):
    import torch

    from attnrec.engine.pipeline import Pipeline, RuntimeOptions, search

    from .bench_models import RANKER_MLP, BenchVersion, torch_encoder
    from .synthetic_ranker import TargetAttentionRanker

    if threads:
        torch.set_num_threads(threads)
    # The version's index, id map and candidate count as the engine loads them; its ONNX sessions go
    # unused (one CPU thread, no spinning, so they cost the torch baseline nothing).
    options = RuntimeOptions(("CPUExecutionProvider",), intra_op_threads=1, faiss_gpu=False, allow_spinning=False)
    pipeline = Pipeline.load(version_dir, options)
    manifest = pipeline.manifest
    v = BenchVersion(version_dir, version_dir.parent.parent, manifest.name, "", torch_weights, "")
    model, _ = torch_encoder(v)
    cfg = model.cfg
    index, ids, n_candidates = pipeline.index, pipeline.item_ids.tolist(), pipeline.n_candidates
    row_of = {str(x): i for i, x in enumerate(ids)}
    ranker = None
    if pipeline.ranker is not None:
        ranker = TargetAttentionRanker(cfg.n_items, cfg.dim, cfg.max_len, RANKER_MLP).eval()

    @torch.inference_mode()
    def recommend(history: list[str], k: int) -> tuple[list[str], list[float]]:
        rows = np.array([row_of[h] for h in history if h in row_of], dtype=np.int64)
        tokens = torch.from_numpy(rows[-cfg.max_len :] + 1)[None]  # (1, L)
        query = model(tokens).numpy()  # (1, D)
        n = max(k, n_candidates) if ranker is not None else k
        scores, cand = search(index, query, n, exclude=[rows])
        if ranker is not None:
            valid = cand >= 0
            c = torch.from_numpy(np.where(valid, cand + 1, 0))
            s = torch.from_numpy(np.where(valid, scores, 0.0).astype(np.float32))
            ranked = np.where(valid, ranker(tokens, c, s).numpy(), -np.inf)
            order = np.argsort(-ranked, axis=1)[:, :k]
            cand, scores = np.take_along_axis(cand, order, 1), np.take_along_axis(ranked, order, 1)
        keep = cand[0] >= 0
        return [str(ids[r]) for r in cand[0][keep][:k]], [float(x) for x in scores[0][keep][:k]]

    return recommend, manifest


async def serve(version_dir: Path, port: int, torch_weights: Path | None, threads: int) -> None:
    import grpc

    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc

    recommend, manifest = build(version_dir, torch_weights, threads)

    class Naive(pb_grpc.RecommenderServicer):
        async def Recommend(self, request, context):
            items, scores = recommend(list(request.history), request.k or 10)
            return pb.RecommendReply(items=items, scores=scores, model=manifest.name, model_version=manifest.version)

    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(Naive(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnrec.benchmarks.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--version-dir", type=Path, required=True, help="the version to serve (its index and ids)")
    p.add_argument("--port", type=int, required=True, help="port to listen on, on 127.0.0.1")
    p.add_argument(
        "--torch-weights",
        type=Path,
        help="the suite's sasrec.pt (config and weights) for the torch encoder (default: from encoder.onnx)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    asyncio.run(serve(args.version_dir, args.port, args.torch_weights, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
