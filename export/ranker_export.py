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
from attnrec.engine.ranker import RANKER_INPUTS, TIME_INPUTS, OnnxRanker
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
            given.get("history_timestamps"),
            given.get("request_time"),
        )


def fold_item_features(ranker: TargetAttentionRanker) -> TargetAttentionRanker:
    """A copy whose item embeddings already hold the projected item features: they depend on the token
    alone, so the graph looks up one table instead of embedding and pooling codes per request
    (the parity check compares the result with the unfolded ranker)."""
    if ranker.item_side is None:
        return ranker
    folded = copy.deepcopy(ranker).eval()
    every = torch.arange(ranker.shape.n_items + 1)[None]
    with torch.no_grad():
        folded.item_emb.weight.copy_(ranker.eval().items(every)[0])
        if ranker.cross_ctx is not None:  # the cross's item side too: one more token-indexed table
            folded.cross_table = ranker.crossed_items(every)[0].clone()
    folded.item_side = None
    return folded


def ranker_inputs(ranker: TargetAttentionRanker) -> list[str]:
    """The inputs of the ranker's graph: engine/ranker.py's contract less what this ranker does not read
    (`hidden` unless it attends over the encoder's states, `user_features` without user columns, the
    time inputs without time features)."""
    skip = set()
    if ranker.shape.keys != "hidden":
        skip.add("hidden")
    if not ranker.shape.user_columns:
        skip.add("user_features")
    if not ranker.shape.reads_clock:
        skip.update(TIME_INPUTS)
    return [n for n in RANKER_INPUTS if n not in skip]


def export_ranker(ranker: TargetAttentionRanker, path: Path, *, optimize: bool = True) -> list[str]:
    """Write `path`: inputs history (B, L), [hidden (B, L, D),] candidates (B, N), candidate_scores (B, N)
    [, user_features (B, W)][, history_timestamps (B, L), request_time (B, 1)]; output scores (B, N).
    Item features are folded into the item embeddings.
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
        "history_timestamps": torch.full((b, t), 1_700_000_000, dtype=torch.long) - torch.arange(t, 0, -1) * 3600,
        "request_time": torch.full((b, 1), 1_700_000_000, dtype=torch.long),
    }
    axes = {
        "history": {0: "batch", 1: "length"},
        "hidden": {0: "batch", 1: "length"},
        "candidates": {0: "batch", 1: "candidates"},
        "candidate_scores": {0: "batch", 1: "candidates"},
        "user_features": {0: "batch"},  # its width is fixed: the version's user columns
        "history_timestamps": {0: "batch", 1: "length"},
        "request_time": {0: "batch"},
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


def _random_times(rng: np.random.Generator, tokens: np.ndarray, now_known: float) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps of padded `tokens` (0 at padding, and at a few unknown events) and request times
    (a share `1 - now_known` of them unknown): ages from seconds to years, so every bucket is used."""
    batch = len(tokens)
    now = 1_500_000_000 + rng.integers(0, 400_000_000, size=(batch, 1))
    age = np.sort(np.exp(rng.uniform(0, 21, size=tokens.shape)).astype(np.int64), axis=1)[:, ::-1]
    stamps = np.where((tokens > 0) & (rng.random(tokens.shape) > 0.1), now - age, 0)
    return stamps.astype(np.int64), np.where(rng.random((batch, 1)) < now_known, now, 0).astype(np.int64)


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
    user features random codes (some unknown, some out of range), and left out in one case; timestamps
    random (some unknown, some requests without a time), and left out in that case and another.
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
        stamps, now = _random_times(rng, tokens, 0.75)
        if ranker.shape.trend_features:  # request times inside the trend table's span too, every bucket reachable
            span = (ranker.trend_buckets + 2) * ranker.trend_width
            inside = ranker.trend_start - ranker.trend_width + rng.integers(0, span, size=now.shape)
            now = np.where((now > 0) & (rng.random(now.shape) < 0.7), np.maximum(inside, 1), now)
        feeds = {"history": tokens, "candidates": cands, "candidate_scores": scores}
        feeds.update(user_features=users, history_timestamps=stamps, request_time=now)
        if length == 1:  # (1, 1, 1): user features and times left out, so all unknown
            feeds.update(user_features=None, history_timestamps=None, request_time=None)
        if batch == 3:  # times left out, user features given
            feeds.update(history_timestamps=None, request_time=None)
        with torch.no_grad():
            t = torch.from_numpy(tokens)
            hidden = encoder.hidden(t)
            given = {k: None if v is None else torch.from_numpy(v) for k, v in feeds.items()}
            want = ranker(
                t,
                hidden,
                given["candidates"],
                given["candidate_scores"],
                given["user_features"],
                given["history_timestamps"],
                given["request_time"],
            ).numpy()
        feeds["hidden"] = hidden.numpy()
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
    (user features, when the graph reads them, all known: code 1; timestamps, when it reads them, all known)."""
    rng = np.random.default_rng(0)
    ranker = OnnxRanker(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    feeds = {
        "history": rng.integers(1, n_items + 1, size=(batch, length)),
        "hidden": rng.normal(size=(batch, length, dim)).astype(np.float32),
        "candidates": rng.integers(1, n_items + 1, size=(batch, n)),
        "candidate_scores": rng.normal(size=(batch, n)).astype(np.float32),
        "user_features": np.ones((batch, ranker.user_width), dtype=np.int64),
    }
    feeds["history_timestamps"], feeds["request_time"] = _random_times(rng, feeds["history"], 1.0)
    feeds["history_timestamps"] = np.where(feeds["history_timestamps"] > 0, feeds["history_timestamps"], 1)
    feeds = {name: feeds[name] for name in ranker.input_names}
    ms = median_ms(lambda: ranker.session.run(["scores"], feeds), repeats, warmup=5)
    return {"batch": batch, "length": length, "candidates": n, "ms": ms, "users_per_s": batch * 1e3 / ms}
