"""Offline retrieval through the server's RecommendStream writes what the single-process job writes."""

import numpy as np
import pyarrow.parquet as pq
from serving import RunningServer, settings

from engine.client import RecommenderClient
from engine.repository import newest_valid_version
from export.cli import main
from export.data.readers import read_interactions
from export.data.sequences import build_sequences
from export.evaluate import load_item_ids
from export.retrieve import retrieve


def test_server_and_single_process_outputs_agree(trained_repo, tmp_path):
    data_path, repo = trained_repo
    version_dir, manifest = newest_valid_version(repo, "seq")
    data = build_sequences(read_interactions(data_path), item_vocab=load_item_ids(version_dir, manifest))
    retrieve(version_dir, manifest, data, tmp_path / "local.parquet", top_n=20, batch_size=100, progress=False)
    with RunningServer(settings(repo)) as s:
        args = ["-q", "retrieve", "--server", s.target, "--data", str(data_path), "--top-n", "20"]
        assert main([*args, "--out", str(tmp_path / "server.parquet"), "--batch-size", "100"]) == 0
        with RecommenderClient(s.target) as client:
            assert client.model_info()["version"] == manifest.version
    local, served = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "server.parquet")
    assert served.schema == local.schema  # same columns, types and metadata
    assert pq.ParquetFile(tmp_path / "server.parquet").num_row_groups == int(np.ceil(data.n_users / 100))
    for col in ("user_id", "rank", "item_id", "model_version"):
        assert served.column(col).to_pylist() == local.column(col).to_pylist(), col
    np.testing.assert_allclose(served.column("score").to_numpy(), local.column("score").to_numpy(), atol=1e-5)
