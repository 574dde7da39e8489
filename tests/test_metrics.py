import math

import numpy as np
import pytest

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
