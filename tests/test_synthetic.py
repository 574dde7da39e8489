"""The synthetic generator: deterministic, well-formed, long-tailed, and sequential."""

from __future__ import annotations

import numpy as np
import pytest

from attnrec.export.data.synthetic import SyntheticConfig, generate, write

SMALL = SyntheticConfig(n_users=2000, n_items=1000, mean_length=20.0, seed=0)


@pytest.fixture(scope="module")
def small_log():
    return generate(SMALL)


def test_same_seed_same_arrays_bit_for_bit(small_log):
    again = generate(SMALL)
    for name in ("user", "item", "timestamp"):
        a, b = getattr(small_log, name), getattr(again, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_other_seed_other_arrays(small_log):
    other = generate(SyntheticConfig(n_users=2000, n_items=1000, mean_length=20.0, seed=1))
    assert not np.array_equal(small_log.item[:1000], other.item[:1000])


def test_shapes_dtypes_and_id_ranges(small_log):
    log = small_log
    assert log.user.dtype == np.int64 and log.item.dtype == np.int64
    assert log.timestamp.dtype == np.float64
    assert set(np.unique(log.user)) == set(range(1, SMALL.n_users + 1))
    assert log.item.min() >= 1 and log.item.max() <= SMALL.n_items
    lengths = np.bincount(log.user)[1:]
    assert lengths.min() >= 5
    assert abs(lengths.mean() - SMALL.mean_length) < 0.1 * SMALL.mean_length
    assert np.all(log.timestamp == np.floor(log.timestamp))  # whole seconds


def test_timestamps_strictly_increase_per_user(small_log):
    log = small_log
    same_user = log.user[1:] == log.user[:-1]
    assert np.all(np.diff(log.user) >= 0)  # rows are user-major
    assert np.all(np.diff(log.timestamp)[same_user] > 0)


def test_popularity_is_long_tailed(small_log):
    counts = np.sort(np.bincount(small_log.item, minlength=SMALL.n_items + 1)[1:])[::-1]
    top = counts[: SMALL.n_items // 10].sum() / counts.sum()
    assert top > 0.4
    assert (counts > 0).mean() > 0.8  # and yet most items do occur


def _leave_last_out(log):
    """0-based (user, item) per row, train-row mask, last train item and target per user."""
    user, item = log.user - 1, log.item - 1
    last_row = np.flatnonzero(np.r_[user[1:] != user[:-1], True])
    is_train = np.ones(len(user), dtype=bool)
    is_train[last_row] = False
    return user, item, is_train, item[last_row - 1], item[last_row]


def _hit_rate_at_10(scores, seen_user, seen_item, target):
    """HR@10 over a full ranking, seen items excluded."""
    scores = scores.astype(np.float64, copy=True)
    scores[seen_user, seen_item] = -np.inf
    top10 = np.argpartition(-scores, 10, axis=1)[:, :10]
    return float((top10 == target[:, None]).any(axis=1).mean())


def test_first_order_transitions_beat_popularity_threefold(small_log):
    user, item, is_train, last, target = _leave_last_out(small_log)
    n_users, n_items = SMALL.n_users, SMALL.n_items
    tu, ti = user[is_train], item[is_train]

    popularity = np.bincount(ti, minlength=n_items).astype(np.float64)
    pop_scores = np.broadcast_to(popularity, (n_users, n_items))

    # Successor counts from the train part only: (item at t) -> (item at t+1), same user.
    same = tu[1:] == tu[:-1]
    trans = np.zeros((n_items, n_items))
    np.add.at(trans, (ti[:-1][same], ti[1:][same]), 1.0)
    # Most frequent successors of the last train item; popularity breaks ties / fills.
    seq_scores = trans[last] + popularity / (popularity.max() + 1.0)

    hr_pop = _hit_rate_at_10(pop_scores, tu, ti, target)
    hr_seq = _hit_rate_at_10(seq_scores, tu, ti, target)
    print(f"HR@10 popularity {hr_pop:.4f}, first-order transitions {hr_seq:.4f}")
    assert hr_seq >= 3 * hr_pop
    assert hr_pop > 0  # the baseline is not degenerate


def test_write_parquet_round_trip(small_log, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "synthetic.parquet"
    write(small_log, path)
    table = pq.read_table(path)
    assert table.column_names == ["user_id", "item_id", "timestamp"]
    assert np.array_equal(table["user_id"].to_numpy(), small_log.user)
    assert np.array_equal(table["item_id"].to_numpy(), small_log.item)
    assert np.array_equal(table["timestamp"].to_numpy().astype(np.float64), small_log.timestamp)


def test_item_ids_are_shuffled(small_log):
    # Neighbours in a topic's order must not be neighbours in id space.
    step = np.diff(small_log.item)
    assert np.mean(step == 1) < 0.05


def test_rejects_bad_config():
    with pytest.raises(ValueError):
        generate(SyntheticConfig(mean_length=3.0))
    with pytest.raises(ValueError):
        generate(SyntheticConfig(noise_rate=1.5))


def test_tiny_and_moderate_sizes_complete():
    tiny = generate(SyntheticConfig(n_users=3, n_items=1, mean_length=5.0))
    assert set(tiny.item) == {1}
    log = generate(SyntheticConfig(n_users=20_000, n_items=200_000, mean_length=20.0, seed=1))
    assert log.item.max() <= 200_000 and log.user.max() == 20_000
    assert len(np.unique(log.item)) > 50_000
