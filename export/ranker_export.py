"""Exporting the ranker to ONNX (dynamic batch, history-length and candidate-count axes) and
proving it computes what torch computes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from attnrec.engine.pipeline import pad_histories, score
from attnrec.engine.ranker import RANKER_INPUTS, OnnxRanker
from attnrec.engine.timing import median_ms

from .model import SASRec
from .onnx_export import PARITY_TOLERANCE, ParityError, trace_to_onnx
from .ranker_model import TargetAttentionRanker


class _Inputs(torch.nn.Module):
    """The ranker with exactly the inputs its graph declares, in engine/ranker.py's order."""

    def __init__(self, ranker: TargetAttentionRanker, names: list[str]) -> None:
        super().__init__()
        self.ranker, self.names = ranker, names

    def forward(self, *args):
        given = dict(zip(self.names, args))
        return self.ranker(
            given["history"],
            given.get("hidden"),
            given["candidates"],
            given["candidate_scores"],
            given.get("user_features"),
        )


def fold_item_features(ranker: TargetAttentionRanker) -> TargetAttentionRanker:
    """A copy whose item embeddings already hold the projected item features: they depend on the token
    alone, so the graph looks up one table instead of embedding and pooling codes per request
    (the parity check compares the result with the unfolded ranker)."""
    if ranker.item_side is None:
        return ranker
    folded = copy.deepcopy(ranker).eval()
    with torch.no_grad():
        folded.item_emb.weight.copy_(ranker.eval().items(torch.arange(ranker.shape.n_items + 1)[None])[0])
    folded.item_side = None
    return folded


def ranker_inputs(ranker: TargetAttentionRanker) -> list[str]:
    """The inputs of the ranker's graph: engine/ranker.py's contract less what this ranker does not read
    (`hidden` unless it attends over the encoder's states, `user_features` without user columns)."""
    skip = set()
    if ranker.shape.keys != "hidden":
        skip.add("hidden")
    if not ranker.shape.user_columns:
        skip.add("user_features")
    return [n for n in RANKER_INPUTS if n not in skip]


def export_ranker(ranker: TargetAttentionRanker, path: Path, *, optimize: bool = True) -> list[str]:
    """Write `path`: inputs history (B, L), [hidden (B, L, D),] candidates (B, N), candidate_scores (B, N)
    [, user_features (B, W)]; output scores (B, N). Item features are folded into the item embeddings.
    Portable ("basic") onnxruntime rewrites are applied offline, as for the encoder.
    Returns the graph's input names."""
    ranker = ranker.eval()
    d, n_items = ranker.shape.dim, ranker.shape.n_items
    b, t, n = 2, 5, 7
    example = {
        "history": torch.randint(1, n_items + 1, (b, t)),
        "hidden": torch.randn(b, t, d),
        "candidates": torch.randint(1, n_items + 1, (b, n)),
        "candidate_scores": torch.randn(b, n),
        "user_features": torch.ones(b, ranker.shape.user_width, dtype=torch.long),
    }
    axes = {
        "history": {0: "batch", 1: "length"},
        "hidden": {0: "batch", 1: "length"},
        "candidates": {0: "batch", 1: "candidates"},
        "candidate_scores": {0: "batch", 1: "candidates"},
        "user_features": {0: "batch"},  # its width is fixed: the version's user columns
        "scores": {0: "batch", 1: "candidates"},
    }
    names = ranker_inputs(ranker)
    # eval(): the exporter restores the wrapper's mode on the whole tree afterwards
    trace_to_onnx(
        _Inputs(fold_item_features(ranker), names).eval(),
        tuple(example[n] for n in names),
        path,
        names,
        ["scores"],
        {k: v for k, v in axes.items() if k in names or k == "scores"},
        optimize=optimize,
    )
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
    lengths (mixed in one batch, so padding is exercised) and candidate counts, with empty slots;
    user features random codes (some unknown, some out of range), and left out in one case.
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
        top = max((c.n_codes for c in ranker.shape.user_columns), default=1)
        users = rng.integers(0, top + 2, size=(batch, ranker.shape.user_width))  # past the end: unknown
        with torch.no_grad():
            t = torch.from_numpy(tokens)
            hidden = encoder.hidden(t)
            want = ranker(t, hidden, torch.from_numpy(cands), torch.from_numpy(scores), torch.from_numpy(users)).numpy()
        feeds = {"history": tokens, "hidden": hidden.numpy(), "candidates": cands, "candidate_scores": scores}
        feeds["user_features"] = users if length != 1 else None  # (1, 1, 1): left out, so all unknown
        if feeds["user_features"] is None and ranker.shape.user_columns:
            with torch.no_grad():
                want = ranker(t, hidden, torch.from_numpy(cands), torch.from_numpy(scores), None).numpy()
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
    """Median ms per onnxruntime call scoring `n` candidates against a `length`-item history, per batch
    (user features, when the graph reads them, all known: code 1)."""
    rng = np.random.default_rng(0)
    ranker = OnnxRanker(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    feeds = {
        "history": rng.integers(1, n_items + 1, size=(batch, length)),
        "hidden": rng.normal(size=(batch, length, dim)).astype(np.float32),
        "candidates": rng.integers(1, n_items + 1, size=(batch, n)),
        "candidate_scores": rng.normal(size=(batch, n)).astype(np.float32),
        "user_features": np.ones((batch, ranker.user_width), dtype=np.int64),
    }
    feeds = {name: feeds[name] for name in ranker.input_names}
    ms = median_ms(lambda: ranker.session.run(["scores"], feeds), repeats, warmup=5)
    return {"batch": batch, "length": length, "candidates": n, "ms": ms, "users_per_s": batch * 1e3 / ms}
