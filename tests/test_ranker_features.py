"""The ranker's leak-free samples (a hold-out encoder) and side features: the split, the samples'
provenance, what features do to the scores, ONNX parity, publishing and serving over gRPC."""

import asyncio
import functools
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from serving import RunningServer, clone_version, settings

from attnrec.engine.client import RecommenderClient
from attnrec.engine.pipeline import Pipeline, encode, score
from attnrec.engine.ranker import OnnxRanker, coded_matrix, user_feature_codes
from attnrec.engine.repository import DataSection, TrainingSection, newest_valid_version
from attnrec.export.config import RankerConfig, TrainConfig
from attnrec.export.data.features import feature_tables
from attnrec.export.data.sequences import hold_out_last
from attnrec.export.ranker_export import check_ranker_parity, export_ranker
from attnrec.export.ranker_model import RankerShape, TargetAttentionRanker, coded_columns, features
from attnrec.export.ranker_train import heldout_positions, memorisation, training_prefixes
from attnrec.export.train import training_windows


@pytest.fixture(scope="module")
def tables(tmp_path_factory, small_split):
    """Item features (multi-valued genres, a numeric year) for all but 5 items; user features
    (occupation, age) for every other user."""
    root = tmp_path_factory.mktemp("ranker-features")
    data = small_split.data
    genres = ["Action", "Drama", "Comedy", "Horror"]
    items = "".join(
        f"{i}\t{genres[k % 4]} {genres[(k // 4) % 4]}\t{1950 + k % 40}\n" for k, i in enumerate(data.item_ids[6:])
    )
    (root / "s.item").write_text("item_id:token\tclass:token_seq\tyear:float\n" + items)
    users = "".join(f"{u},{'abc'[u % 3]},{18 + u % 50}\n" for u in data.user_ids[::2])
    (root / "s.csv").write_text("user_id,occupation,age\n" + users)
    return feature_tables(
        data.item_ids[1:], data.user_ids, item_path=root / "s.item", user_path=root / "s.csv", roles={"age": "numeric"}
    )


def _ranker(tables, n_items, dim, keys="items", item_vectors=None, seed=0, time=False, cross_dim=0):
    """A ranker with both feature groups (and, with `time`, the time features) whose every weight is
    non-zero (trained-like)."""
    shape = RankerShape(
        n_items,
        dim,
        attend_last=8,
        keys=keys,
        mlp_dim=16,
        item_columns=coded_columns(tables.item),
        user_columns=coded_columns(tables.user),
        feature_dim=4,
        time=time,
        cross_dim=cross_dim,
    )
    ranker = TargetAttentionRanker(shape, item_vectors, None, coded_matrix(tables.item)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ranker.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ranker


def test_hold_out_last_removes_exactly_r_per_user_and_leaves_validation_and_test_alone(small_split):
    r = 3
    held = hold_out_last(small_split, r)
    assert held.data is small_split.data and held.valid is small_split.valid and held.test is small_split.test
    full, kept = small_split.train_lengths(), held.train_lengths()
    assert (full > r).any() and ((full - kept)[full > r] == r).all()
    assert (kept[full <= r] == np.minimum(full[full <= r], 1)).all()  # a short user keeps its first item
    for u in range(small_split.data.n_users):
        assert (held.train_sequence(u) == small_split.train_sequence(u)[: kept[u]]).all()
    assert held.train_popularity().sum() == small_split.train_popularity().sum() - (full - kept).sum()
    with pytest.raises(ValueError, match="at least one"):
        hold_out_last(small_split, 0)


def test_sample_targets_were_never_in_the_candidate_encoders_training_data(small_split):
    held = hold_out_last(small_split, 3)
    users, cuts = heldout_positions(small_split, held)
    data = small_split.data
    trained = np.zeros(len(data.items), dtype=bool)  # every position the hold-out encoder reads
    for a, b in zip(*training_windows(held, 20)):
        trained[a:b] = True
    targets = data.offsets[users] + cuts
    assert len(targets) and not trained[targets].any()
    # ... and all of them are training interactions of the served split (never validation or test targets),
    # one per held-out interaction that can be ranked (not already in its prefix).
    assert (cuts < small_split.train_lengths()[users]).all() and (cuts >= held.train_lengths()[users]).all()
    want = sum(
        int(small_split.train_sequence(u)[t] not in small_split.train_sequence(u)[:t])
        for u in range(data.n_users)
        for t in range(max(int(held.train_lengths()[u]), 1), int(small_split.train_lengths()[u]))
    )
    assert len(targets) == want


def test_features_change_the_scores_and_unknown_users_get_the_unknown_row(tables, small_split):
    ranker = _ranker(tables, small_split.data.n_items, 16)
    ids = small_split.data.user_ids
    codes = user_feature_codes(tables, [str(ids[0]), str(ids[1]), "no-such-user"])  # ids[1] is not in the file
    assert codes.shape == (3, ranker.shape.user_width) and (codes[0] > 0).all()
    assert (codes[1:] == 0).all()
    rng = np.random.default_rng(0)
    history = torch.from_numpy(rng.integers(1, 50, size=(3, 6)))
    cands = torch.from_numpy(rng.integers(100, 200, size=(3, 9)))
    scores = torch.randn(3, 9)
    with torch.no_grad():
        known = ranker(history, None, cands, scores, torch.from_numpy(codes))
        unknown = ranker(history, None, cands, scores, None)
        beyond = ranker(history, None, cands, scores, torch.full_like(torch.from_numpy(codes), 10**6))
        np.testing.assert_allclose(known[1:], unknown[1:], atol=1e-6)
        assert (known[0] - unknown[0]).abs().max() > 1e-3  # a known user's features move its scores
        np.testing.assert_allclose(beyond, unknown, atol=1e-6)  # a code the vocabulary lacks is unknown
        # An item's features move its own score (it is not in any history here) and no other one.
        tok = int(cands[0, 4])
        assert ranker.item_codes[tok].any()
        ranker.item_codes[tok] = 0
        changed = ranker(history, None, cands, scores, None)
    moved = (changed - unknown).abs() > 1e-6
    assert moved[cands == tok].all() and not moved[cands != tok].any()


@pytest.mark.parametrize("keys", ["items", "hidden"])
def test_onnx_ranker_with_features_matches_torch_and_user_features_are_optional(tmp_path, tables, tiny_model, keys):
    ranker = _ranker(tables, tiny_model.cfg.n_items, tiny_model.cfg.dim, keys)
    path = tmp_path / "ranker.onnx"
    names = export_ranker(ranker, path)
    history = ["history", "hidden"] if keys == "hidden" else ["history"]
    assert names == [*history, "candidates", "candidate_scores", "user_features"]
    report = check_ranker_parity(ranker, tiny_model, path)
    assert report.max_abs_diff < 1e-4
    onnx = OnnxRanker(path)
    assert onnx.reads_user_features and onnx.user_width == ranker.shape.user_width
    tokens = np.array([[0, 0, 3, 9, 4]])
    feeds = {"history": tokens, "candidates": np.array([[7, 2, 0]]), "candidate_scores": np.ones((1, 3), np.float32)}
    feeds["hidden"] = tiny_model.hidden(torch.from_numpy(tokens)).detach().numpy()
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        want = ranker(t["history"], t["hidden"], t["candidates"], t["candidate_scores"], None).numpy()
    np.testing.assert_allclose(score(onnx, feeds)[:, :2], want[:, :2], atol=1e-5)  # left out: unknown user


@pytest.mark.parametrize("time", [False, True])
def test_the_feature_cross_starts_at_zero_exports_folded_and_matches_torch(tmp_path, tables, tiny_model, time):
    n_items, dim = tiny_model.cfg.n_items, tiny_model.cfg.dim
    shape = RankerShape(
        n_items,
        dim,
        attend_last=8,
        mlp_dim=16,
        item_columns=coded_columns(tables.item),
        user_columns=coded_columns(tables.user),
        feature_dim=4,
        time=time,
        cross_dim=3,
    )
    fresh = TargetAttentionRanker(shape, None, None, coded_matrix(tables.item)).eval()
    rng = np.random.default_rng(1)
    cands = torch.from_numpy(rng.integers(1, n_items + 1, size=(2, 9)))
    scores = torch.randn(2, 9)
    users = torch.ones(2, shape.user_width, dtype=torch.long)
    now = torch.full((2, 1), 1_700_000_000, dtype=torch.long)
    with torch.no_grad():  # a new ranker is stage one's order exactly, the cross included
        got = fresh(torch.ones(2, 4, dtype=torch.long), None, cands, scores, users, None, now if time else None)
    np.testing.assert_array_equal(got.numpy(), scores.numpy())
    ranker = _ranker(tables, n_items, dim, time=time, cross_dim=3)
    assert ranker.cross_ctx is not None and ranker.cross_ctx.weight.abs().min() > 0
    with torch.no_grad():  # the trained-like cross moves the scores
        base = ranker(torch.ones(2, 4, dtype=torch.long), None, cands, scores, users, None, now if time else None)
        ranker.cross_ctx.weight.zero_()
        without = ranker(torch.ones(2, 4, dtype=torch.long), None, cands, scores, users, None, now if time else None)
        assert (base - without).abs().max() > 1e-3
    ranker = _ranker(tables, n_items, dim, time=time, cross_dim=3)
    path = tmp_path / "ranker.onnx"
    export_ranker(ranker, path)  # the cross's item side folded into a token-indexed table
    assert check_ranker_parity(ranker, tiny_model, path).max_abs_diff < 1e-4
    assert "cross, rank 3" in " ".join(features(shape))


def _publish_small(tmp_path, model, split, tcfg, rcfg, **kw):
    """publish into tmp_path/repo as model "m", with small index tuning and evaluation."""
    from attnrec.export.publish import publish

    return publish(
        model,
        split,
        tmp_path / "repo",
        "m",
        training=TrainingSection(config=asdict(tcfg)),
        data=DataSection("synthetic", split.data.n_users),
        tune_queries=50,
        eval_users=60,
        ranker=rcfg,
        progress=False,
        **kw,
    )


def test_publish_trains_the_ranker_leak_free_with_features_and_evaluates_with_user_ids(tmp_path, tables, small_split):
    from attnrec.export.model import SASRec

    tcfg = TrainConfig(max_len=10, dim=8, n_blocks=1, n_heads=1, ffn_dim=16, epochs=1, batch_size=128, threads=2)
    torch.manual_seed(0)
    model = SASRec(tcfg.model_config(small_split.data.n_items))
    rcfg = RankerConfig(n_candidates=30, attend_last=8, mlp_dim=16, holdout=2, epochs=1, val_users=100, threads=2)
    version, manifest, metrics = _publish_small(tmp_path, model, small_split, tcfg, rcfg, features=tables)
    section = manifest.ranker
    # The log has timestamps, so the default feature groups include time.
    time_inputs = ["history_timestamps", "request_time"]
    assert list(section.inputs) == ["history", "candidates", "candidate_scores", "user_features", *time_inputs]
    assert section.shape["time"] == 1
    assert section.training.config["holdout"] == 2 and section.shape["user_columns"].startswith("occupation:")
    # The held-out interactions of each user with at least 3 training items, those stage one found.
    assert 0 < section.training.samples <= 2 * small_split.data.n_users
    pipe = Pipeline.load(version)
    assert pipe.features.user is not None  # loaded because the ranker reads user features
    hist = [small_split.test.history(j) - 1 for j in range(4)]
    users = [str(u) for u in small_split.data.user_ids[small_split.test.users[:4]]]
    with_ids = pipe.recommend(hist, 10, exclude=hist, user_ids=users)
    without = pipe.recommend(hist, 10, exclude=hist)
    unknown = pipe.recommend(hist, 10, exclude=hist, user_ids=["nobody"] * 4)
    np.testing.assert_array_equal(without.rows, unknown.rows)
    assert with_ids.rows.shape == (4, 10) and "ranked" in metrics["pipeline"]


def _recall_by_hand(model, histories, targets, n):
    """Exact top-n by numpy: the model's query for each history, seen items excluded, target among them?"""
    vectors = model.item_vectors().detach().numpy()
    hits = 0
    for hist, target in zip(histories, targets):
        tokens = torch.from_numpy(np.asarray(hist, dtype=np.int64)[-model.cfg.max_len :][None])
        with torch.no_grad():
            q = model.eval().hidden(tokens)[0, -1].numpy()
        scores = vectors @ q
        scores[np.asarray(hist) - 1] = -np.inf
        hits += int(target - 1 in np.argsort(-scores, kind="stable")[:n])
    return hits / len(targets)


def test_memorisation_is_stage_ones_recall_of_training_against_validation_targets(tiny_model, small_split):
    from attnrec.export.publish import ranker_stage_one

    s1 = ranker_stage_one(tiny_model, "Flat")
    got = memorisation(
        small_split, s1, RankerConfig(n_candidates=20), users=10**6
    )  # every user: the reference need not sample
    users, cuts = training_prefixes(small_split, 1)
    starts = small_split.data.offsets[users]
    hist = [small_split.data.items[a : a + t] for a, t in zip(starts, cuts)]
    train = _recall_by_hand(tiny_model, hist, small_split.data.items[starts + cuts], 20)
    val = small_split.valid
    valid = _recall_by_hand(tiny_model, [val.history(j) for j in range(len(val))], val.targets, 20)
    assert (got.train_users, got.valid_users) == (len(users), len(val))
    # (FAISS and numpy may order a near-tie at the cut differently: one user either way)
    assert abs(got.train_recall - train) <= 1 / len(users) and abs(got.valid_recall - valid) <= 1 / len(val)
    assert got.ratio == pytest.approx(got.train_recall / got.valid_recall)
    # The trained model retrieves its own training targets more often than validation ones
    assert got.train_recall > got.valid_recall > 0


@pytest.mark.parametrize("threshold, held", [(1e-6, 1), (1e6, 0)])
def test_holdout_auto_holds_out_the_last_interaction_only_when_stage_one_memorised(
    tmp_path, tiny_model, small_split, threshold, held
):
    tcfg = TrainConfig(max_len=20, dim=32, n_blocks=2, n_heads=2, ffn_dim=64, epochs=1, batch_size=64, threads=2)
    rcfg = RankerConfig(
        n_candidates=30,
        attend_last=8,
        mlp_dim=16,
        epochs=1,
        val_users=100,
        threads=2,
        features="none",
        holdout_auto=threshold,
    )
    _, manifest, _ = _publish_small(tmp_path, tiny_model, small_split, tcfg, rcfg)
    chosen, samples = manifest.ranker.training.memorisation, manifest.ranker.training.samples
    probe = memorisation(small_split, _published_stage_one(tmp_path), rcfg, seed=rcfg.seed)
    assert chosen["holdout"] == held and chosen["ratio"] == pytest.approx(probe.ratio, abs=1e-3)
    recent = training_prefixes(small_split, rcfg.samples_per_user)[0]
    if held:  # at most one held-out interaction per user, those the hold-out encoder retrieved
        assert 0 < samples <= small_split.data.n_users
    else:  # the recent prefixes the served encoder retrieved, up to samples_per_user per user
        assert small_split.data.n_users < samples <= len(recent)


def _published_stage_one(tmp_path):
    """The published version's own stage one (its ONNX encoder, index and item vectors), as publish probed it."""
    from attnrec.export.ranker_train import StageOne

    pipe = Pipeline.load(newest_valid_version(tmp_path / "repo", "m")[0])
    return StageOne(functools.partial(encode, pipe.encoder), pipe.max_len, pipe.index, pipe.reranker.item_vectors)


def test_a_ranker_with_features_serves_over_grpc_unchanged(trained_repo, tmp_path, tables):
    src, manifest = newest_valid_version(trained_repo[1], "seq")
    vectors = np.load(Path(src) / manifest.files.item_embeddings.path)
    ranker = _ranker(tables, manifest.model.n_items, manifest.model.dim, item_vectors=torch.from_numpy(vectors))
    clone_version(src, tmp_path / "repo", ranker_onnx=export_ranker_file(ranker, tmp_path), n_candidates=30)
    pipe = Pipeline.load(newest_valid_version(tmp_path / "repo", "seq")[0])
    ids = pipe.item_ids.astype(str)
    with RunningServer(settings(tmp_path / "repo")) as s, RecommenderClient(s.target) as client:
        reordered = False
        for h in ([3, 50, 7], [100], list(range(20, 40))):
            r = client.recommend(ids[h].tolist(), 5)
            want = pipe.recommend([np.array(h)], 5)  # no user id: unknown user features
            assert r.items == ids[want.rows[0]].tolist()
            np.testing.assert_allclose(r.scores, want.scores[0], atol=1e-5)
            reordered |= r.items != ids[pipe.recommend([np.array(h)], 5, rank=False).rows[0]].tolist()
        assert reordered
        model = s.server.models.get("ranker")
        assert [(t.name, t.optional) for t in model.inputs][-1] == ("user_features", True)
        feeds = {
            "history": np.array([[0, 4, 9]]),
            "candidates": np.array([[5, 8, 1, 0]]),
            "candidate_scores": np.array([[0.5, 0.1, 0.3, 0.0]], np.float32),
        }
        codes = user_feature_codes(tables, [str(tables.user.ids[1])])  # a user the file has

        async def both():
            return await asyncio.gather(model.infer(feeds), model.infer({**feeds, "user_features": codes}))

        plain, known = s.call(both())
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        args = (t["history"], None, t["candidates"], t["candidate_scores"])
        np.testing.assert_allclose(plain["scores"], ranker(*args, None).numpy(), atol=1e-5)
        np.testing.assert_allclose(known["scores"], ranker(*args, torch.from_numpy(codes)).numpy(), atol=1e-5)
    assert np.abs(plain["scores"] - known["scores"]).max() > 1e-4


def export_ranker_file(ranker, tmp_path) -> Path:
    path = tmp_path / "features-ranker.onnx"
    export_ranker(ranker, path)
    return path
