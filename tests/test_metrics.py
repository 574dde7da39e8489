import math

import numpy as np
import pytest

from attnrec.engine.popularity import (
    HEAD,
    MID,
    TAIL,
    gini,
    group_mix,
    head_rows,
    history_mix,
    js_divergence,
    popularity_groups,
)
from attnrec.export.ranking_metrics import evaluate_full_ranking, hit_positions, topk_excluding


def test_topk_excludes_and_orders():
    scores = np.array([[0.9, 0.1, 0.8, 0.7, 0.2]], dtype=np.float32)
    top = topk_excluding(scores.copy(), [np.array([0])], 3)
    assert top.tolist() == [[2, 3, 4]]


def test_hit_positions():
    top = np.array([[4, 2, 1], [0, 1, 2]])
    assert hit_positions(top, np.array([1, 3])).tolist() == [2, -1]


def test_full_ranking_metrics_against_hand_computed_values():
    # 4 items with fixed scores per user (query = one-hot row of this score table).
    table = np.array(
        [
            [0.9, 0.8, 0.7, 0.1],  # user 0: excludes item 0 → ranking 1,2,3; target 2 at position 1
            [0.1, 0.2, 0.3, 0.4],  # user 1: target 0 is last of 4 → position 3
            [0.5, 0.9, 0.1, 0.2],
        ],  # user 2: target 1 at position 0
        dtype=np.float32,
    )
    item_vectors = np.eye(4, dtype=np.float32)
    histories = [np.array([1]), np.array([], dtype=np.int64), np.array([3])]  # tokens = row + 1
    targets = np.array([3, 1, 2])  # tokens
    rows = iter(range(3))
    query = lambda h: table[[next(rows) for _ in h]]  # noqa: E731
    pop = np.array([5.0, 1.0, 2.0, 3.0])
    m = evaluate_full_ranking(query, item_vectors, histories, targets, pop, ks=(1, 3), batch_size=2)
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 0 + 1) / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    # top-10 lists (capped at 4 items): u0 [1,2,3], u1 [3,2,1,0], u2 [1,0,3] → all 4 items covered
    assert m["coverage@10"] == 1.0
    assert m["arp@10"] == pytest.approx((np.mean([1, 2, 3]) + np.mean([3, 2, 1, 5]) + np.mean([1, 5, 3])) / 3)
    assert m["users"] == 3 and m["repeat_targets"] == 0
    # Exposure per item: 0 → 2 (u1, u2), 1 → 3, 2 → 2, 3 → 3; sorted 2,2,3,3 over n = 4, total 10:
    # Gini = sum((2i - n - 1) e_(i)) / (n total) = (-3*2 - 1*2 + 1*3 + 3*3) / 40
    assert m["gini@10"] == pytest.approx(4 / 40)
    # Head = the ceil(0.2 * 4) = 1 most popular item (item 0): 2 of the 10 slots, 8 long tail.
    assert m["long_tail@10"] == pytest.approx(8 / 10)
    # Groups by interaction share (11 in all): item 0 starts at 0 → head; 3 at 5/11, 2 at 8/11 → mid;
    # 1 at 10/11 → tail. u0: history (1, 0, 0) vs list [1, 2, 3] (0, 2/3, 1/3): disjoint, JS 1.
    # u1: empty history, left out. u2: history [2] (0, 1, 0) vs list [1, 0, 3] (1/3, 1/3, 1/3):
    # m = (1/6, 2/3, 1/6), KL(p||m) = log2(3/2), KL(q||m) = 1/3; JS = (log2(3/2) + 1/3) / 2.
    assert m["popcal_js@10"] == pytest.approx((1 + (math.log2(1.5) + 1 / 3) / 2) / 2)


def test_popularity_groups_head_and_gini_by_hand():
    pop = np.array([0, 10, 10, 40, 20, 20])  # total 100; order 3, 4, 5, 1, 2, 0 (ties by row)
    # shares before each: 3 → 0, 4 → .4, 5 → .6, 1 → .8, 2 → .9, 0 → 1.0
    assert popularity_groups(pop).tolist() == [TAIL, TAIL, TAIL, HEAD, MID, MID]
    assert head_rows(pop).tolist() == [False, False, False, True, True, False]  # ceil(1.2) = 2 items
    assert popularity_groups(np.zeros(3)).tolist() == [TAIL] * 3
    assert gini(np.array([5, 5, 5])) == 0.0
    assert gini(np.array([0, 0, 0, 7])) == pytest.approx(3 / 4)  # one item gets all: (n - 1) / n
    assert gini(np.zeros(4)) == 0.0


def test_js_divergence_and_mixes_by_hand():
    groups = np.array([HEAD, MID, TAIL, TAIL])
    mix = group_mix(np.array([[0, 2, 3, -1], [-1, -1, -1, -1]]), groups)
    np.testing.assert_allclose(mix, [[1 / 3, 0, 2 / 3], [0, 0, 0]])
    np.testing.assert_allclose(
        history_mix([np.array([1, 1, 0, 2]), np.array([], int)], groups), [[0.25, 0.5, 0.25], [0, 0, 0]]
    )
    assert js_divergence([1, 0, 0], [0, 1, 0]) == pytest.approx(1.0)
    assert js_divergence([0.5, 0.5, 0], [0.5, 0.5, 0]) == 0.0
    # p = (1, 0, 0), q = (1/2, 1/2, 0): m = (3/4, 1/4, 0); KL(p||m) = log2(4/3), KL(q||m) = 1/2 log2(2/3) + 1/2 log2(2)
    want = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_divergence([1, 0, 0], [0.5, 0.5, 0]) == pytest.approx(want)


def test_a_repeated_target_is_excluded_and_counted():
    item_vectors = np.eye(2, dtype=np.float32)
    m = evaluate_full_ranking(
        lambda h: np.array([[1.0, 0.0]], dtype=np.float32),
        item_vectors,
        [np.array([1])],
        np.array([1]),
        np.ones(2),
        ks=(1,),
    )
    assert m["hr@1"] == 0.0 and m["repeat_targets"] == 1
