"""engine/rerank.py: the diversity (MMR) and popularity-calibration re-rank, by hand and through the pipeline."""

import json
import math

import numpy as np
import pytest

from attnrec.engine.pipeline import Pipeline
from attnrec.engine.popularity import history_mix, js_divergence, popularity_groups
from attnrec.engine.repository import newest_valid_version
from attnrec.engine.rerank import Reranker, RerankOptions, strengths


def _one(reranker, rows, scores, history, k, d, c):
    r, s = reranker.rerank(np.array([rows]), np.array([scores], np.float32), [np.array(history)], k, [d], [c])
    return r[0].tolist(), s[0].tolist()


def test_diversity_is_mmr_by_hand():
    # Items 0 and 1 point the same way, item 2 is orthogonal. Scores 3, 2, 1 → relevance 1, .5, 0.
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    rr = Reranker(np.ones(3), vectors)
    # d = .5: slot 1 takes item 0 (.5 · 1); slot 2: item 1 scores .5 · .5 - .5 · cos 1 = -.25, item 2 scores 0.
    assert _one(rr, [0, 1, 2], [3, 2, 1], [], 3, 0.5, 0.0) == ([0, 2, 1], [3.0, 1.0, 2.0])
    # d = .2: item 1 scores .8 · .5 - .2 = .2 > item 2's 0: relevance wins
    assert _one(rr, [0, 1, 2], [3, 2, 1], [], 3, 0.2, 0.0)[0] == [0, 1, 2]
    # k below the pool: the first k picks; empty pool slots stay empty
    assert _one(rr, [0, 1, 2, -1], [3, 2, 1, -np.inf], [], 2, 0.5, 0.0)[0] == [0, 2]
    assert _one(rr, [0, -1, -1], [3, -np.inf, -np.inf], [], 3, 1.0, 0.0)[0] == [0, -1, -1]


def test_popularity_calibration_by_hand():
    # popularity 50, 30, 10, 10 (of 100): shares before each 0, .5, .8, .9 → head, mid, tail, tail
    rr = Reranker(np.array([50, 30, 10, 10]))
    assert rr.groups.tolist() == [0, 1, 2, 2]
    # A tail-only history: p = (0, 0, 1). c = .6, relevance weight .4, pool 0, 1, 2 with relevance 1, .5, 0.
    # Slot 1: JS of a one-item list is 1 for items 0 and 1 (disjoint), 0 for item 2:
    #   obj = .4 - .6, .2 - .6, 0 → item 2.
    # Slot 2: both lists {2, 0} and {2, 1} have mix (½ off-tail, ½ tail): same JS, so relevance decides → item 0.
    js = float(js_divergence([0, 0, 1], [0.5, 0, 0.5]))
    assert js == pytest.approx((math.log2(4 / 3) + 0.5 + 0.5 * math.log2(2 / 3)) / 2)
    assert _one(rr, [0, 1, 2], [3, 2, 1], [2, 3], 3, 0.0, 0.6)[0] == [2, 0, 1]
    # c = .4 (relevance .6): slot 1: .6 - .4 = .2 for item 0 beats item 2's 0
    assert _one(rr, [0, 1, 2], [3, 2, 1], [2, 3], 3, 0.0, 0.4)[0][0] == 0


def test_zero_strengths_return_the_pool_unchanged_and_mixed_batches_touch_only_their_rows():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8))
    rr = Reranker(rng.integers(0, 50, 40), vectors)
    rows = np.stack([rng.permutation(40)[:20] for _ in range(3)])
    scores = -np.sort(-rng.normal(size=(3, 20)), axis=1).astype(np.float32)
    hist = [rng.choice(40, 5) for _ in range(3)]
    r, s = rr.rerank(rows, scores, hist, 10, np.zeros(3), np.zeros(3))
    np.testing.assert_array_equal(r, rows[:, :10])
    np.testing.assert_array_equal(s, scores[:, :10])
    r2, s2 = rr.rerank(rows, scores, hist, 10, np.array([0.0, 0.7, 0.0]), np.array([0.0, 0.0, 0.3]))
    np.testing.assert_array_equal(r2[0], rows[0, :10])
    assert r2[1].tolist() != rows[1, :10].tolist()  # 0.7 diversity over random vectors moves something
    for i in (1, 2):  # picks come from the pool, each once, with their own scores
        assert len(set(r2[i])) == 10 and set(r2[i]) <= set(rows[i])
        np.testing.assert_array_equal(s2[i], scores[i][[rows[i].tolist().index(x) for x in r2[i]]])


def test_strengths_outside_zero_one_are_refused():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="diversity must be in 0..1"):
            strengths(bad, 2, "diversity")
        with pytest.raises(ValueError, match="popularity_calibration must be in 0..1"):
            RerankOptions(popularity_calibration=bad)
    assert strengths(None, 2, "x").tolist() == [0, 0] and strengths([0.1, 1], 2, "x").tolist() == [0.1, 1]


def _reference(pool_rows, pool_scores, history, k, d, c, vectors, groups):
    """The objective of engine/rerank.py's docstring, one user, plain Python loops."""
    rel_lo, rel_hi = min(pool_scores), max(pool_scores)
    rel = [(s - rel_lo) / (rel_hi - rel_lo) if rel_hi > rel_lo else 1.0 for s in pool_scores]
    unit = [vectors[r] / np.linalg.norm(vectors[r]) for r in pool_rows]
    p = history_mix([history], groups)[0]
    picked: list[int] = []
    for _ in range(min(k, len(pool_rows))):
        best, best_j = -math.inf, -1
        for j in range(len(pool_rows)):
            if j in picked:
                continue
            sim = max((float(unit[j] @ unit[i]) for i in picked), default=0.0)
            counts = np.bincount([groups[pool_rows[i]] for i in [*picked, j]], minlength=3)
            miscal = float(js_divergence(p, counts / counts.sum()))
            obj = (1 - d) * (1 - c) * rel[j] - d * sim - c * miscal
            if obj > best + 1e-12:
                best, best_j = obj, j
        picked.append(best_j)
    return [pool_rows[j] for j in picked]


@pytest.fixture(scope="module")
def pipeline(trained_repo):
    return Pipeline.load(newest_valid_version(trained_repo[1], "seq")[0])


def test_pipeline_defaults_are_todays_answer_exactly(pipeline):
    rng = np.random.default_rng(3)
    histories = [rng.choice(pipeline.n_items, size=n, replace=False) for n in (1, 4, 12, 30)] + [np.array([], int)]
    for rank in (True, False):
        base = pipeline.recommend(histories, 10, rank=rank)
        zero = pipeline.recommend(histories, 10, rank=rank, diversity=0.0, popularity_calibration=[0, 0, 0, 0, 0])
        np.testing.assert_array_equal(zero.rows, base.rows)
        np.testing.assert_array_equal(zero.scores, base.scores)
        assert "rerank" not in zero.timings


def test_pipeline_rerank_is_the_reference_over_its_pool(pipeline):
    """With a ranker the pool is the ranker's order of n_candidates; the re-rank picks k of them."""
    rng = np.random.default_rng(4)
    vectors = np.load(pipeline.path / pipeline.manifest.files.item_embeddings.path)
    groups = popularity_groups(pipeline.popularity)
    n = pipeline.n_candidates
    histories = [rng.choice(pipeline.n_items, size=s, replace=False) for s in (3, 9, 20)]
    pool = pipeline.recommend(histories, n)  # the ranker's whole order: what the re-rank reads
    for d, c in ((0.5, 0.0), (0.0, 0.8), (0.3, 0.3), (1.0, 1.0)):
        got = pipeline.recommend(histories, 10, diversity=d, popularity_calibration=c)
        assert got.timings["rerank"] > 0
        for i, h in enumerate(histories):
            keep = pool.rows[i] >= 0
            want = _reference(pool.rows[i][keep].tolist(), pool.scores[i][keep].tolist(), h, 10, d, c, vectors, groups)
            assert got.rows[i].tolist() == want, (d, c, i)
    # diversity lowers the intra-list similarity of the answer
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def ils(rows):
        u = unit[rows]
        sim = u @ u.T
        return (sim.sum() - np.trace(sim)) / (len(rows) * (len(rows) - 1))

    plain, diverse = pipeline.recommend(histories, 10), pipeline.recommend(histories, 10, diversity=0.9)
    assert all(ils(diverse.rows[i]) < ils(plain.rows[i]) for i in range(len(histories)))


def test_stage_one_alone_reranks_its_top_n_candidates(pipeline):
    rng = np.random.default_rng(5)
    vectors = np.load(pipeline.path / pipeline.manifest.files.item_embeddings.path)
    groups = popularity_groups(pipeline.popularity)
    h = rng.choice(pipeline.n_items, size=6, replace=False)
    pool = pipeline.recommend([h], pipeline.n_candidates, rank=False)  # the version's N (200 with no ranker)
    got = pipeline.recommend([h], 8, rank=False, diversity=0.6, popularity_calibration=0.2)
    keep = pool.rows[0] >= 0
    want = _reference(pool.rows[0][keep].tolist(), pool.scores[0][keep].tolist(), h, 8, 0.6, 0.2, vectors, groups)
    assert got.rows[0].tolist() == want
    with pytest.raises(ValueError, match="diversity must be in 0..1"):
        pipeline.recommend([h], 8, diversity=2.0)


def test_rerank_curve_writes_the_table_json_and_png(trained_repo, tmp_path):
    from attnrec.benchmarks import rerank_curve
    from attnrec.cli import main as attnrec_main

    data, repo = trained_repo
    out = tmp_path / "results"
    args = ["--repo", str(repo), "--name", "seq", "--data", str(data), "--lambdas", "0,1", "--label", "syn"]
    assert rerank_curve.main([*args, "--out", str(out), "--date", "2026-01-02"]) == 0
    result = json.loads((out / "rerank-syn-2026-01-02.json").read_text())
    assert (out / "rerank-syn-2026-01-02.png").stat().st_size > 10_000
    md = (out / "rerank-syn-2026-01-02.md").read_text()
    # λ = 0 is the served answer: what `attnrec evaluate` reports for the version
    ev = tmp_path / "eval.json"
    assert (
        attnrec_main(["-q", "evaluate", "--repo", str(repo), "--name", "seq", "--data", str(data), "--json", str(ev)])
        == 0
    )
    served = json.loads(ev.read_text())["test"]
    for mode in ("diversity", "popularity_calibration"):
        zero, one = result["curves"][mode]
        for key in ("ndcg@10", "hr@10", "gini@10", "long_tail@10", "popcal_js@10"):
            assert zero[key] == pytest.approx(served[key])
        assert f"| 0 | {zero['ndcg@10']:.4f} |" in md
    # each knob moves its own figure the way it should
    assert result["curves"]["diversity"][1]["ild@10"] > result["curves"]["diversity"][0]["ild@10"]
    assert (
        result["curves"]["popularity_calibration"][1]["popcal_js@10"]
        < result["curves"]["popularity_calibration"][0]["popcal_js@10"]
    )
