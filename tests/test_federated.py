"""Federated training (export/federated.py): disjoint user shards, Flower's FedAvg over a real
127.0.0.1 gRPC stream, the published version served over gRPC."""

import numpy as np
import pytest
from serving import RunningServer, settings

from attnrec.export.config import TrainConfig
from attnrec.export.federated import FederatedConfig, initial_weights, make_clients, shard_users, train_federated
from attnrec.export.train import resolve_config, training_windows

TINY = dict(max_len=12, dim=16, n_blocks=1, n_heads=1, ffn_dim=32, batch_size=64, threads=2, seed=0)


def test_shards_are_disjoint_cover_every_user_and_follow_the_seed(small_split):
    n = small_split.data.n_users
    for k in (2, 3, 7):
        shards = shard_users(n, k, seed=4)
        everyone = np.concatenate(shards)
        assert len(everyone) == n and np.array_equal(np.sort(everyone), np.arange(n))  # disjoint and covering
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(shard_users(n, 3, 4), shard_users(n, 3, 4)))
    assert not np.array_equal(shard_users(n, 3, 4)[0], shard_users(n, 3, 5)[0])
    # the clients' windows: each from one of its own users, together every training window once
    cfg = resolve_config(TrainConfig(**TINY), small_split)
    clients = make_clients(small_split, cfg, FederatedConfig(clients=3, rounds=1))
    starts, _ = training_windows(small_split, cfg.max_len)
    assert sum(c.n_windows for c in clients) == len(starts)
    assert np.array_equal(np.sort(np.concatenate([c.starts for c in clients])), np.sort(starts))
    offsets = small_split.data.offsets
    for c in clients:
        assert np.isin(np.searchsorted(offsets, c.starts, side="right") - 1, c.users).all()
    with pytest.raises(ValueError, match="more clients"):
        shard_users(5, 6, 0)
    with pytest.raises(ValueError, match="at least 2"):
        FederatedConfig(clients=1)


def test_a_round_is_the_sample_weighted_mean_of_the_clients_weights(small_split):
    cfg = TrainConfig(**TINY)
    fed = FederatedConfig(clients=2, rounds=2, local_epochs=1)
    rounds = {}
    result, section = train_federated(
        small_split, cfg, fed, progress=False, on_round=lambda r, model, w: rounds.setdefault(r, [x.copy() for x in w])
    )
    assert sorted(rounds) == [0, 1, 2] and len(result.history) == 2 and section.best_round in (1, 2)
    # reference: the clients' own fits from the initial weights, averaged by their training windows
    resolved = resolve_config(cfg, small_split)
    init = initial_weights(small_split, resolved)
    assert all(np.array_equal(a, b) for a, b in zip(rounds[0], init))
    fits = [c.fit(init, {"server_round": 1, "local_epochs": 1}) for c in make_clients(small_split, resolved, fed)]
    (w1, n1, _), (w2, n2, _) = fits
    assert (n1, n2) == section.windows_per_client and n1 != n2
    for got, a, b in zip(rounds[1], w1, w2):
        assert not np.array_equal(a, b)
        np.testing.assert_array_equal(got, (a * n1 + b * n2) / (n1 + n2))
    # the exported model is the best round's aggregate
    best = rounds[section.best_round]
    assert all(np.array_equal(v.numpy(), w) for v, w in zip(result.model.state_dict().values(), best))
    assert result.best_valid_ndcg10 == max(h["valid_ndcg@10"] for h in result.history) > 0


def test_train_federated_publishes_a_version_that_serves(tmp_path, small_log):
    from attnrec.cli import main
    from attnrec.engine.client import RecommenderClient
    from attnrec.engine.pipeline import Pipeline
    from attnrec.engine.repository import newest_valid_version, open_version
    from attnrec.export.data.synthetic import write

    data = tmp_path / "log.parquet"
    write(small_log, data)
    repo = tmp_path / "repo"
    args = ["-q", "train", "--data", str(data), "--out", str(repo), "--name", "fed", "--no-ranker"]
    args += ["--max-len", "12", "--dim", "16", "--n-blocks", "1", "--ffn-dim", "32", "--threads", "2"]
    assert main([*args, "--federated", "2", "--fed-rounds", "2", "--fed-local-epochs", "1"]) == 0
    m = open_version(repo / "fed" / "1")
    f = m.training.federated
    assert (f.clients, f.rounds, f.local_epochs) == (2, 2, 1) and "FedAvg" in f.strategy and f.flwr
    assert sum(f.users_per_client) == len(np.unique(small_log.user)) and f.best_round == m.training.best_epoch
    assert [h["round"] for h in m.training.history] == [1, 2] and m.metrics.test["ndcg@10"] > 0
    assert main([*args, "--federated", "2", "--dp-epsilon", "8"]) == 2  # refused with a clear line
    pipe = Pipeline.load(newest_valid_version(repo, "fed")[0])
    ids = pipe.item_ids.astype(str)
    with RunningServer(settings(repo)) as s, RecommenderClient(s.target) as client:
        for h in ([3, 50, 7], list(range(20, 30))):
            reply = client.recommend(ids[h].tolist(), 5)
            assert reply.items == ids[pipe.recommend([np.array(h)], 5).rows[0]].tolist()
