"""Exporting the SASRec encoder to ONNX and proving it computes what torch computes."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from attnrec.engine.encoder import make_session
from attnrec.engine.pipeline import pad_histories
from attnrec.engine.timing import median_ms

from .model import SASRec

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The exported graph disagrees with torch beyond the tolerance."""


class _EncoderWithHidden(torch.nn.Module):
    """history → (query, hidden): every position's state too, for a ranker that reads them."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.hidden(history)
        return h[:, -1], h


def export_encoder(model: SASRec, path: Path, *, with_hidden: bool = False, optimize: bool = True) -> Path:
    """Write `path` with dynamic batch and length axes: input `history`, output `query`
    (and `hidden` with `with_hidden`, which costs the full last block).

    The saved graph gets onnxruntime's portable ("basic") rewrites offline; provider-specific
    fusions are applied when the serving session loads it, so one file serves CPU and GPU.
    """
    model = model.eval()
    example = torch.randint(1, model.cfg.n_items + 1, (2, min(8, model.cfg.max_len)))
    module = _EncoderWithHidden(model) if with_hidden else model
    names = ["query", "hidden"] if with_hidden else ["query"]
    axes = {"history": {0: "batch", 1: "length"}, "query": {0: "batch"}, "hidden": {0: "batch", 1: "length"}}
    return trace_to_onnx(module, (example,), path, ["history"], names, axes, optimize=optimize)


def trace_to_onnx(
    module: torch.nn.Module,
    example: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    *,
    optimize: bool = True,
) -> Path:
    """Trace `module` on `example` to `path` with the dynamic `axes` of the named inputs and outputs;
    with `optimize`, save it after onnxruntime's portable ("basic") rewrites."""
    raw = path.with_suffix(".raw.onnx")
    used = set(input_names) | set(output_names)
    # The TorchScript exporter is deprecated in favour of torch.export, but it handles our dynamic
    # length axis without onnxscript; the parity checks are what vouch for the graphs.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            module,
            example,
            str(raw),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={k: v for k, v in axes.items() if k in used},
            opset_version=OPSET,
            dynamo=False,
        )
    if optimize:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(path)
        ort.InferenceSession(str(raw), sess_options=opts, providers=["CPUExecutionProvider"])
        raw.unlink()
    else:
        raw.replace(path)
    return path


@dataclass
class ParityReport:
    max_abs_diff: float
    by_length: dict[int, float]  # history length → max |onnx - torch| over the graph's outputs
    n_histories: int


def check_parity(
    model: SASRec,
    path: Path,
    real_histories: Sequence[np.ndarray] = (),
    *,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """Compare onnxruntime with torch eager on random and real histories of several lengths.

    Each length is checked as a single history and inside a batch padded to a longer one, so
    the padding path is verified too. Raises ParityError above `tolerance`.
    """
    model = model.eval()
    cfg = model.cfg
    session = make_session(path, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    lengths = sorted({1, 2, 5, 17, cfg.max_len // 2, cfg.max_len} - {0})
    by_length: dict[int, float] = {}
    count = 0

    def compare(histories: list[np.ndarray]) -> float:
        tokens = pad_histories(histories, cfg.max_len)
        got = dict(zip(outputs, session.run(outputs, {"history": tokens})))
        with torch.no_grad():
            t = torch.from_numpy(tokens)
            diff = float(np.abs(got["query"] - model(t).numpy()).max())
            if "hidden" in got:
                valid = tokens > 0  # hidden states at padding positions carry no meaning
                diff = max(diff, float(np.abs(got["hidden"] - model.hidden(t).numpy())[valid].max()))
        return diff

    for length in lengths:
        rand = [rng.integers(1, cfg.n_items + 1, size=length) for _ in range(8)]
        real = [h[-length:] for h in real_histories if len(h) >= length][:8]
        diffs = [compare(rand), compare(rand[:1])]
        if real:
            diffs.append(compare(real))
        # Mixed lengths in one batch: this length padded to max_len beside a full history.
        diffs.append(compare([rand[0], rng.integers(1, cfg.n_items + 1, size=cfg.max_len)]))
        by_length[length] = max(diffs)
        count += len(rand) + len(real) + 3
    report = ParityReport(max(by_length.values()), by_length, count)
    if report.max_abs_diff > tolerance:
        raise ParityError(
            f"ONNX encoder differs from torch by {report.max_abs_diff:.2e} (> {tolerance:.0e}); by length {by_length}"
        )
    return report


def time_encoders(
    model: SASRec, path: Path, *, length: int = 200, batch: int = 1, repeats: int = 50, threads: int = 0
) -> dict[str, float]:
    """Median ms per call at (batch, length): torch eager vs onnxruntime on the CPU."""
    length = min(length, model.cfg.max_len)
    tokens = np.random.default_rng(0).integers(1, model.cfg.n_items + 1, size=(batch, length))
    session = make_session(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    tt = torch.from_numpy(tokens)

    with torch.no_grad():
        torch_ms = median_ms(lambda: model(tt), repeats, warmup=5)
    ort_ms = median_ms(lambda: session.run(["query"], {"history": tokens}), repeats, warmup=5)
    return {
        "batch": batch,
        "length": length,
        "torch_ms": torch_ms,
        "onnxruntime_ms": ort_ms,
        "speedup": torch_ms / ort_ms,
    }
