"""The ranker's wide features. The item-item collaborative score (export/ease.py): EASE against an
independent ridge solution, the sparse scores against a dense sum, the graph's scatter-add against
numpy and onnxruntime, and leak-free sample scores (a sample's own user never shapes its B). The
trend features (export/trend.py): counts by hand, the graph's lookups against numpy and onnxruntime."""

import dataclasses

import numpy as np
import pytest
import torch

from attnrec.engine.pipeline import score
from attnrec.engine.ranker import OnnxRanker
from attnrec.export import ease, trend
from attnrec.export.config import RankerConfig
from attnrec.export.ranker_export import check_ranker_parity, export_ranker
from attnrec.export.ranker_model import RankerShape, TargetAttentionRanker
from attnrec.export.ranker_train import training_pairs


def _random_log(rng, n_users=40, n_items=12, per_user=5):
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.integers(1, n_items + 1, size=len(users))
    return users, items


def test_ease_solves_each_items_ridge_regression_on_the_other_items():
    rng = np.random.default_rng(0)
    users, items = _random_log(rng)
    x = ease.interaction_matrix(users, items, 40, 13)
    lam = 7.0
    b = ease.fit(x, lam)
    dense = x.toarray().astype(np.float64)
    assert set(np.unique(dense)) <= {0.0, 1.0} and dense[:, 0].sum() == 0  # binary; padding column empty
    for j in range(1, 13):
        # Item j from the items other than j (and not padding): argmin ||x_j - X b||² + λ||b||².
        others = [c for c in range(1, 13) if c != j]
        xo = dense[:, others]
        ridge = np.linalg.solve(xo.T @ xo + lam * np.eye(len(others)), xo.T @ dense[:, j])
        np.testing.assert_allclose(b[others, j], ridge, rtol=1e-4, atol=1e-6)
        assert b[j, j] == 0.0
    assert not b[0].any() and not b[:, 0].any()
    with pytest.raises(ValueError, match="lambda"):
        ease.fit(x, 0.0)


def test_sparse_scores_are_the_dense_sum_over_the_history_of_the_kept_weights():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(30, 30)).astype(np.float32)
    np.fill_diagonal(b, 0)
    b[0], b[:, 0] = 0, 0
    nb = ease.sparsify(b, 5, 1.0)
    assert nb.items.shape == (30, 5) and not nb.items[0].any() and not nb.weights[0].any()
    kept = np.zeros_like(b)
    for r in range(1, 30):
        strongest = np.argsort(-np.abs(b[r]))[:5]
        np.testing.assert_array_equal(np.sort(nb.items[r]), np.sort(strongest))
        kept[r, strongest] = b[r, strongest]
    history = rng.integers(0, 30, size=(7, 9))
    history[:, :3] = 0  # left padding
    history[0, 5] = history[0, 6]  # a repeated item counts twice, as in the graph
    candidates = rng.integers(0, 30, size=(7, 11))
    want = np.array([[kept[h, c].sum() for c in cand] for h, cand in zip(history, candidates)])
    want[candidates == 0] = 0.0  # an empty slot reads nothing
    np.testing.assert_allclose(ease.scores(nb, history, candidates, chunk=3), want, rtol=1e-5, atol=1e-6)


def _cf_ranker(n_items, dim, nb, seed=0):
    shape = RankerShape(n_items, dim, attend_last=8, mlp_dim=16, cf_neighbours=nb.k)
    ranker = TargetAttentionRanker(shape, neighbours=nb).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ranker.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ranker


def test_the_graph_computes_numpys_scores_and_onnxruntime_the_graphs(tmp_path, tiny_model):
    n, dim = tiny_model.cfg.n_items, tiny_model.cfg.dim
    rng = np.random.default_rng(2)
    users, items = _random_log(rng, n_users=80, n_items=n, per_user=6)
    nb = ease.sparsify(ease.fit(ease.interaction_matrix(users, items, 80, n + 1), 5.0), 6, 5.0)
    ranker = _cf_ranker(n, dim, nb)
    history = rng.integers(1, n + 1, size=(4, 8))
    history[1, :5] = 0
    candidates = rng.integers(1, n + 1, size=(4, 10))
    candidates[2, 7:] = 0
    with torch.no_grad():
        got = ranker.cf(torch.from_numpy(history), torch.from_numpy(candidates)).numpy()
    np.testing.assert_allclose(got, ease.scores(nb, history, candidates), rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() > 0.01

    path = tmp_path / "ranker.onnx"
    names = export_ranker(ranker, path)
    assert "cf_scores" not in names  # baked: serving needs no new input
    assert check_ranker_parity(ranker, tiny_model, path).max_abs_diff < 1e-4
    feeds = {
        "history": history,
        "candidates": candidates,
        "candidate_scores": rng.normal(size=(4, 10)).astype(np.float32),
    }
    t = [torch.from_numpy(feeds[k]) for k in ("history", "candidates", "candidate_scores")]
    with torch.no_grad():
        want = ranker(t[0], None, t[1], t[2]).numpy()
        # The precomputed scores training passes give the same result as the baked ones.
        given = ranker(t[0], None, t[1], t[2], cf_scores=torch.from_numpy(got)).numpy()
        without = ranker(t[0], None, t[1], t[2], cf_scores=torch.zeros(4, 10)).numpy()
    np.testing.assert_allclose(given, want, atol=1e-5)
    assert np.abs(without - want)[candidates > 0].max() > 1e-3  # the score moves the ranking
    np.testing.assert_allclose(score(OnnxRanker(path), feeds)[candidates > 0], want[candidates > 0], atol=1e-4)


def test_cross_fitted_scores_never_see_their_own_users_interactions():
    rng = np.random.default_rng(3)
    users, items = _random_log(rng, n_users=60, n_items=15, per_user=6)
    sample_users = np.arange(60)
    history = items.reshape(60, 6)[:, :4]
    candidates = rng.integers(1, 16, size=(60, 8))

    def run(u, i):
        return ease.cross_fitted(u, i, 60, 16, 3.0, 6, sample_users, history, candidates, seed=0)

    base = run(users, items)
    # Give user 7 many more interactions: its own samples keep their scores (its fold's B lacks it)...
    extra_u = np.concatenate([users, np.full(10, 7)])
    extra_i = np.concatenate([items, np.arange(1, 11)])
    moved = run(extra_u, extra_i)
    np.testing.assert_allclose(moved[7], base[7], atol=1e-6)
    # ...while the users of the other folds, whose B it is in, see the change.
    assert np.abs(moved - base).max() > 1e-4
    # Against the served B (every user), a sample's score differs: the folds are real.
    full = ease.scores(
        ease.sparsify(ease.fit(ease.interaction_matrix(users, items, 60, 16), 3.0), 6, 3.0), history, candidates
    )
    assert np.abs(full - base).max() > 1e-4


def test_training_pairs_are_the_training_part(small_split):
    users, items = training_pairs(small_split)
    for u in range(0, small_split.data.n_users, 7):
        np.testing.assert_array_equal(items[users == u], small_split.train_sequence(u))
    assert len(items) == small_split.train_lengths().sum()
    assert "cf" in RankerConfig().features  # on by default


DAY = trend.DAY
T0 = 880_000_000  # 1997-11-20, MovieLens' time


def test_trend_counts_only_what_came_before_the_request_day():
    # Item 1 on days 0, 0, 3 and 10; item 2 on day 10 only; item 3 never.
    tokens = np.array([1, 1, 1, 1, 2])
    stamps = T0 + np.array([0, 5, 3 * DAY + 7, 10 * DAY + 1, 10 * DAY + 2])
    table = trend.build(tokens, stamps, 4)
    assert table.width == DAY and table.start == T0 and table.buckets == 11 and table.windows == (1, 7, 30)
    assert table.first.tolist() == [12, 0, 10, 12]
    noon = lambda day: T0 + day * DAY + DAY // 2  # noqa: E731
    cands = np.array([[1, 2, 3, 0]] * 4)
    now = np.array([[noon(10)], [noon(11)], [noon(400)], [0]])
    f = trend.features(table, cands, now)
    log = np.log1p
    # Day 10: item 1's day-10 interaction is not before the request's day; item 2 has none yet.
    want_1 = [log(0), log(1), log(3), log(3), 0.0, log(10)]  # windows 1, 7, 30 days; all; none yet; age
    np.testing.assert_allclose(f[0, 0], want_1, rtol=1e-6)
    np.testing.assert_allclose(f[0, 1], [0, 0, 0, 0, 1.0, 0], atol=0)
    np.testing.assert_allclose(f[0, 2], [0, 0, 0, 0, 1.0, 0], atol=0)
    # Day 11: the day before holds item 1's 4th and item 2's 1st.
    np.testing.assert_allclose(
        f[1, 0], [log(1), log(1), log(4), log(4), 0.0, log(11)], rtol=1e-6
    )  # day 3 is 8 days back
    np.testing.assert_allclose(f[1, 1], [log(1), log(1), log(1), log(1), 0.0, log(1)], rtol=1e-6)
    # Long after the log: the bucket just after it, the newest trend the version knows (not "nothing lately").
    np.testing.assert_allclose(f[2], f[1], rtol=0, atol=0)
    assert not f[3].any() and not f[:, 3].any()  # unknown request time; empty slot


def test_trend_buckets_widen_for_long_logs_and_large_catalogues():
    stamps = T0 + np.array([0, 3000 * DAY])
    table = trend.build(np.array([1, 2]), stamps, 3)
    assert table.buckets <= trend.MAX_BUCKETS and table.width >= 3000 * DAY // trend.MAX_BUCKETS
    assert table.windows[0] == 1 and len(table.windows) <= 3
    big = trend.build(np.array([1, 2]), T0 + np.array([0, 300 * DAY]), 200_000)
    assert big.cumulative.size <= trend.MAX_CELLS


def test_the_graphs_trend_is_numpys_and_onnxruntimes(tmp_path, tiny_model):
    n, dim = tiny_model.cfg.n_items, tiny_model.cfg.dim
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, n + 1, size=400)
    stamps = T0 + rng.integers(0, 60 * DAY, size=400)
    table = trend.build(tokens, stamps, n + 1)
    shape = RankerShape(n, dim, attend_last=8, mlp_dim=16, time=True, trend_features=trend.n_features(table))
    ranker = TargetAttentionRanker(shape, trend=table).eval()
    with pytest.raises(ValueError, match="time"):  # both time inputs or neither: trend needs the time group
        TargetAttentionRanker(dataclasses.replace(shape, time=False), trend=table)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ranker.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    candidates = rng.integers(0, n + 1, size=(5, 12))
    now = T0 + rng.integers(-3 * DAY, 70 * DAY, size=(5, 1))
    now[4] = 0
    with torch.no_grad():
        got = ranker.trend(torch.from_numpy(candidates), torch.from_numpy(now)).numpy()
    np.testing.assert_allclose(got, trend.features(table, candidates, now), rtol=1e-6, atol=1e-7)
    assert got[:4].any() and not got[4].any()

    path = tmp_path / "ranker.onnx"
    names = export_ranker(ranker, path)
    assert names[-2:] == ["history_timestamps", "request_time"]  # both or neither (engine/ranker.py)
    assert check_ranker_parity(ranker, tiny_model, path).max_abs_diff < 1e-4
    history = rng.integers(1, n + 1, size=(5, 8))
    feeds = {
        "history": history,
        "candidates": np.where(candidates > 0, candidates, 1),
        "candidate_scores": rng.normal(size=(5, 12)).astype(np.float32),
        "history_timestamps": np.zeros((5, 8), np.int64),
        "request_time": now.astype(np.int64),
    }
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        want = ranker(
            t["history"], None, t["candidates"], t["candidate_scores"], None, t["history_timestamps"], t["request_time"]
        ).numpy()
        blind = ranker(t["history"], None, t["candidates"], t["candidate_scores"]).numpy()
    np.testing.assert_allclose(score(OnnxRanker(path), feeds), want, atol=1e-4)
    assert np.abs(want[:4] - blind[:4]).max() > 1e-3  # the request time moves the scores
    np.testing.assert_allclose(want[4], blind[4], atol=1e-6)  # unknown time = left out


def test_fit_wide_finds_the_weight_that_explains_the_targets():
    # Targets are the most popular candidate of each list; stage one's scores are noise. The wide part's
    # log-popularity weight alone explains them: L-BFGS makes it large and puts every target first.
    from attnrec.export.ranker_train import CandidateSets, fit_wide, ranked_gains

    rng = np.random.default_rng(5)
    n_items, s, n = 50, 300, 12
    pop = rng.permutation(2.0 ** np.arange(n_items))  # log popularity: evenly spaced ranks
    ranker = TargetAttentionRanker(RankerShape(n_items, 8, attend_last=4, mlp_dim=8), popularity=pop)
    cands = np.stack([rng.choice(np.arange(1, n_items + 1), n, replace=False) for _ in range(s)])
    target = np.argmax(pop[cands - 1], axis=1)
    tokens = rng.integers(1, n_items + 1, size=(s, 4))
    noise = 0.05 * rng.normal(size=(s, n)).astype(np.float32)
    sets = CandidateSets(tokens, np.zeros((s, 4, 0), np.float32), cands, noise, target)
    before = ranked_gains(ranker, sets).mean()
    w = fit_wide(ranker, sets)
    assert w.shape == (1,) and w[0] > 5.0
    assert ranker.wide.weight.item() == pytest.approx(w[0])
    assert ranked_gains(ranker, sets).mean() > 0.99 > before + 0.5
