"""onnxruntime IO binding (what `--io-binding auto` turns on for CUDA), run here on the CPU provider:
the same answers as session.run, and the encoder's hidden states handed to the ranker as an OrtValue."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnrec.engine.encoder import OnnxEncoder, binding_device
from attnrec.engine.pipeline import encode, run_session, score
from attnrec.engine.ranker import OnnxRanker


def _encoder(path):
    """history (B, L) → hidden (B, L, 1) = float(history), query (B, 1) = its sum over positions."""
    one = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    two = helper.make_tensor("two", TensorProto.INT64, [1], [2])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["history"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["f", "two"], ["hidden"]),
            helper.make_node("ReduceSum", ["hidden", "axes"], ["summed"], keepdims=0),
            helper.make_node("Identity", ["summed"], ["query"]),
        ],
        "encoder",
        [helper.make_tensor_value_info("history", TensorProto.INT64, ["b", "l"])],
        [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["b", 1]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "l", 1]),
        ],
        [one, two],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _ranker(path):
    """scores (B, N) = candidates × (sum of hidden) + candidate_scores: reads `hidden`."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["hidden", "axes"], ["total"], keepdims=0),
            helper.make_node("Unsqueeze", ["total", "one"], ["col"]),
            helper.make_node("Cast", ["candidates"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["c", "col"], ["m"]),
            helper.make_node("Add", ["m", "candidate_scores"], ["scores"]),
        ],
        "ranker",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "l", 1]),
            helper.make_tensor_value_info("candidates", TensorProto.INT64, ["b", "n"]),
            helper.make_tensor_value_info("candidate_scores", TensorProto.FLOAT, ["b", "n"]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", "n"])],
        [axes, helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_binding_device_follows_the_provider_and_the_setting(tmp_path):
    enc = OnnxEncoder(_encoder(tmp_path / "e.onnx"), 8, providers=["CPUExecutionProvider"])
    assert enc.binding is None  # auto: plain session.run on the CPU
    assert binding_device(enc.session, "on") == "cpu" and binding_device(enc.session, "off") is None
    with pytest.raises(ValueError, match="io_binding"):
        binding_device(enc.session, "yes")


def test_bound_runs_answer_as_session_run_and_hidden_stays_an_ortvalue(tmp_path):
    import onnxruntime as ort

    kw = {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1}
    plain_enc = OnnxEncoder(_encoder(tmp_path / "e.onnx"), 8, io_binding="off", **kw)
    bound_enc = OnnxEncoder(tmp_path / "e.onnx", 8, io_binding="on", **kw)
    plain_rk = OnnxRanker(_ranker(tmp_path / "r.onnx"), io_binding="off", **kw)
    bound_rk = OnnxRanker(tmp_path / "r.onnx", io_binding="on", **kw)
    assert bound_rk.needs_hidden and bound_enc.binding == bound_rk.binding == "cpu"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(3, 6)).astype(np.int64)
    want = encode(plain_enc, tokens)
    got = encode(bound_enc, tokens)
    np.testing.assert_array_equal(got["query"], want["query"])
    np.testing.assert_array_equal(got["hidden"], want["hidden"])
    kept = encode(bound_enc, tokens, keep=("hidden",))
    assert isinstance(kept["hidden"], ort.OrtValue) and isinstance(kept["query"], np.ndarray)
    np.testing.assert_array_equal(kept["hidden"].numpy(), want["hidden"])
    feeds = {
        "history": tokens,
        "candidates": rng.integers(1, 50, size=(3, 4)).astype(np.int64),
        "candidate_scores": rng.standard_normal((3, 4)).astype(np.float32),
    }
    reference = score(plain_rk, {**feeds, "hidden": want["hidden"]})
    np.testing.assert_array_equal(score(bound_rk, {**feeds, "hidden": kept["hidden"]}), reference)
    # a session that is not bound still reads an OrtValue (brought to the host)
    np.testing.assert_array_equal(score(plain_rk, {**feeds, "hidden": kept["hidden"]}), reference)
    assert run_session(bound_enc.session, {"history": tokens}, ["query"], "cpu")[0].shape == (3, 1)
