"""The synthetic generator: deterministic, well-formed, long-tailed, and sequential."""

from __future__ import annotations

import numpy as np
import pytest

from attnrec.export.data.synthetic import (
    HOUR_BLOCKS,
    SyntheticConfig,
    attributes,
    generate,
    generate_with_attributes,
    write,
    write_attributes,
)

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


def test_default_output_is_unchanged_by_the_attribute_mode(small_log):
    """The digest of SMALL's arrays from before the attribute mode existed: off, it draws what it drew."""
    import hashlib

    h = hashlib.sha256()
    for a in (small_log.user, small_log.item, small_log.timestamp):
        h.update(a.tobytes())
    assert h.hexdigest() == "c7f3fdbe82eec6139ffb536586fd705c574d4552dd552da762ab6161ea7c233f"


def _chi2(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's chi-square statistic of the contingency table of two code arrays."""
    t = np.zeros((x.max() + 1, y.max() + 1))
    np.add.at(t, (x, y), 1)
    e = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / t.sum()
    return float(((t - e) ** 2 / np.where(e > 0, e, 1)).sum())


def _category_tables(log, attrs):
    order = np.argsort(attrs.item_ids)
    category = attrs.category[order][log.item - 1]  # item ids are 1..n_items
    _, cat = np.unique(category, return_inverse=True)
    hour_block = (log.timestamp.astype(np.int64) % 86_400) // (86_400 // HOUR_BLOCKS)
    _, segment = np.unique(attrs.segment[log.user - 1], return_inverse=True)
    return cat, hour_block, segment


def test_segment_and_hour_of_day_drive_which_categories_users_pick(tmp_path):
    """Category share by hour block and by user segment differ far beyond what the same generator shows
    with both effects at 0 (interactions of one user are not independent, so the control is the
    reference, not a chi-square table); the files read as side features."""
    from attnrec.export.data.features import feature_tables
    from attnrec.export.data.sequences import build_sequences

    cfg = SyntheticConfig(n_users=2000, n_items=1000, mean_length=20.0, seed=0, n_categories=8)
    log, attrs = generate_with_attributes(cfg)
    control_log, control_attrs = generate_with_attributes(
        SyntheticConfig(**{**cfg.__dict__, "segment_effect": 0.0, "hour_effect": 0.0})
    )
    cat, hour, segment = _category_tables(log, attrs)
    c_cat, c_hour, c_segment = _category_tables(control_log, control_attrs)
    assert _chi2(hour, cat) > 10 * _chi2(c_hour, c_cat)
    assert _chi2(segment, cat) > 10 * _chi2(c_segment, c_cat)
    # The size of the effect: some category's share moves by more than 5 points between hour blocks.
    share = np.array([np.bincount(cat[hour == b], minlength=8) / (hour == b).sum() for b in range(HOUR_BLOCKS)])
    assert (share.max(0) - share.min(0)).max() > 0.05
    # Deterministic, attributes recomputable on their own, the walk's ids are still a permutation.
    again, same = generate_with_attributes(cfg)
    assert again.item.tobytes() == log.item.tobytes() and (same.segment == attrs.segment).all()
    assert (attributes(cfg).category == attrs.category).all()
    assert sorted(attrs.item_ids.tolist()) == list(range(1, 1001))
    items, users = tmp_path / "items.csv", tmp_path / "users.csv"
    write_attributes(attrs, items, users)
    data = build_sequences(log)
    tables = feature_tables(data.item_ids[1:], data.user_ids, item_path=items, user_path=users)
    assert [(c.name, c.role) for c in tables.item.columns] == [("category", "categorical"), ("price", "numeric")]
    assert [(c.name, c.role) for c in tables.user.columns] == [("segment", "categorical")]
    assert tables.item.unknown == 0 and tables.user.unknown == 0
    with pytest.raises(ValueError, match="n_categories"):
        attributes(SMALL)


# ---------------------------------------------------------------------------- the truth (oracle)

# Small enough that categories have one topic each or share a few: the case the old context rule got wrong.
TRUTH = SyntheticConfig(
    n_users=1500, n_items=60, mean_length=15.0, n_topics=4, seed=1, n_categories=3, context_rate=0.7, stay_prob=0.5
)


def _all_steps(truth):
    users = np.repeat(np.arange(len(truth.lengths)), truth.lengths - 1)
    steps = np.concatenate([np.arange(1, n) for n in truth.lengths])
    offsets = np.concatenate([[0], np.cumsum(truth.lengths)[:-1]])
    return users, steps, truth.log.item[offsets[users] + steps]


@pytest.mark.parametrize("cfg", [TRUTH, SyntheticConfig(n_users=1500, n_items=60, mean_length=15.0, n_topics=4)])
def test_true_next_item_probabilities_are_calibrated_on_the_log(cfg):
    from attnrec.export.data.synthetic import next_item_truth

    truth = next_item_truth(cfg)
    log = generate(cfg)
    assert truth.log.item.tobytes() == log.item.tobytes() and truth.log.timestamp.tobytes() == log.timestamp.tobytes()
    users, steps, items = _all_steps(truth)
    probs = truth.next_item_probabilities(users, steps)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    # Every emitted item was possible, and far likelier than uniform on average.
    p_emitted = probs[np.arange(len(items)), items - 1]
    assert p_emitted.min() > 0 and np.log(p_emitted).mean() > np.log(1 / cfg.n_items) + 0.5
    # Calibration: per item, the observed count against the summed probabilities (a sum of Bernoullis).
    z = (np.bincount(items - 1, minlength=cfg.n_items) - probs.sum(0)) / np.sqrt((probs * (1 - probs)).sum(0))
    assert np.abs(z).max() < 4.5 and (z**2).mean() < 1.6


def test_true_probabilities_reject_step_zero():
    from attnrec.export.data.synthetic import next_item_truth

    truth = next_item_truth(TRUTH)
    with pytest.raises(ValueError, match="steps"):
        truth.next_item_probabilities(np.array([0]), np.array([0]))


def test_context_switch_picks_every_topic_of_its_category_by_popularity():
    from attnrec.export.data import synthetic as S

    world = S._build_world(TRUTH, np.random.default_rng(TRUTH.seed))
    ctx = S._build_context(TRUTH, world, np.random.default_rng([TRUTH.seed, 1]))
    rng = np.random.default_rng(5)
    n = 200_000
    topics = S._context_topics(ctx, rng, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
    cat_p = np.diff(np.concatenate([[0.0], ctx.category_cdf[0, 0]]))
    totals = np.bincount(ctx.topic_category, weights=world.topic_weight)
    want = cat_p[ctx.topic_category] * world.topic_weight / totals[ctx.topic_category]
    got = np.bincount(topics, minlength=len(want)) / n
    assert np.all(np.abs(got - want) <= 4 * np.sqrt(want * (1 - want) / n) + 1e-9), (got, want)


def test_hour_unknown_probabilities_average_the_hour_blocks():
    from dataclasses import replace

    from attnrec.export.data.synthetic import next_item_truth

    truth = next_item_truth(replace(TRUTH, hour_effect=4.0))
    users, steps, items = _all_steps(truth)
    known = truth.next_item_probabilities(users, steps)
    blind = truth.next_item_probabilities(users, steps, hour_known=False)
    np.testing.assert_allclose(blind.sum(axis=1), 1.0, atol=1e-12)
    rows = np.arange(len(items))
    # The hour drives the switches: knowing it explains the log better.
    assert np.log(known[rows, items - 1]).mean() > np.log(blind[rows, items - 1]).mean() + 0.05
    # Without an hour effect the hour tells nothing.
    flat = next_item_truth(replace(TRUTH, hour_effect=0.0))
    np.testing.assert_allclose(
        flat.next_item_probabilities(users[:500], steps[:500]),
        flat.next_item_probabilities(users[:500], steps[:500], hour_known=False),
        atol=1e-12,
    )
