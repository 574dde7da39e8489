"""The ranker's time and context features: the buckets and clock codes, the unknown-time path in torch
and ONNX, the training samples' timestamps, and serving history_timestamps (request, stored history,
KServe) over a real port."""

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from serving import RunningServer, clone_version, settings

from attnrec.engine.client import RecommenderClient
from attnrec.engine.pipeline import Pipeline, score
from attnrec.engine.ranker import OnnxRanker
from attnrec.engine.repository import newest_valid_version
from attnrec.export.config import RankerConfig
from attnrec.export.index_build import build_index
from attnrec.export.ranker_export import check_ranker_parity, export_ranker
from attnrec.export.ranker_model import TIME_BUCKETS, RankerShape, TargetAttentionRanker
from attnrec.export.ranker_train import torch_encode, training_prefixes, training_samples

FUTURE = 4_102_444_800  # 2100-01-01 UTC: later than the server's clock, so it is the request time


def _time_ranker(n_items, dim, keys="items", item_vectors=None, seed=0):
    """A ranker with time features whose every weight is non-zero (trained-like)."""
    shape = RankerShape(n_items, dim, attend_last=8, keys=keys, mlp_dim=16, feature_dim=4, time=True)
    ranker = TargetAttentionRanker(shape, item_vectors).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ranker.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ranker


def test_ages_are_log2_buckets_of_seconds_and_the_clock_codes_match_the_calendar():
    ctx = _time_ranker(10, 8).time_side
    ages = [0, 1, 2, 3, 4, 7, 8, 59, 60, 3599, 3600, 86_399, 86_400, 2**29, 2**30 - 2, 2**30 - 1, 2**40]
    now = 2**41  # late enough for every age to have a positive timestamp
    stamps = torch.tensor([[now - a for a in ages]])
    got, gap, _, _ = ctx.codes(stamps, torch.tensor([[now]]))
    want = [1 + min((1 + a).bit_length() - 1, TIME_BUCKETS - 2) for a in ages]
    assert got[0].tolist() == want and gap.item() == want[-1]  # the newest position is the last one
    assert max(want) == TIME_BUCKETS - 1
    rng = np.random.default_rng(0)
    times = rng.integers(1, 4_000_000_000, size=200)
    _, _, hour, weekday = ctx.codes(torch.zeros(200, 3, dtype=torch.long), torch.from_numpy(times)[:, None])
    cal = [dt.datetime.fromtimestamp(int(t), dt.timezone.utc) for t in times]
    assert hour[:, 0].tolist() == [c.hour + 1 for c in cal]
    assert weekday[:, 0].tolist() == [c.weekday() + 1 for c in cal]
    # Unknown: no request time makes every code 0; an unknown or padded history position has age 0.
    now = 1_700_000_000
    codes = ctx.codes(torch.tensor([[0, now - 5, now - 50]]), torch.tensor([[0]]))
    assert all((c == 0).all() for c in codes)
    ages, gap, hour, _ = ctx.codes(torch.tensor([[0, now - 5, -3]]), torch.tensor([[now]]))
    assert ages.tolist() == [[0, 3, 0]] and gap.item() == 0 and hour.item() > 0


@pytest.mark.parametrize("keys", ["items", "hidden"])
def test_without_timestamps_the_ranker_takes_its_unknown_time_path_in_torch_and_onnx(tmp_path, tiny_model, keys):
    ranker = _time_ranker(tiny_model.cfg.n_items, tiny_model.cfg.dim, keys)
    path = tmp_path / "ranker.onnx"
    names = export_ranker(ranker, path)
    assert names[-2:] == ["history_timestamps", "request_time"]
    assert check_ranker_parity(ranker, tiny_model, path).max_abs_diff < 1e-4  # with and without times
    onnx = OnnxRanker(path)
    assert onnx.reads_time
    rng = np.random.default_rng(1)
    tokens = np.array([[0, 0, 3, 9, 4, 11], [5, 6, 7, 8, 9, 10]])
    now = np.array([[1_700_000_000], [1_700_100_000]])
    stamps = np.where(tokens > 0, now - np.sort(rng.integers(10, 10**7, size=tokens.shape))[:, ::-1], 0)
    feeds = {
        "history": tokens,
        "candidates": rng.integers(1, 60, size=(2, 9)),
        "candidate_scores": rng.normal(size=(2, 9)),
    }
    feeds["candidate_scores"] = feeds["candidate_scores"].astype(np.float32)
    feeds["hidden"] = tiny_model.hidden(torch.from_numpy(tokens)).detach().numpy()

    def torch_scores(history_timestamps, request_time):
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        args = (t["history"], t["hidden"], t["candidates"], t["candidate_scores"], None)
        as_t = [
            None if x is None else torch.from_numpy(np.asarray(x, dtype=np.int64))
            for x in (history_timestamps, request_time)
        ]
        with torch.no_grad():
            return ranker(*args, *as_t).numpy()

    unknown = torch_scores(None, None)
    np.testing.assert_allclose(torch_scores(np.zeros_like(tokens), np.zeros((2, 1))), unknown, atol=1e-6)
    np.testing.assert_allclose(torch_scores(stamps, np.zeros((2, 1))), unknown, atol=1e-6)  # no request time
    known = torch_scores(stamps, now)
    assert np.abs(known - unknown).max() > 1e-3  # the times move the scores
    # onnxruntime: inputs left out = zeros = torch's unknown path; given = torch's known path.
    np.testing.assert_allclose(score(onnx, feeds), unknown, atol=1e-5)
    zeros = {**feeds, "history_timestamps": np.zeros_like(tokens), "request_time": np.zeros((2, 1), np.int64)}
    np.testing.assert_allclose(score(onnx, zeros), unknown, atol=1e-5)
    np.testing.assert_allclose(
        score(onnx, {**feeds, "history_timestamps": stamps, "request_time": now}), known, atol=1e-5
    )


def test_training_samples_carry_the_logs_timestamps_and_the_target_time_as_request_time(small_split, tiny_model):
    vectors = np.ascontiguousarray(tiny_model.item_vectors().detach().numpy())
    index = build_index(vectors, "Flat")
    cfg = RankerConfig(n_candidates=20, samples_per_user=3, attend_last=8)
    sets, _ = training_samples(small_split, torch_encode(tiny_model), 20, index, vectors, cfg)
    assert sets.times.shape == sets.tokens.shape and sets.request_time.shape == (len(sets), 1)
    data = small_split.data
    users, cuts = training_prefixes(small_split, 3)
    starts = data.offsets[users] + cuts
    # A user's targets are distinct (a target is never in its prefix): (user, target) names the prefix.
    prefix = {(int(u), int(data.items[s])): (int(t), int(s)) for u, t, s in zip(users, cuts, starts)}
    assert len(prefix) == len(users) and len(sets) > 100
    for j in range(len(sets)):
        t, s = prefix[int(sets.users[j]), int(sets.candidates[j, sets.target_slot[j]])]
        m = min(8, t)
        assert (sets.tokens[j, -m:] == data.items[s - m : s]).all()
        assert (sets.times[j, -m:] == np.floor(data.timestamps[s - m : s])).all()  # aligned with the tokens
        assert (sets.times[j, : 8 - m] == 0).all()  # padding: unknown
        assert sets.request_time[j, 0] == int(data.timestamps[s])  # the target's timestamp


@pytest.fixture(scope="module")
def time_served(trained_repo, tmp_path_factory):
    """The trained version with a time ranker (random weights) in a repository of its own."""
    root = tmp_path_factory.mktemp("time-ranker")
    src, manifest = newest_valid_version(trained_repo[1], "seq")
    vectors = np.load(Path(src) / manifest.files.item_embeddings.path)
    ranker = _time_ranker(manifest.model.n_items, manifest.model.dim, item_vectors=torch.from_numpy(vectors))
    path = root / "time-ranker.onnx"
    export_ranker(ranker, path)
    clone_version(src, root / "repo", ranker_onnx=path, n_candidates=30)
    return root / "repo", ranker, Pipeline.load(newest_valid_version(root / "repo", "seq")[0])


def test_recommend_with_history_timestamps_and_stored_ones_over_grpc(time_served):
    repo, _, pipe = time_served
    ids = pipe.item_ids.astype(str)
    h = np.array([3, 50, 7, 21, 9])
    stamps = FUTURE - np.array([90 * 86_400, 86_400, 7200, 600, 30])  # the newest is the request time
    ranked = pipe.recommend([h], 10, history_times=[stamps], request_times=[int(stamps.max())])
    plain = pipe.recommend([h], 10)  # no times: the unknown path
    assert ranked.rows[0].tolist() != plain.rows[0].tolist()
    with RunningServer(settings(repo)) as s, RecommenderClient(s.target) as client:
        r = client.recommend(ids[h].tolist(), 10, history_timestamps=stamps.tolist())
        assert r.items == ids[ranked.rows[0]].tolist()
        np.testing.assert_allclose(r.scores, ranked.scores[0], atol=1e-5)
        r = client.recommend(ids[h].tolist(), 10)
        assert r.items == ids[plain.rows[0]].tolist()
        # Unknown ids are skipped with their timestamps.
        r = client.recommend(
            [*ids[h[:2]], "no-such-item", *ids[h[2:]]], 10, history_timestamps=[*stamps[:2], 5, *stamps[2:]]
        )
        assert r.items == ids[ranked.rows[0]].tolist() and r.unknown_items == 1
        with pytest.raises(grpc.RpcError) as err:
            client.recommend(ids[h].tolist(), 10, history_timestamps=stamps[:3].tolist())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "history_timestamps has 3 values for 5 history items" in err.value.details()
        # A stored history brings its timestamps; request items after it without times are unknown-time ones.
        assert client.record_events("u-time", ids[h[:3]].tolist(), stamps[:3].tolist()) == 3
        r = client.recommend(ids[h[3:]].tolist(), 10, user_id="u-time")
        mixed = np.concatenate([stamps[:3], [0, 0]])
        want = pipe.recommend([h], 10, history_times=[mixed], request_times=[int(stamps[:3].max())])
        assert r.stored_events == 3 and r.items == ids[want.rows[0]].tolist()
        np.testing.assert_allclose(r.scores, want.scores[0], atol=1e-5)


def test_kserve_ranker_and_pipeline_take_optional_timestamps(time_served):
    repo, ranker, pipe = time_served
    ids = pipe.item_ids.astype(str)
    with RunningServer(settings(repo)) as s:
        model = s.server.models.get("ranker")
        assert [(t.name, t.optional) for t in model.inputs][-2:] == [
            ("history_timestamps", True),
            ("request_time", True),
        ]
        feeds = {
            "history": np.array([[0, 4, 9, 12]]),
            "candidates": np.array([[5, 8, 1, 0]]),
            "candidate_scores": np.array([[0.5, 0.1, 0.3, 0.0]], np.float32),
        }
        times = {
            "history_timestamps": np.array([[0, 1_600_000_000, 1_600_050_000, 1_600_086_000]]),
            "request_time": np.array([[1_600_090_000]]),
        }
        pipeline = s.server.models.get("pipeline")
        assert ("history_timestamps", True) in [(t.name, t.optional) for t in pipeline.inputs]
        h = np.array([[ids[3], ids[50], ids[7], ""]], dtype=object)
        stamps = np.array([[FUTURE - 900, FUTURE - 60, FUTURE, 12345]])  # the padding cell's value is ignored

        async def calls():
            return await asyncio.gather(
                model.infer(feeds),
                model.infer({**feeds, **times}),
                pipeline.infer({"history": h, "history_timestamps": stamps}),
                pipeline.infer({"history": h}),
            )

        plain, timed, piped, unpiped = s.call(calls())
        with pytest.raises(Exception, match="history_timestamps"):
            s.call(model.infer({**feeds, "history_timestamps": np.zeros((1, 3), np.int64)}))
        with pytest.raises(Exception, match="history_timestamps"):
            s.call(pipeline.infer({"history": h, "history_timestamps": stamps[:, :2]}))
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in {**feeds, **times}.items()}
        args = (t["history"], None, t["candidates"], t["candidate_scores"], None)
        np.testing.assert_allclose(plain["scores"], ranker(*args).numpy(), atol=1e-5)
        want = ranker(*args, t["history_timestamps"], t["request_time"]).numpy()
        np.testing.assert_allclose(timed["scores"], want, atol=1e-5)
    rows = np.array([3, 50, 7])
    want = pipe.recommend([rows], 10, history_times=[stamps[0, :3]], request_times=[FUTURE])
    assert [x.decode() for x in piped["items"][0]] == ids[want.rows[0]].tolist()
    assert [x.decode() for x in unpiped["items"][0]] == ids[pipe.recommend([rows], 10).rows[0]].tolist()
