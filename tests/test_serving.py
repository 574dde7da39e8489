"""The domain API over a real port: exact answers, batching under concurrency, the ranker path,
the tensor models that the KServe servicer exposes, errors as status codes."""

import asyncio

import grpc
import numpy as np
import pytest
from serving import RunningServer, assert_same_ranking, clone_version, settings, toy_ranker

from attnrec.engine.client import RecommenderClient, request
from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.errors import InvalidRequest
from attnrec.engine.pipeline import Pipeline, encode, encode_histories, score
from attnrec.engine.repository import newest_valid_version
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc
from attnrec.export.evaluate import load_item_ids, load_item_vectors
from attnrec.export.ranking_metrics import topk_excluding


@pytest.fixture(scope="module")
def plain_repo(trained_repo, tmp_path_factory):
    """The fixture's newest version without its ranker: stage one alone (exact Flat index)."""
    repo = tmp_path_factory.mktemp("plain") / "repo"
    clone_version(newest_valid_version(trained_repo[1], "seq")[0], repo)
    return repo


@pytest.fixture(scope="module")
def served(plain_repo):
    with RunningServer(settings(plain_repo, max_batch_size=16)) as s:
        yield s


@pytest.fixture(scope="module")
def reference(plain_repo):
    path, manifest = newest_valid_version(plain_repo, "seq")
    enc = OnnxEncoder(path / "encoder.onnx", manifest.model.max_len)
    return enc, load_item_vectors(path, manifest), load_item_ids(path, manifest).astype(str), manifest


def test_recommend_is_the_offline_evaluations_exact_top_k(served, reference):
    enc, vectors, ids, manifest = reference
    rng = np.random.default_rng(1)
    max_len = manifest.model.max_len
    with RecommenderClient(served.target) as client:
        for n in (1, 3, max_len, max_len + 9):
            rows = rng.choice(len(ids), size=n, replace=False)
            excl = rng.choice(len(ids), size=2, replace=False)
            r = client.recommend(list(ids[rows]) + ["no-such-item"], 10, exclude=list(ids[excl]), timings=True)
            query = encode_histories(enc, [rows[-max_len:] + 1])
            want = topk_excluding(query @ vectors.T, [np.union1d(rows, excl)], 10)[0]  # whole history excluded
            assert r.items == list(ids[want])
            np.testing.assert_allclose(r.scores, (query @ vectors[want].T)[0], rtol=1e-5, atol=1e-5)
            assert (r.version, r.model, r.unknown_items, r.popularity_fallback) == (manifest.version, "seq", 1, False)
            assert r.truncated_items == max(0, n - max_len)
            assert r.timings["encoder_ms"] > 0 and r.timings["total_ms"] >= r.timings["queue_ms"]


def test_empty_or_unknown_history_gets_the_popularity_fallback(served, plain_repo):
    pipe = Pipeline.load(newest_valid_version(plain_repo, "seq")[0])
    ids = pipe.item_ids.astype(str)
    with RecommenderClient(served.target) as client:
        r = client.recommend(["nope", "nada"], 5, exclude=[ids[pipe.popular_rows[0]]])
    assert r.popularity_fallback and r.unknown_items == 2
    assert r.items == list(ids[pipe.popular_rows[1:6]])
    assert r.scores == pipe.popularity[pipe.popular_rows[1:6]].astype(np.float32).tolist()


def test_invalid_requests_get_invalid_argument(served):
    with RecommenderClient(served.target) as client:
        for k in (1001, 100_000):
            with pytest.raises(grpc.RpcError) as err:
                client.recommend(["1"], k)
            assert (
                err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k must be in 1..1000" in err.value.details()
            )


def test_k_left_out_means_10_as_everywhere(served):
    """proto3 sends no k as 0: Recommend, RecommendStream, the KServe pipeline and `attnrec query` all take 10."""
    with grpc.insecure_channel(served.target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        default = stub.Recommend(pb.RecommendRequest(history=["1", "2"]), timeout=10)
        ten = stub.Recommend(pb.RecommendRequest(history=["1", "2"], k=10), timeout=10)
        streamed = list(stub.RecommendStream(iter([pb.RecommendRequest(history=["1", "2"])]), timeout=10))
    assert len(default.items) == 10 and list(default.items) == list(ten.items) == list(streamed[0].items)
    assert not streamed[0].HasField("error")


def test_rerank_options_over_grpc_and_the_pipeline_tensor_model(served, plain_repo):
    """diversity / popularity_calibration (fields 11, 12) answer what Pipeline.recommend does offline:
    stage one's top 200 re-ranked (no ranker in this version); 0 is the plain answer; outside 0..1 is refused."""
    pipe = Pipeline.load(newest_valid_version(plain_repo, "seq")[0])
    ids = pipe.item_ids.astype(str)
    rng = np.random.default_rng(11)
    host = served.server.models
    with RecommenderClient(served.target) as client:
        for d, c in ((0.0, 0.0), (0.6, 0.0), (0.0, 0.7), (0.4, 0.4)):
            rows = rng.choice(len(ids), size=7, replace=False)
            want = pipe.recommend([rows], 10, diversity=d, popularity_calibration=c)
            r = client.recommend(list(ids[rows]), 10, diversity=d, popularity_calibration=c)
            assert r.items == list(ids[want.rows[0]]), (d, c)
            np.testing.assert_allclose(r.scores, want.scores[0], rtol=1e-5, atol=1e-5)
            if d == c == 0:
                assert r.items == client.recommend(list(ids[rows]), 10).items
            hist = np.array([[x.encode() for x in ids[rows]]], dtype=object)
            feeds = {"history": hist, "diversity": np.array([[d]], np.float32)}
            feeds["popularity_calibration"] = np.array([[c]], np.float32)
            out = served.call(host.get("pipeline").infer(feeds))
            assert [x.decode() for x in out["items"][0]] == r.items
        for field in ("diversity", "popularity_calibration"):
            for bad in (1.5, -0.25, float("nan")):
                with pytest.raises(grpc.RpcError) as err:
                    client.recommend(list(ids[:3]), 5, **{field: bad})
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"{field} must be in 0..1" in err.value.details()
                with pytest.raises(InvalidRequest, match=f"{field} must be in 0..1"):
                    served.call(
                        host.get("pipeline").infer(
                            {"history": np.array([[b"1"]], dtype=object), field: np.array([[bad]], np.float32)}
                        )
                    )
    with pytest.raises(InvalidRequest, match="'diversity' must be FP32"):
        served.call(host.get("pipeline").infer({"history": np.array([[b"1"]], object), "diversity": np.array([[1]])}))


def test_1000_concurrent_requests_with_distinct_histories_each_get_their_own_answer(served, plain_repo):
    pipe = Pipeline.load(newest_valid_version(plain_repo, "seq")[0])
    ids = pipe.item_ids.astype(str)
    rng = np.random.default_rng(7)
    histories = [rng.choice(pipe.n_items, size=int(rng.integers(1, 25)), replace=False) for _ in range(1000)]
    want = [pipe.recommend([h], 8) for h in histories]  # one at a time: no batching in the reference

    async def run():
        async with grpc.aio.insecure_channel(served.target) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            reqs = [request(ids[h].tolist(), 8, request_id=str(i), timings=True) for i, h in enumerate(histories)]
            return await asyncio.gather(*(stub.Recommend(r, timeout=60) for r in reqs))

    replies = asyncio.run(run())
    for h, w, r in zip(histories, want, replies):
        assert_same_ranking(r.items, r.scores, ids[w.rows[0]], w.scores[0])
    assert max(r.timings.batch_size for r in replies) > 1  # they really were batched


def test_stream_answers_in_order_with_per_request_errors(served, reference):
    _, _, ids, _ = reference
    with RecommenderClient(served.target) as client:
        reqs = [request([ids[i]], 3, request_id=f"r{i}") for i in range(50)]
        reqs[10] = request([ids[1]], 1001, request_id="bad")  # over --max-k
        replies = list(client.recommend_stream(reqs))
    assert [r.request_id for r in replies] == [r.request_id for r in reqs]
    assert replies[10].error[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not replies[10].items
    assert all(r.error is None and len(r.items) == 3 for i, r in enumerate(replies) if i != 10)
    single = RecommenderClient(served.target).recommend([ids[5]], 3)
    assert replies[5].items == single.items


def test_model_info(served, reference):
    *_, manifest = reference
    info = RecommenderClient(served.target).model_info()
    assert info["model"] == "seq" and info["version"] == manifest.version
    assert info["max_history"] == manifest.model.max_len and info["item_id_type"] == "int64"
    assert info["providers"] == ["CPUExecutionProvider"] and not info["has_ranker"]
    assert info["metrics"] == manifest.metrics.to_dict()


def test_encoder_and_pipeline_tensor_models(served, reference):
    enc, vectors, ids, manifest = reference
    host = served.server.models
    assert [m.name for m in host.models()] == ["encoder", "pipeline"]  # no ranker in this version
    a = np.array([[0, 0, 5, 9, 2]], np.int64)  # left-padded
    b = np.array([[7, 1], [3, 4]], np.int64)

    async def both():
        return await asyncio.gather(
            host.get("encoder").infer({"history": a}), host.get("encoder").infer({"history": b})
        )

    out_a, out_b = served.call(both())
    np.testing.assert_allclose(out_a["query"], encode(enc, a)["query"], atol=1e-5)
    np.testing.assert_allclose(out_b["query"], encode(enc, b)["query"], atol=1e-5)
    with pytest.raises(InvalidRequest, match="tokens must be in"):
        served.call(host.get("encoder").infer({"history": np.array([[len(ids) + 1]])}))

    hist = np.array([[ids[3].encode(), ids[4].encode(), b""], [b"", b"", b""]], dtype=object)
    out = served.call(host.get("pipeline").infer({"history": hist, "k": np.array([[4], [2]])}))
    single = RecommenderClient(served.target).recommend([ids[3], ids[4]], 4)
    assert [x.decode() for x in out["items"][0]] == single.items
    assert out["items"].shape == (2, 4) and out["items"][1, 2] == b"" and np.isneginf(out["scores"][1, 2])
    assert out["popularity_fallback"].tolist() == [[False], [True]]
    stats = host.get("pipeline").stats
    assert stats.success_count >= 2 and stats.execution_count >= 1 and sum(c for c, _ in stats.batch_stats.values())


def test_ranker_version_is_served_through_the_ranker(trained_repo, tmp_path):
    _, repo = trained_repo
    src, _ = newest_valid_version(repo, "seq")
    clone_version(src, tmp_path / "repo", ranker_onnx=toy_ranker(tmp_path / "r.onnx"), n_candidates=30)
    pipe = Pipeline.load(newest_valid_version(tmp_path / "repo", "seq")[0])
    assert pipe.ranker is not None
    ids = pipe.item_ids.astype(str)
    with RunningServer(settings(tmp_path / "repo")) as s, RecommenderClient(s.target) as client:
        info = client.model_info()
        assert info["has_ranker"] and info["default_n_candidates"] == 30
        reordered = False
        for h in ([3, 50, 7], [100], list(range(20, 40))):
            r = client.recommend(ids[h].tolist(), 5, timings=True)
            want = pipe.recommend([np.array(h)], 5)
            assert r.items == ids[want.rows[0]].tolist()
            np.testing.assert_allclose(r.scores, want.scores[0], atol=1e-5)
            assert r.timings["ranker_ms"] > 0
            plain = pipe.recommend([np.array(h)], 5, rank=False)
            reordered |= r.items != ids[plain.rows[0]].tolist()
        assert reordered  # the ranker really changed the answer
        host = s.server.models
        assert [m.name for m in host.models()] == ["encoder", "ranker", "pipeline"]
        ranker = host.get("ranker")
        assert [t.name for t in ranker.inputs] == ["history", "candidates", "candidate_scores"]
        feeds = {
            "history": np.array([[0, 4, 9]]),
            "candidates": np.array([[5, 8, 1, 0]]),
            "candidate_scores": np.array([[0.5, 0.1, 0.3, 0.0]], np.float32),
        }
        feeds2 = {
            "history": np.array([[2]]),
            "candidates": np.array([[3, 2]]),
            "candidate_scores": np.zeros((1, 2), np.float32),
        }

        async def both():
            return await asyncio.gather(ranker.infer(feeds), ranker.infer(feeds2))

        got, got2 = s.call(both())
        np.testing.assert_allclose(got["scores"], score(pipe.ranker, feeds), atol=1e-6)
        np.testing.assert_allclose(got2["scores"], score(pipe.ranker, feeds2), atol=1e-6)
