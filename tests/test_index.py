import faiss
import numpy as np
import pytest

from attnrec.engine.index import load_index
from attnrec.engine.pipeline import search, search_index
from attnrec.export.index_build import build_index, default_factory, recall_at, tune


def clustered(n, d, seed=0, clusters=64):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32)


def test_default_factory_is_exact_for_small_and_ivf_for_large_catalogues():
    assert default_factory(1682) == "Flat"
    assert default_factory(100_000) == "IVF1024,Flat"
    assert default_factory(1_000_000) == "IVF4096,Flat"


def test_recall_at():
    assert recall_at(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]])) == pytest.approx(
        (2 / 3 + 0) / 2
    )


def test_exact_index_matches_brute_force_inner_product():
    items = clustered(500, 16)
    q = clustered(20, 16, seed=1)
    index = build_index(items, "Flat")
    scores, rows = search_index(index, q, 10)
    want = np.argsort(-(q @ items.T), axis=1)[:, :10]
    assert (rows == want).all()
    np.testing.assert_allclose(scores, np.take_along_axis(q @ items.T, want, axis=1), rtol=1e-5)


def test_mips_reduction_to_l2_is_exact_with_a_flat_l2_index():
    rng = np.random.default_rng(3)
    items = clustered(2000, 16) * rng.uniform(0.2, 3.0, size=(2000, 1)).astype(np.float32)  # varied norms
    q = clustered(30, 16, seed=4)
    index = build_index(items, "IVF1,Flat")  # one list: exact, but through the augmented L2 path
    assert index.mips_max_norm2 is not None
    scores, rows = search_index(index, q, 20)
    ip = q @ items.T
    want = np.argsort(-ip, axis=1)[:, :20]
    assert (rows == want).all()
    np.testing.assert_allclose(scores, np.take_along_axis(ip, want, axis=1), rtol=1e-4, atol=1e-3)


def test_ivf_tuning_reaches_the_target_recall_on_held_out_queries(tmp_path):
    items = clustered(20_000, 32)
    queries = clustered(400, 32, seed=7)
    index = build_index(items, "IVF128,Flat")
    result = tune(index, items, queries[:200], n=100, target_recall=0.95)
    assert result.reached_target and result.recall >= 0.95
    assert 1 <= result.params["nprobe"] <= 128
    chosen = [t for t in result.tried if t["nprobe"] == result.params["nprobe"]]
    assert chosen[-1]["recall"] == result.recall
    # every cheaper setting that was tried missed the target
    assert all(t["recall"] < 0.95 for t in result.tried if t["nprobe"] < result.params["nprobe"])
    # the tuned setting generalises to queries it was not tuned on, after a save/load round trip
    faiss.write_index(index.index, str(tmp_path / "items.faiss"))
    loaded = load_index(tmp_path / "items.faiss", result.params, mips_max_norm2=index.mips_max_norm2, use_gpu=False)
    _, got = search_index(loaded, queries[200:], 100)
    _, truth = search_index(build_index(items, "Flat"), queries[200:], 100)
    assert recall_at(got, truth) >= 0.93


def test_search_masks_excluded_rows_and_still_returns_k():
    items = clustered(300, 8)
    index = build_index(items, "Flat")
    q = items[:2] * 3
    _, plain = search(index, q, 5)
    exclude = [plain[0][:3], np.array([], dtype=np.int64)]
    scores, rows = search(index, q, 5, exclude=exclude)
    assert rows.shape == (2, 5) and not np.isin(rows[0], exclude[0]).any()
    assert rows[0][:2].tolist() == plain[0][3:5].tolist()
    assert rows[1].tolist() == plain[1].tolist()
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
