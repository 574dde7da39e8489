"""Helpers for the serving tests: a real server on a real port in a background event loop, and
model versions derived from the `trained_repo` fixture's (with a toy ONNX ranker)."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from pathlib import Path

import numpy as np

from attnrec.engine.repository import RankerSection, copy_version
from attnrec.engine.server import Server
from attnrec.engine.settings import ServerSettings


class RunningServer:
    """`Server` started in its own thread's event loop; `.port`, `.call(coro)`, `.stop()`."""

    def __init__(self, settings: ServerSettings, *, start: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(_make(settings))
        self.started = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop) if start else None
        if start:
            self.started.result(120)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _make(settings: ServerSettings) -> Server:
    return Server(settings)  # built on the server's loop


def settings(repo: Path, **kw) -> ServerSettings:
    """Test settings: free ports, one thread, and (unless given) an embedded history store of its own
    beside the repository, so no test writes into the working directory or sees another's state."""
    store = f"file://{Path(repo).resolve().parent / f'history-{uuid.uuid4().hex[:12]}.sqlite'}"
    kw = {"port": 0, "metrics_port": 0, "address": "localhost", "intra_op_threads": 1, "history_store": store, **kw}
    return ServerSettings(repo=repo, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def clone_version(
    src: Path, repo: Path, name: str = "seq", *, ranker_onnx: Path | None = None, n_candidates: int = 200
) -> Path:
    """Publish a copy of the version at `src` as the next version of `repo/name`: without a ranker,
    or with `ranker_onnx` re-ordering `n_candidates` (src's own ranker, if any, is never copied)."""
    ranker = RankerSection("toy", n_candidates) if ranker_onnx is not None else None
    return copy_version(src, repo, name, ranker=ranker, ranker_file=ranker_onnx)


def toy_ranker(path: Path) -> Path:
    """A ranker ONNX graph that follows engine/ranker.py's contract (no hidden states): it prefers
    candidates whose token is near the last history token, stage-one score as a small term."""
    import torch

    class ToyRanker(torch.nn.Module):
        def forward(self, history, candidates, candidate_scores):
            last = history[:, -1:].float()  # (B, 1)
            return -torch.abs(candidates.float() - last) * 0.01 + 0.001 * candidate_scores  # (B, N)

    from attnrec.export.onnx_export import trace_to_onnx

    ex = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 7, dtype=torch.long), torch.zeros(2, 7))
    names = ["history", "candidates", "candidate_scores"]
    axes = {"history": {0: "b", 1: "l"}, "candidates": {0: "b", 1: "n"}, "candidate_scores": {0: "b", 1: "n"}}
    return trace_to_onnx(ToyRanker(), ex, path, names, ["scores"], axes, optimize=False)


def assert_same_ranking(items, scores, ref_items, ref_scores, tol: float = 1e-5) -> None:
    """Same scores at every rank (within tol) and the same items, except that items whose scores
    tie within tol may swap places (float noise from a different batch padding)."""
    items, ref_items = list(items), list(ref_items)
    scores, ref_scores = np.asarray(scores, np.float64), np.asarray(ref_scores, np.float64)
    assert len(items) == len(ref_items)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=tol)
    for i, (a, b) in enumerate(zip(items, ref_items)):
        if a != b:
            near = [ref_items[j] for j in range(len(ref_items)) if abs(ref_scores[j] - ref_scores[i]) < tol]
            assert a in near, f"rank {i + 1}: {a} instead of {b}"
