"""Fuzzing both services over a real 127.0.0.1 port (tests/fuzzing.py: hypothesis, seeded and
derandomized, so every run sends the same cases): 400 generated requests — random bodies, boundary
values, wrong tensors, huge declared shapes, invalid UTF-8, unknown and oversized model names,
broken stream frames, admin RPCs — and not one UNKNOWN or INTERNAL, no stream that lost a reply,
the server alive and serving afterwards, its memory bounded."""

from __future__ import annotations

import time

import grpc
from fuzzing import fuzz
from memory import PeakRss
from serving import RunningServer, settings

from attnrec.engine.client import RecommenderClient
from attnrec.engine.rpc.inference import grpc_service_pb2 as ipb
from attnrec.engine.rpc.inference import grpc_service_pb2_grpc as ipb_grpc

N = 400


def test_fuzzed_requests_get_clear_codes_and_the_server_stays_up(trained_repo):
    with RunningServer(settings(trained_repo[1], address="127.0.0.1")) as s:
        target = f"127.0.0.1:{s.port}"
        with RecommenderClient(target) as client:
            before = client.recommend(["1", "2"], 5)
        # A warm-up round first: the measured growth is then what fuzzing keeps allocating, not the
        # allocator arenas and caches that the first requests of each kind fill in this shared test process
        fuzz(target, 100)
        start = time.monotonic()
        with PeakRss() as memory:
            out = fuzz(target, N)
        seconds = time.monotonic() - start
        print(
            f"fuzz: {out.sent} cases in {seconds:.1f}s: {dict(sorted(out.codes.items()))}; RSS +{memory.growth:.0f} MB"
        )
        assert out.sent >= 300 and not out.broken, "\n".join(out.broken[:10])
        assert len(out.codes) >= 4  # the cases reach far enough to be answered in several ways
        assert memory.growth < 150, f"RSS grew {memory.growth:.0f} MB"
        assert seconds < 60
        with grpc.insecure_channel(target) as ch:  # alive, ready and answering as before
            assert ipb_grpc.GRPCInferenceServiceStub(ch).ServerReady(ipb.ServerReadyRequest(), timeout=5).ready
        with RecommenderClient(target) as client:
            after = client.recommend(["1", "2"], 5)
        assert after.items == before.items and after.version == before.version
