"""Triton's metric families on the metrics endpoint and KServe ModelStatistics agree, as a Triton
user reads them: tritonclient (unchanged, from PyPI) for the calls and the statistics, the endpoint's
text for the nv_inference_* families. Requests are counted once per model they ran on, whatever
their rows; rejected requests are failures; compute phases are real."""

from __future__ import annotations

import re
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from serving import RunningServer, free_port, settings
from tritonclient.utils import InferenceServerException

from attnrec.engine.client import RecommenderClient
from attnrec.engine.triton_metrics import FAMILIES

SAMPLE = re.compile(r'^(nv_inference_\w+)\{model="([^"]*)",version="([^"]*)"\} (\d+)$')


@pytest.fixture(scope="module")
def served(trained_repo):
    _, repo = trained_repo
    port = free_port()
    with RunningServer(settings(repo, address="127.0.0.1", metrics_port=port, max_queue_delay_us=2000)) as s:
        yield s, f"http://127.0.0.1:{port}/metrics"


def _scrape(url: str) -> tuple[str, dict[tuple[str, str, str], int]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            values[(m[1], m[2], m[3])] = int(m[4])
    return text, values


def _ids(s: RunningServer) -> list[str]:
    return [str(x) for x in s.server.models.slot.current.compute.item_ids[:12]]


def test_nv_inference_families_agree_with_model_statistics(served):
    s, url = served
    version = str(s.server.models.slot.current.version)
    ids = _ids(s)
    n = s.server.models.slot.current.n_items
    client = tc.InferenceServerClient(s.target)
    try:
        # encoder: one request of 5 rows
        tokens = np.random.default_rng(0).integers(1, n + 1, size=(5, 7)).astype(np.int64)
        enc = tc.InferInput("history", [5, 7], "INT64")
        enc.set_data_from_numpy(tokens)
        client.infer("encoder", [enc])
        # pipeline: one KServe request of 4 rows, and 3 Recommend calls
        hist = tc.InferInput("history", [4, 3], "BYTES")
        hist.set_data_from_numpy(np.array([[x.encode() for x in ids[i : i + 3]] for i in range(4)], dtype=object))
        client.infer("pipeline", [hist])
        with RecommenderClient(s.target) as rc:
            for i in range(3):
                rc.recommend(ids[i : i + 2], 5)
            with pytest.raises(grpc.RpcError):  # k out of range: a failed pipeline request
                rc.recommend(ids[:2], 1001)  # above --max-k (0 means the default, 10)
        # 5 encoder requests rejected before they reach the model (wrong datatype)
        bad = tc.InferInput("history", [1, 2], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
        for _ in range(5):
            with pytest.raises(InferenceServerException):
                client.infer("encoder", [bad])
        stats = {m.name: m for m in client.get_inference_statistics().model_stats}
    finally:
        client.close()
    text, nv = _scrape(url)

    # The families, named and typed as Triton's, labelled (model, version), parseable by a scraper.
    for family, *_ in FAMILIES:
        assert f"# TYPE {family} counter" in text
        assert {(m, v) for (f, m, v) in nv if f == family} == {(m, version) for m in stats}, family
    parsed = {f.name for f in text_string_to_metric_families(text)}
    assert {"attnrec_requests", "attnrec_stage_seconds"} <= parsed

    enc, pipe = stats["encoder"], stats["pipeline"]
    assert (enc.inference_stats.success.count, enc.inference_count) == (1, 5)
    assert (enc.inference_stats.fail.count, enc.execution_count) == (5, 1)
    assert (pipe.inference_stats.success.count, pipe.inference_stats.fail.count) == (1 + 3, 1)
    assert pipe.inference_count == 4 + 3 and 1 + 3 <= pipe.execution_count <= 4 + 3
    for name, m in stats.items():
        st = m.inference_stats
        got = {family: nv[(family, name, version)] for family, *_ in FAMILIES}
        assert got["nv_inference_request_success"] == st.success.count
        assert got["nv_inference_request_failure"] == st.fail.count
        assert got["nv_inference_count"] == m.inference_count
        assert got["nv_inference_exec_count"] == m.execution_count
        assert got["nv_inference_request_duration_us"] == st.success.ns // 1000
        assert got["nv_inference_queue_duration_us"] == st.queue.ns // 1000
        assert got["nv_inference_compute_input_duration_us"] == st.compute_input.ns // 1000
        assert got["nv_inference_compute_infer_duration_us"] == st.compute_infer.ns // 1000
        assert got["nv_inference_compute_output_duration_us"] == st.compute_output.ns // 1000
        assert st.queue.count == st.compute_infer.count == st.success.count
        assert sum(b.compute_infer.count for b in m.batch_stats) == m.execution_count
        if st.success.count:  # real compute phases, each inside the request it belongs to
            assert st.compute_input.ns > 0 and st.compute_infer.ns > 0 and st.compute_output.ns > 0
            assert st.queue.ns + st.compute_input.ns + st.compute_infer.ns + st.compute_output.ns <= st.success.ns
            assert st.fail.count == 0 or st.fail.ns > 0

    # attnrec's own total stage counts every pipeline request, KServe's included
    total = next(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "attnrec_stage_seconds"
        for s in f.samples
        if s.name.endswith("_count") and s.labels == {"model": "pipeline", "stage": "total"}
    )
    assert total == pipe.inference_stats.success.count
