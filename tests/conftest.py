import numpy as np
import pytest

from attnrec.export.data.log import InteractionLog
from attnrec.export.data.sequences import build_sequences, leave_one_out
from attnrec.export.data.synthetic import SyntheticConfig, generate, write


@pytest.fixture(scope="session")
def small_log() -> InteractionLog:
    """A small synthetic log with sequential structure (fast to train on)."""
    return generate(SyntheticConfig(n_users=400, n_items=300, mean_length=20, seed=3))


@pytest.fixture(scope="session")
def small_split(small_log):
    return leave_one_out(build_sequences(small_log))


@pytest.fixture(scope="session")
def tiny_model(small_split):
    """A briefly trained SASRec (a few epochs): enough for parity and pipeline tests."""
    from attnrec.export.train import TrainConfig, train

    cfg = TrainConfig(
        max_len=20, dim=32, n_blocks=2, n_heads=2, ffn_dim=64, epochs=3, patience=3, batch_size=64, seed=0, threads=2
    )
    return train(small_split, cfg, progress=False).model


def make_log(rows, source="mem"):
    """rows: (user, item, timestamp) triples."""
    u, i, t = zip(*rows)
    return InteractionLog(np.array(u), np.array(i), np.array(t, dtype=np.float64), source)


TRAIN = [
    "--epochs",
    "3",
    "--patience",
    "3",
    "--dim",
    "16",
    "--n-blocks",
    "1",
    "--max-len",
    "16",
    "--ffn-dim",
    "32",
    "--batch-size",
    "64",
    "--threads",
    "2",
    "--ranker-epochs",
    "2",
    "--ranker-samples-per-user",
    "3",
    "--ranker-n-candidates",
    "50",
]


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory, small_log):
    root = tmp_path_factory.mktemp("cli")
    data = root / "log.parquet"
    write(small_log, data)
    repo = root / "repo"
    from attnrec.cli import main

    assert main(["-q", "train", "--data", str(data), "--out", str(repo), "--name", "seq", *TRAIN]) == 0
    return data, repo
