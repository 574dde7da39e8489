"""The fixed CLI contract: `attnrec train` publishes a version; `attnrec evaluate --json` reads it back."""

import json
import subprocess
import sys

import numpy as np
import pytest

from attnrec.cli import main
from attnrec.engine.repository import list_versions, open_version


def test_train_publishes_a_complete_verified_version(trained_repo, small_log):
    data, repo = trained_repo
    assert list_versions(repo, "seq") == [1]
    m = open_version(repo / "seq" / "1")
    assert set(m.files.roles()) == {"encoder", "item_embeddings", "index", "item_ids", "item_popularity", "ranker"}
    assert m.ranker.n_candidates == 50 and m.ranker.parity.max_abs_diff <= 1e-4
    # the default ranker attends over its own item embeddings: the encoder needs no hidden states
    assert "hidden" not in m.encoder.outputs and "hidden" not in m.ranker.inputs
    assert m.model.n_items == len(np.unique(small_log.item)) and m.model.max_len == 16 and m.model.dim == 16
    assert m.encoder.parity.max_abs_diff <= 1e-4
    assert m.index.factory == "Flat" and m.index.recall_n == 200 and m.index.recall == 1.0
    assert m.training.config["dim"] == 16 and m.training.best_epoch >= 1
    assert json.loads((repo / "seq" / "1" / "item_ids.json").read_text()) == sorted(np.unique(small_log.item).tolist())
    assert m.metrics.test["ndcg@10"] > m.metrics.baselines["popularity"]["test"]["ndcg@10"]
    assert m.metrics.test == m.metrics.pipeline.ranked["test"]  # what the server runs


def test_evaluate_json_matches_the_published_metrics(trained_repo, tmp_path):
    data, repo = trained_repo
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "--repo", str(repo), "--name", "seq", "--data", str(data), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for split in ("test", "valid"):
        for key in ("hr@10", "ndcg@10", "hr@20", "ndcg@20"):
            assert 0.0 <= result[split][key] <= 1.0
    for key in ("coverage@10", "gini@10", "long_tail@10", "popcal_js@10"):  # exposure fairness beside accuracy
        assert 0.0 <= result["test"][key] <= 1.0 and 0.0 <= result["baselines"]["popularity"]["test"][key] <= 1.0
    # popularity recommends the same few head items to everyone: more concentrated than the model
    assert result["baselines"]["popularity"]["test"]["gini@10"] > result["test"]["gini@10"]
    assert result["baselines"]["popularity"]["test"]["long_tail@10"] < result["test"]["long_tail@10"]
    published = open_version(repo / "seq" / "1").metrics
    assert result["test"] == pytest.approx(published.test)
    assert result["protocol"]["exclude_seen"] is True
    assert result["protocol"]["users_evaluated"] == 400 and result["model"]["version"] == 1


def test_evaluate_skips_a_tampered_newer_version(trained_repo, tmp_path):
    data, repo = trained_repo
    import shutil

    shutil.copytree(repo / "seq" / "1", repo / "seq" / "2")
    emb = np.load(repo / "seq" / "2" / "item_embeddings.npy")
    np.save(repo / "seq" / "2" / "item_embeddings.npy", emb * 2)  # tampered: checksum no longer matches
    out = tmp_path / "eval.json"
    try:
        assert (
            main(["-q", "evaluate", "--repo", str(repo), "--name", "seq", "--data", str(data), "--json", str(out)]) == 0
        )
        assert json.loads(out.read_text())["model"]["version"] == 1
        assert (
            main(["-q", "evaluate", "--repo", str(repo), "--name", "seq", "--version", "2", "--data", str(data)]) == 2
        )
    finally:
        shutil.rmtree(repo / "seq" / "2")


def test_bad_data_fails_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\n1,2,3\n1,,4\n")
    assert main(["-q", "evaluate", "--repo", str(tmp_path), "--name", "x", "--data", str(bad)]) == 2


def test_evaluation_and_retrieval_never_import_torch(trained_repo, tmp_path):
    data, repo = trained_repo
    out = tmp_path / "cands.parquet"
    code = (
        "import sys; from attnrec.cli import main; "
        f"rc = main(['-q', 'evaluate', '--repo', {str(repo)!r}, '--name', 'seq', '--data', {str(data)!r}]); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'; "
        f"rc = main(['-q', 'retrieve', '--repo', {str(repo)!r}, '--name', 'seq', '--data', {str(data)!r}, "
        f"'--out', {str(out)!r}]); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'; "
        "import attnrec.engine.encoder, attnrec.engine.index, attnrec.engine.pipeline, attnrec.engine.repository; "
        "import attnrec.export.ranking_metrics; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_evaluate_on_a_sample_of_users(trained_repo, tmp_path):
    data, repo = trained_repo
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--repo",
                str(repo),
                "--name",
                "seq",
                "--data",
                str(data),
                "--eval-users",
                "50",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["protocol"]["users_evaluated"] == 50 and result["protocol"]["users_eligible"] == 400
    assert result["test"]["users"] == 50 and result["baselines"]["popularity"]["test"]["users"] == 50


def test_export_refuses_a_checkpoint_trained_on_other_items(trained_repo, tmp_path, small_log):
    data, repo = trained_repo
    from attnrec.export.data.log import InteractionLog
    from attnrec.export.data.synthetic import write as write_log

    other = tmp_path / "other.parquet"
    write_log(InteractionLog(small_log.user, small_log.item + 1000, small_log.timestamp, "shifted ids"), other)
    ckpt = repo / "seq" / ".train" / "checkpoint.pt"
    args = ["-q", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "r"), "--name", "x", "--no-ranker"]
    assert main([*args, "--data", str(other)]) == 2
    assert main([*args, "--data", str(data)]) == 0
    assert list_versions(tmp_path / "r", "x") == [1]
    m = open_version(tmp_path / "r" / "x" / "1")
    assert m.files.ranker is None and m.ranker is None and m.metrics.pipeline.served == "ann"


def test_demo_runs_end_to_end_on_a_small_synthetic_log(tmp_path):
    assert main(["-q", "demo", "--out", str(tmp_path / "demo"), "--users", "300", "--items", "200"]) == 0
    m = open_version(tmp_path / "demo" / "repo" / "demo" / "1")
    assert m.metrics.test["ndcg@10"] > m.metrics.baselines["popularity"]["test"]["ndcg@10"]
