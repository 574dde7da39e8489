"""The ranker ablation runner on tiny synthetic data with attributes: one encoder, one ranker per group on
its checkpoint, and a report whose numbers are the published versions' own."""

import json

import pytest

from attnrec.benchmarks.ranker_ablation import main, parse_groups
from attnrec.engine.repository import newest_valid_version
from attnrec.export.data.synthetic import SyntheticConfig, generate_with_attributes, write, write_attributes

TRAIN = "--epochs 2 --patience 2 --dim 16 --n-blocks 1 --max-len 16 --ffn-dim 32 --batch-size 64 --threads 2"
EXPORT = "--ranker-epochs 1 --ranker-samples-per-user 2 --ranker-n-candidates 30 --ranker-val-users 100"


def test_groups_are_checked():
    assert parse_groups("none, item,item+user+time") == ["none", "item", "item+user+time"]
    with pytest.raises(ValueError, match="colour"):
        parse_groups("item+colour")
    with pytest.raises(ValueError):
        parse_groups("none+item")


def test_ablation_trains_one_encoder_and_a_ranker_per_group_on_it(tmp_path):
    cfg = SyntheticConfig(n_users=300, n_items=200, mean_length=12.0, seed=1, n_categories=4)
    log, attrs = generate_with_attributes(cfg)
    data, items, users = tmp_path / "syn.parquet", tmp_path / "items.csv", tmp_path / "users.csv"
    write(log, data)
    write_attributes(attrs, items, users)
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--data", f"syn={data}", "--item-features", str(items), "--user-features", str(users)]
    argv += ["--seeds", "0", "--groups", "none,user+time", "--train-args", TRAIN, "--export-args", EXPORT]
    assert main([*argv, "--out", str(out), "--work-dir", str(work), "--date", "test", "--quiet"]) == 0
    report = json.loads((out / "ranker-test.json").read_text())
    (seed,) = report["datasets"]["syn"]["seeds"]
    assert [r["group"] for r in seed["rows"]] == ["none", "user+time"]
    base = json.loads((newest_valid_version(work / "repo", "syn-s0")[0] / "manifest.json").read_text())
    checkpoint = base["training"]["checkpoint"]
    for row in seed["rows"]:
        version = newest_valid_version(work / "repo", f"syn-s0-{row['group']}")[0]
        m = json.loads((version / "manifest.json").read_text())
        assert m["training"]["checkpoint"] == checkpoint  # every ranker on the seed's one encoder
        pipe = m["metrics"]["pipeline"]
        assert row["exact_test_ndcg10"] == pipe["exact"]["test"]["ndcg@10"]
        assert row["served_test_ndcg10"] == pipe["ranked"]["test"]["ndcg@10"]
        assert row["identity"] == (m["ranker"]["training"]["best_epoch"] == 0)
        assert row["ranker_ms_batch1"] > 0
    none, timed = seed["rows"]
    assert none["exact_test_ndcg10"] == timed["exact_test_ndcg10"]  # same encoder, same users
    assert none["ranker_inputs"] == ["history", "candidates", "candidate_scores"]
    want = ["history", "candidates", "candidate_scores", "user_features", "history_timestamps", "request_time"]
    assert timed["ranker_inputs"] == want
    md = (out / "ranker-test.md").read_text()
    assert "| none |" in md and "| user+time |" in md and "served / exact" in md
