"""Offline retrieval through the server's RecommendStream writes what the single-process job writes."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from serving import RunningServer, clone_version, settings, toy_ranker

from attnrec.cli import main
from attnrec.engine.client import RecommenderClient
from attnrec.engine.repository import newest_valid_version
from attnrec.export.data.readers import read_interactions
from attnrec.export.data.sequences import build_sequences
from attnrec.export.evaluate import load_item_ids
from attnrec.export.retrieve import retrieve


@pytest.mark.parametrize("ranked", [False, True], ids=["stage-one", "ranked"])
def test_server_and_single_process_outputs_agree(trained_repo, tmp_path, ranked):
    """The same version through both paths: stage one alone, and with a ranker that reorders."""
    data_path, src_repo = trained_repo
    repo = tmp_path / "repo"
    ranker = toy_ranker(tmp_path / "ranker.onnx") if ranked else None
    clone_version(newest_valid_version(src_repo, "seq")[0], repo, ranker_onnx=ranker, n_candidates=30)
    version_dir, manifest = newest_valid_version(repo, "seq")
    data = build_sequences(read_interactions(data_path), item_vocab=load_item_ids(version_dir, manifest))
    local_out = tmp_path / "local.parquet"
    retrieve(version_dir, manifest, data, local_out, top_n=20, batch_size=100, progress=False, rank=ranked)
    with RunningServer(settings(repo)) as s:
        args = ["-q", "retrieve", "--server", s.target, "--data", str(data_path), "--top-n", "20"]
        assert main([*args, "--out", str(tmp_path / "server.parquet"), "--batch-size", "100"]) == 0
        with RecommenderClient(s.target) as client:
            assert client.model_info()["version"] == manifest.version
    local, served = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "server.parquet")
    assert served.schema.equals(local.schema, check_metadata=True)  # same columns, types and metadata
    assert local.schema.metadata[b"ranked"] == (b"true" if ranked else b"false")
    assert pq.ParquetFile(tmp_path / "server.parquet").num_row_groups == int(np.ceil(data.n_users / 100))
    for col in ("user_id", "rank", "item_id", "model_version"):
        assert served.column(col).to_pylist() == local.column(col).to_pylist(), col
    np.testing.assert_allclose(served.column("score").to_numpy(), local.column("score").to_numpy(), atol=1e-5)
