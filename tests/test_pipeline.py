"""attnrec.engine.pipeline: the one recommend path that the server, retrieval and evaluation share."""

import json

import numpy as np
import pytest

from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.index import load_index
from attnrec.engine.pipeline import Pipeline, encode_histories
from attnrec.engine.ranker import OnnxRanker
from attnrec.engine.repository import newest_valid_version
from attnrec.export.ranking_metrics import topk_excluding


@pytest.fixture(scope="module")
def pipeline(trained_repo):
    _, repo = trained_repo
    path, _ = newest_valid_version(repo, "seq")
    return Pipeline.load(path)


def test_recommend_is_exact_top_k_without_seen_and_excluded_items(pipeline):
    rng = np.random.default_rng(0)
    vectors = np.load(pipeline.path / pipeline.manifest.files.item_embeddings.path)
    histories = [rng.choice(pipeline.n_items, size=n, replace=False) for n in (1, 5, 30, 7)]
    exclude = [np.array([], np.int64), rng.choice(pipeline.n_items, 3), np.array([0, 1]), np.array([], np.int64)]
    got = pipeline.recommend(histories, 10, exclude=exclude, rank=False)  # stage one alone

    query = encode_histories(pipeline.encoder, [h + 1 for h in histories])
    want = topk_excluding(query @ vectors.T, [np.union1d(h, e) for h, e in zip(histories, exclude)], 10)
    np.testing.assert_array_equal(got.rows, want)
    for i, h in enumerate(histories):
        assert not np.isin(got.rows[i], np.union1d(h, exclude[i])).any()
        np.testing.assert_allclose(got.scores[i], query[i] @ vectors[got.rows[i]].T, rtol=1e-5, atol=1e-5)
    assert got.timings["encoder"] > 0 and got.timings["search"] > 0


def test_empty_history_gets_popular_items_minus_excluded(pipeline):
    got = pipeline.recommend(
        [np.array([], np.int64), np.array([3])], 5, exclude=[np.array([pipeline.popular_rows[0]]), []]
    )
    np.testing.assert_array_equal(got.rows[0], pipeline.popular_rows[1:6])
    np.testing.assert_array_equal(got.scores[0], pipeline.popularity[pipeline.popular_rows[1:6]])
    assert got.rows[1][0] >= 0 and 3 not in got.rows[1]


def test_more_than_the_catalogue_leaves_empty_slots(pipeline):
    got = pipeline.recommend([np.array([0, 1])], pipeline.n_items + 3)
    assert (got.rows[0, -5:] == -1).all() and np.isneginf(got.scores[0, -5:]).all()
    assert sorted(got.rows[0, : pipeline.n_items - 2]) == list(range(2, pipeline.n_items))


def test_runtime_options_reach_the_sessions_and_faiss(trained_repo):
    import faiss

    from attnrec.engine.pipeline import RuntimeOptions

    path, _ = newest_valid_version(trained_repo[1], "seq")
    before = faiss.omp_get_max_threads()
    try:
        p = Pipeline.load(path, RuntimeOptions(allow_spinning=False, faiss_threads=1))
        opts = p.encoder.session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert faiss.omp_get_max_threads() == 1
        spinning = Pipeline.load(path, RuntimeOptions(allow_spinning=True))
        assert (
            spinning.encoder.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            == "1"
        )
    finally:
        faiss.omp_set_num_threads(before)


def test_a_pipeline_built_from_parts_recommends_what_the_loaded_version_does(pipeline):
    path, m = pipeline.path, pipeline.manifest
    parts = Pipeline(
        OnnxEncoder(path / m.files.encoder.path, m.model.max_len),
        load_index(path / m.files.index.path, m.index.params, mips_max_norm2=m.index.mips_max_norm2),
        np.asarray(json.loads((path / m.files.item_ids.path).read_text())),
        np.load(path / m.files.item_popularity.path),
        OnnxRanker(path / m.files.ranker.path),
        n_candidates=m.ranker.n_candidates,
    )
    assert parts.manifest is None and parts.n_candidates == pipeline.n_candidates == 50
    rng = np.random.default_rng(1)
    histories = [rng.choice(pipeline.n_items, size=n, replace=False) for n in (0, 1, 9, 40)]
    for rank in (True, False):
        want = pipeline.recommend(histories, 10, exclude=histories, rank=rank)
        got = parts.recommend(histories, 10, exclude=histories, rank=rank)
        np.testing.assert_array_equal(got.rows, want.rows)
        np.testing.assert_array_equal(got.scores, want.scores)
    with pytest.raises(ValueError, match="n_candidates"):
        Pipeline(parts.encoder, parts.index, parts.item_ids, parts.popularity, parts.ranker)


def test_the_metrics_published_from_parts_are_those_of_the_loaded_version(pipeline, small_split):
    """`attnrec export` evaluates the staged parts before publishing; the published version evaluates the same."""
    from attnrec.export.evaluate import evaluate_pipeline, load_item_vectors, metrics_section

    vectors = load_item_vectors(pipeline.path, pipeline.manifest)
    again = evaluate_pipeline(pipeline, vectors, small_split, progress=False)
    assert metrics_section(again) == pipeline.manifest.metrics


def test_io_bound_sessions_recommend_what_plain_runs_do(pipeline):
    """--io-binding on (what auto does on CUDA) through the whole path, on the CPU provider."""
    from attnrec.engine.pipeline import RuntimeOptions

    bound = Pipeline.load(pipeline.path, RuntimeOptions(io_binding="on", intra_op_threads=1))
    assert bound.encoder.binding == "cpu" and (bound.ranker is None or bound.ranker.binding == "cpu")
    rng = np.random.default_rng(3)
    histories = [rng.choice(pipeline.n_items, size=n, replace=False) for n in (1, 4, 12)]
    want, got = pipeline.recommend(histories, 10), bound.recommend(histories, 10)
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)


def test_faiss_threads_apply_in_the_threads_that_search(trained_repo):
    """libgomp keeps the thread count per thread: a batch thread, not only the loading one, uses it."""
    import threading

    import faiss

    from attnrec.engine.pipeline import RuntimeOptions

    path, _ = newest_valid_version(trained_repo[1], "seq")
    p = Pipeline.load(path, RuntimeOptions(faiss_threads=1, intra_op_threads=1))
    seen = {}

    def search_in_a_new_thread():
        seen["before"] = faiss.omp_get_max_threads()
        p.recommend([np.array([1, 2, 3])], 5)
        seen["after"] = faiss.omp_get_max_threads()

    t = threading.Thread(target=search_in_a_new_thread)
    t.start()
    t.join(60)
    assert seen["after"] == 1  # a new thread starts at FAISS's default (all cores, unless OMP_NUM_THREADS says)
