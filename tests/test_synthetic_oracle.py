"""The synthetic oracle: NDCG of a re-ordering by hand, and the measurement on a tiny trained version."""

import numpy as np
import pytest

from attnrec.benchmarks.synthetic_oracle import measure, ndcg_of_order
from attnrec.export.data.synthetic import SyntheticConfig, generate_with_attributes, write, write_attributes


def test_ndcg_of_order_by_hand():
    rows = np.array([[4, 7, 2, -1], [4, 7, 2, 9], [1, 2, 3, 5]])
    scores = np.array([[0.1, 0.5, 0.3, 9.0], [0.2, 0.2, 0.1, 0.0], [0.4, 0.3, 0.2, 0.1]])
    targets = np.array([2, 7, 8])
    # List 0: the empty slot's score is ignored; order 7, 2, 4: target 2 at rank 2 → 1 / log2(3).
    # List 1: the tie 4, 7 keeps the given order: target 7 at rank 2.  List 2: target not there → 0.
    np.testing.assert_allclose(ndcg_of_order(scores, rows, targets), [1 / np.log2(3), 1 / np.log2(3), 0.0])
    # Past k the target is a miss.
    np.testing.assert_allclose(ndcg_of_order(scores, rows, targets, k=1), [0.0, 0.0, 0.0])


def test_oracle_measured_on_a_tiny_version(tmp_path):
    from attnrec.cli import main

    cfg = SyntheticConfig(n_users=300, n_items=120, mean_length=12.0, seed=1, n_categories=4, stay_prob=0.5)
    log, attrs = generate_with_attributes(cfg)
    data = tmp_path / "syn.parquet"
    write(log, data)
    write_attributes(attrs, tmp_path / "items.csv", tmp_path / "users.csv")
    train = "--epochs 2 --patience 2 --dim 16 --n-blocks 1 --max-len 16 --ffn-dim 32 --batch-size 64 --threads 1"
    argv = ["-q", "train", "--data", str(data), "--out", str(tmp_path / "repo"), "--name", "m", "--no-ranker"]
    assert main([*argv, *train.split()]) == 0
    result = measure(tmp_path / "repo", "m", cfg, data=data)
    rows = result["rows"]
    assert set(rows) == {
        "exact",
        "ann",
        "served",
        "oracle (candidates)",
        "oracle (full)",
        "oracle (candidates, hour unknown)",
    }
    for which in ("valid", "test"):
        # The true probabilities are the best order there is: on 300 users they beat a 2-epoch encoder.
        assert rows["oracle (full)"][which]["ndcg@10"] > rows["exact"][which]["ndcg@10"]
        # Re-ordering the candidates finds no target that FAISS's top-N missed.
        assert rows["oracle (candidates)"][which]["hr@10"] <= result["stage1_recall"][which] + 1e-12
    other = SyntheticConfig(n_users=300, n_items=120, mean_length=12.0, seed=2, n_categories=4, stay_prob=0.5)
    with pytest.raises(ValueError, match="attnrec synth"):
        measure(tmp_path / "repo", "m", other)
    write(generate_with_attributes(other)[0], tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not this generator's log"):
        measure(tmp_path / "repo", "m", cfg, data=tmp_path / "other.parquet")
