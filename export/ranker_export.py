"""Exporting the ranker to ONNX (dynamic batch, history-length and candidate-count axes) and
proving it computes what torch computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from attnrec.engine.encoder import make_session
from attnrec.engine.pipeline import pad_histories, score
from attnrec.engine.ranker import RANKER_INPUTS, OnnxRanker
from attnrec.engine.timing import median_ms

from .model import SASRec
from .onnx_export import PARITY_TOLERANCE, ParityError, trace_to_onnx
from .ranker_model import TargetAttentionRanker


class _WithoutHidden(torch.nn.Module):
    """A ranker that attends over its own item embeddings declares no `hidden` input."""

    def __init__(self, ranker: TargetAttentionRanker) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(self, history, candidates, candidate_scores):
        return self.ranker(history, None, candidates, candidate_scores)


def export_ranker(ranker: TargetAttentionRanker, path: Path, *, optimize: bool = True) -> list[str]:
    """Write `path`: inputs history (B, L), [hidden (B, L, D),] candidates (B, N), candidate_scores (B, N);
    output scores (B, N). Portable ("basic") onnxruntime rewrites are applied offline, as for the encoder.
    Returns the graph's input names."""
    ranker = ranker.eval()
    d, n_items = ranker.shape.dim, ranker.shape.n_items
    b, t, n = 2, 5, 7
    example = (
        torch.randint(1, n_items + 1, (b, t)),
        torch.randn(b, t, d),
        torch.randint(1, n_items + 1, (b, n)),
        torch.randn(b, n),
    )
    axes = {
        "history": {0: "batch", 1: "length"},
        "hidden": {0: "batch", 1: "length"},
        "candidates": {0: "batch", 1: "candidates"},
        "candidate_scores": {0: "batch", 1: "candidates"},
        "scores": {0: "batch", 1: "candidates"},
    }
    # engine's contract, in forward's argument order: all four with keys="hidden", all but `hidden` with keys="items"
    names = list(RANKER_INPUTS)
    module: torch.nn.Module = ranker
    if ranker.shape.keys != "hidden":
        names.remove("hidden")
        example = (example[0], example[2], example[3])
        module = _WithoutHidden(ranker)
    trace_to_onnx(module, example, path, names, ["scores"], axes, optimize=optimize)
    return names


@dataclass
class RankerParity:
    max_abs_diff: float
    cases: list[dict]  # (batch, length, candidates) → max |onnx - torch| over filled slots


def check_ranker_parity(
    ranker: TargetAttentionRanker,
    encoder: SASRec,
    path: Path,
    real_histories: Sequence[np.ndarray] = (),
    *,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
) -> RankerParity:
    """onnxruntime vs torch on the encoder's real hidden states, for several batch sizes, history
    lengths (mixed in one batch, so padding is exercised) and candidate counts, with empty slots.
    Raises ParityError above `tolerance`."""
    ranker, encoder = ranker.eval(), encoder.eval()
    onnx = OnnxRanker(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    n_items, max_len = ranker.shape.n_items, encoder.cfg.max_len
    real = [h for h in real_histories if len(h)]
    cases = []
    for batch, length, n in ((1, 1, 1), (1, max_len, 200), (4, max_len // 2 + 1, 37), (8, max_len, 200), (3, 7, 500)):
        hist = [rng.integers(1, n_items + 1, size=int(rng.integers(1, length + 1))) for _ in range(batch)]
        hist[0] = rng.integers(1, n_items + 1, size=length)
        if real:  # real histories beside random ones
            hist[-1] = real[int(rng.integers(len(real)))][-length:]
        tokens = pad_histories(hist, max_len)
        cands = rng.integers(1, n_items + 1, size=(batch, n))
        cands[:, n - n // 5 :] = 0  # the catalogue ran out: empty slots
        scores = np.where(cands > 0, rng.normal(size=(batch, n)) * 3, 0).astype(np.float32)
        with torch.no_grad():
            t = torch.from_numpy(tokens)
            hidden = encoder.hidden(t)
            want = ranker(t, hidden, torch.from_numpy(cands), torch.from_numpy(scores)).numpy()
        feeds = {"history": tokens, "hidden": hidden.numpy(), "candidates": cands, "candidate_scores": scores}
        got = score(onnx, feeds)  # reads the inputs its graph declares
        diff = float(np.abs(got - want)[cands > 0].max()) if (cands > 0).any() else 0.0
        cases.append({"batch": batch, "length": length, "candidates": n, "max_abs_diff": diff})
    report = RankerParity(max(c["max_abs_diff"] for c in cases), cases)
    if report.max_abs_diff > tolerance:
        raise ParityError(f"ONNX ranker differs from torch by {report.max_abs_diff:.2e} (> {tolerance:.0e}): {cases}")
    return report


def time_ranker(
    path: Path, n_items: int, dim: int, *, length: int = 200, n: int = 200, batch: int = 1, repeats: int = 50, threads=0
) -> dict[str, float]:
    """Median ms per onnxruntime call scoring `n` candidates against a `length`-item history, per batch."""
    rng = np.random.default_rng(0)
    session = make_session(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    feeds = {
        "history": rng.integers(1, n_items + 1, size=(batch, length)),
        "hidden": rng.normal(size=(batch, length, dim)).astype(np.float32),
        "candidates": rng.integers(1, n_items + 1, size=(batch, n)),
        "candidate_scores": rng.normal(size=(batch, n)).astype(np.float32),
    }
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    ms = median_ms(lambda: session.run(["scores"], feeds), repeats, warmup=5)
    return {"batch": batch, "length": length, "candidates": n, "ms": ms, "users_per_s": batch * 1e3 / ms}
