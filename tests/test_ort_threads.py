"""onnxruntime's intra-op threads: as many as the usable physical cores, and none pinned to a core (left at
0, onnxruntime pins the workers of its own default count; engine/encoder.py `make_session`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from attnrec.engine.encoder import usable_cores

# In a fresh interpreter (its only threads are onnxruntime's and its own): open a session as the server does
# (intra-op 0), run it, print every thread's allowed CPUs and the thread count.
_CHILD = textwrap.dedent(
    """
    import glob, sys, threading
    import numpy as np, onnx
    from onnx import TensorProto, helper
    from attnrec.engine.encoder import make_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), sys.argv[1])
    before = len(glob.glob("/proc/self/task/*"))
    session = make_session(sys.argv[1], providers=["CPUExecutionProvider"], intra_op_threads=int(sys.argv[2]))
    session.run(None, {"x": np.ones((256, 64), np.float32)})
    tasks = glob.glob("/proc/self/task/*/status")
    masks = {open(t).read().split("Cpus_allowed_list:")[1].split()[0] for t in tasks}
    print(len(tasks) - before, ";".join(sorted(masks)))
    """
)


def _threads(tmp_path: Path, intra_op: int) -> tuple[int, set[str]]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "m.onnx"), str(intra_op)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return int(out[0]), set(out[1].split(";"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads threads from /proc (Linux)")
def test_the_default_intra_op_threads_are_one_per_core_and_not_pinned(tmp_path):
    added, masks = _threads(tmp_path, 0)
    # onnxruntime's pool: one worker fewer than its thread count (the calling thread is the other)
    assert added == usable_cores() - 1
    own = open("/proc/self/status").read().split("Cpus_allowed_list:")[1].split()[0]
    assert masks == {own}  # every thread may run on every allowed CPU: none was pinned
    added, masks = _threads(tmp_path, 1)  # an explicit count is kept as given
    assert added == 0 and masks == {own}


def test_usable_cores_counts_hyper_thread_siblings_once():
    cpus = os.sched_getaffinity(0)
    assert 1 <= usable_cores() <= len(cpus)
    siblings = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip() for c in cpus}
    assert usable_cores() == len(siblings)
