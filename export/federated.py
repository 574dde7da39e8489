"""Federated training of the SASRec encoder: a Flower simulation of K clients holding disjoint users.

The users of the leave-one-out split are shuffled by the seed and cut into K contiguous shards
(`shard_users`); client k holds its shard's training windows only. Each round, Flower's FedAvg
strategy (flwr.server.strategy.FedAvg) sends the global weights to every client, each runs E local
epochs of the ordinary training step (export/train.py `train_epoch`: the same loss, batching and
AdamW, a fresh optimizer per round as FedAvg clients are stateless) and returns its weights with
its number of training windows, and the server replaces the global weights by the mean of the
clients' weights weighted by those counts. After every round the server scores the aggregate on the
validation users (the same `validate` as centralised training) and keeps the best round's weights.

The server and the clients talk over Flower's own transport: the Fleet API's gRPC stream
(grpc-bidi) on a 127.0.0.1 port, the clients started with `flwr.client.start_client` in threads of
this process. Flower's simulation engine (`flwr run` / run_simulation) needs Ray from the
flwr[simulation] extra, which pins a Ray older than the one `attnrec retrieve --ray` uses; the
grpc-bidi server and client are in plain `flwr` (which Flower 1.42 marks deprecated in favour of
SuperLink/SuperNode processes, whose apps are loaded from an installed Flower app package). The
clients' local training runs one client at a time (a lock): the global torch RNG is seeded per
(seed, client, round), so a run is reproducible, and on a shared CPU parallel clients would only
contend for the same cores. Not differentially private: the server sees each client's weights.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from attnrec.engine.repository import FederatedSection

from .config import TrainConfig
from .data.sequences import LeaveOneOut
from .train import TrainResult, _Optimizer, resolve_config, train_epoch, training_windows, validate

log = logging.getLogger(__name__)

# Flower reports usage to its servers unless told not to; a training run reaches no one. Read at import.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

CONNECT_TIMEOUT_S = 60  # how long the server waits for all K clients to connect before giving up


@dataclass(frozen=True)
class FederatedConfig:
    """`attnrec train --federated K --fed-rounds R --fed-local-epochs E`."""

    clients: int  # K
    rounds: int = 20  # R
    local_epochs: int = 1  # E

    def __post_init__(self) -> None:
        if self.clients < 2:
            raise ValueError(f"--federated needs at least 2 clients, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"--fed-rounds must be >= 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise ValueError(f"--fed-local-epochs must be >= 1, got {self.local_epochs}")


def shard_users(n_users: int, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint, sorted arrays of user rows that together hold every user: a permutation by `seed`
    cut into K contiguous parts of sizes differing by at most one."""
    if k > n_users:
        raise ValueError(f"--federated {k}: more clients than the data's {n_users} users")
    perm = np.random.default_rng(seed).permutation(n_users)
    return [np.sort(part) for part in np.array_split(perm, k)]


def get_weights(model) -> list[np.ndarray]:
    """The model's state as the list of float32 arrays Flower exchanges (state_dict order)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model, weights: list[np.ndarray]) -> None:
    import torch

    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"{len(weights)} arrays for a model of {len(state)} tensors")
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(w)).to(v.device, v.dtype) for (k, v), w in zip(state.items(), weights)}
    )


def _client_seed(seed: int, client: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, client, round_]).generate_state(1)[0])


class ShardClient:
    """One client: its users' training windows and a model; `fit` is Flower's NumPyClient.fit."""

    def __init__(self, cid: int, split: LeaveOneOut, users: np.ndarray, cfg: TrainConfig, lock: threading.Lock) -> None:
        from .model import SASRec

        self.cid, self.cfg, self.lock, self.split = cid, cfg, lock, split
        self.users = users
        starts, ends = training_windows(split, cfg.max_len)
        owner = np.searchsorted(split.data.offsets, starts, side="right") - 1
        mine = np.isin(owner, users)
        self.starts, self.ends = starts[mine], ends[mine]
        self.model = SASRec(cfg.model_config(split.data.n_items), sparse_items=cfg.loss == "sampled").to(cfg.device)

    def _own_popularity(self) -> np.ndarray:
        """Training counts of the client's own users (catalogue rows)."""
        base, lengths = self.split.data.offsets[self.users], self.split.train_lengths()[self.users]
        rows = np.concatenate([np.arange(b, b + n) for b, n in zip(base, lengths)] or [np.zeros(0, np.int64)])
        return np.bincount(self.split.data.items[rows], minlength=self.split.data.n_items + 1)[1:].astype(np.float64)

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return get_weights(self.model)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        """E local epochs from the global weights; (weights, training windows, {"loss": last epoch's mean})."""
        import torch

        from .train import PopularityNegatives

        round_, epochs = int(config["server_round"]), int(config["local_epochs"])
        with self.lock:
            set_weights(self.model, parameters)
            seed = _client_seed(self.cfg.seed, self.cid, round_)
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            opt = _Optimizer(self.model, self.cfg, sparse=self.cfg.loss == "sampled")
            negatives = None
            if self.cfg.loss == "sampled":  # the client's own counts: it sees no other client's data
                pop = self._own_popularity()
                negatives = PopularityNegatives(pop, self.cfg.n_negatives, torch.device(self.cfg.device))
            loss = float("nan")
            for _ in range(epochs):
                loss = train_epoch(
                    self.model, opt, self.split.data.items, self.starts, self.ends, self.cfg, rng, negatives=negatives
                )
            return get_weights(self.model), self.n_windows, {"loss": loss}

    def evaluate(self, parameters, config):  # centralised evaluation only (fraction_evaluate=0)
        raise NotImplementedError("clients do not evaluate: the server scores each round on the validation users")


def make_clients(split: LeaveOneOut, cfg: TrainConfig, fed: FederatedConfig) -> list[ShardClient]:
    """The K clients of a run (cfg resolved), each with at least one training window."""
    lock = threading.Lock()
    clients = [
        ShardClient(k, split, u, cfg, lock)
        for k, u in enumerate(shard_users(split.data.n_users, fed.clients, cfg.seed))
    ]
    empty = [c.cid for c in clients if c.n_windows == 0]
    if empty:
        raise ValueError(
            f"--federated {fed.clients}: client(s) {empty} hold no user with two or more training interactions; "
            "use fewer clients"
        )
    return clients


def initial_weights(split: LeaveOneOut, cfg: TrainConfig) -> list[np.ndarray]:
    """The global model before round 1: SASRec initialised from the seed, as centralised training starts."""
    import torch

    from .model import SASRec

    torch.manual_seed(cfg.seed)
    return get_weights(SASRec(cfg.model_config(split.data.n_items), sparse_items=cfg.loss == "sampled"))


def train_federated(
    split: LeaveOneOut,
    cfg: TrainConfig,
    fed: FederatedConfig,
    *,
    progress: bool = True,
    on_round=None,
) -> tuple[TrainResult, FederatedSection]:
    """Run the Flower simulation; the best round's model (CPU, eval mode) and the manifest's federated section.

    on_round(round, model, weights): after each round's aggregation and validation (round 0: the
    initial weights), with the server's model holding the aggregate; e.g. to score it on test users.
    """
    import flwr
    import torch
    from flwr.client import NumPyClient, start_client
    from flwr.common import ndarrays_to_parameters
    from flwr.server import Server, ServerConfig, SimpleClientManager
    from flwr.server.server import run_fl
    from flwr.server.strategy import FedAvg
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .model import SASRec

    if cfg.ema_decay > 0:
        raise ValueError("--ema-decay is not available with --federated (the server averages the clients' weights)")
    cfg = resolve_config(cfg, split)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    n_valid = len(split.valid)
    val_users = (
        np.arange(n_valid) if n_valid <= cfg.val_users else np.sort(rng.choice(n_valid, cfg.val_users, replace=False))
    )
    popularity = split.train_popularity()[1:].astype(np.float64)
    clients = make_clients(split, cfg, fed)
    init = initial_weights(split, cfg)
    server_model = SASRec(cfg.model_config(split.data.n_items))
    log.info(
        "federated: %d clients (users %s, training windows %s), %d rounds of %d local epochs, FedAvg over Flower %s",
        fed.clients,
        [len(c.users) for c in clients],
        [c.n_windows for c in clients],
        fed.rounds,
        fed.local_epochs,
        flwr.__version__,
    )

    history: list[dict] = []
    best = {"round": 0, "ndcg": -1.0, "state": None}
    fit_loss = {"value": float("nan")}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns.append(TextColumn("{task.fields[status]}"))
    bar = Progress(*columns, disable=not progress)
    task = bar.add_task("federated rounds", total=fed.rounds, status="")

    def evaluate_fn(server_round: int, weights: list[np.ndarray], config: dict):
        set_weights(server_model, weights)
        metrics = validate(server_model, split, val_users, popularity)
        ndcg = float(metrics["ndcg@10"])
        if server_round > 0:
            history.append(
                {
                    "round": server_round,
                    "loss": fit_loss["value"],
                    "valid_ndcg@10": ndcg,
                    "valid_hr@10": float(metrics["hr@10"]),
                }
            )
            if ndcg > best["ndcg"]:
                best.update(round=server_round, ndcg=ndcg, state=[w.copy() for w in weights])
            bar.update(task, advance=1, status=f"valid NDCG@10 {ndcg:.4f} (best {best['ndcg']:.4f} @ {best['round']})")
            log.info(
                "round %d: client loss %.4f, valid NDCG@10 %.4f (best %.4f at round %d)",
                server_round,
                fit_loss["value"],
                ndcg,
                best["ndcg"],
                best["round"],
            )
        if on_round is not None:
            on_round(server_round, server_model, weights)
        return 0.0, {"valid_ndcg@10": ndcg}

    def fit_metrics(results: list[tuple[int, dict]]) -> dict:
        n = sum(k for k, _ in results)
        fit_loss["value"] = sum(k * m["loss"] for k, m in results) / max(n, 1)
        return {"loss": fit_loss["value"]}

    class _StrictFedAvg(FedAvg):
        """FedAvg that stops the run when a client fails, rather than averaging the others' weights."""

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(
                    f"federated round {server_round}: {len(failures)} of {fed.clients} clients failed "
                    f"({failures[0]!r:.200}); see the client errors logged above"
                )
            return super().aggregate_fit(server_round, results, failures)

    strategy = _StrictFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=fed.clients,
        min_evaluate_clients=0,
        min_available_clients=fed.clients,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server_round": r, "local_epochs": fed.local_epochs},
        fit_metrics_aggregation_fn=fit_metrics,
        initial_parameters=ndarrays_to_parameters(init),
        inplace=False,  # flwr's aggregate(): sum of n_k * w_k over sum of n_k, in the weights' float32
    )

    class _Numpy(NumPyClient):
        def __init__(self, client: ShardClient) -> None:
            self.client = client

        def get_parameters(self, config):
            return self.client.get_parameters(config)

        def fit(self, parameters, config):
            return self.client.fit(parameters, config)

    flwr_log = logging.getLogger("flwr")
    flwr_level = flwr_log.level
    # Flower logs every message at INFO and warns on each start of the grpc-bidi client (deprecated API);
    # our own per-round line says what matters.
    flwr_log.setLevel(logging.ERROR)
    client_manager = SimpleClientManager()
    server = Server(client_manager=client_manager, strategy=strategy)
    grpc_server = start_grpc_server(client_manager=client_manager, server_address="127.0.0.1:0")
    address = grpc_server.bound_address
    errors: list[BaseException] = []

    def run_client(c: ShardClient) -> None:
        try:
            start_client(server_address=address, client=_Numpy(c).to_client(), insecure=True, max_retries=3)
        except BaseException as exc:  # reported with the server's failure
            errors.append(exc)
            log.error("federated client %d failed: %r", c.cid, exc)

    threads = [
        threading.Thread(target=run_client, args=(c,), name=f"flwr-client-{c.cid}", daemon=True) for c in clients
    ]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        if not client_manager.wait_for(fed.clients, timeout=CONNECT_TIMEOUT_S):
            raise RuntimeError(
                f"only {client_manager.num_available()} of {fed.clients} Flower clients connected to {address} "
                f"within {CONNECT_TIMEOUT_S}s" + (f": {errors[0]!r}" if errors else "")
            )
        with bar:
            run_fl(server=server, config=ServerConfig(num_rounds=fed.rounds))
    finally:
        grpc_server.stop(grace=1)
        for t in threads:
            t.join(timeout=10)
        flwr_log.setLevel(flwr_level)
    if errors:
        raise RuntimeError(f"a federated client failed: {errors[0]!r}")
    seconds = time.perf_counter() - t0
    set_weights(server_model, best["state"])
    server_model.eval()
    section = FederatedSection(
        clients=fed.clients,
        rounds=fed.rounds,
        local_epochs=fed.local_epochs,
        strategy="FedAvg (flwr.server.strategy.FedAvg): the clients' weights averaged, weighted by their "
        "training windows; every client in every round; a fresh local AdamW per round",
        transport="Flower grpc-bidi on 127.0.0.1, the clients threads of one process, training one at a time",
        partition="users shuffled by the seed, cut into contiguous shards (disjoint, covering every user)",
        users_per_client=tuple(int(len(c.users)) for c in clients),
        windows_per_client=tuple(int(c.n_windows) for c in clients),
        best_round=best["round"],
        evaluation="the server scores each round's aggregate on the validation users (centralised: a "
        "simulation's view); the best round is exported",
        centralised=(
            "validation scoring of each round and the best-round choice (validation items of every user)",
            "item_ids.json and item_popularity.npy: the catalogue and the training counts of every user",
            "items.faiss search parameters, tuned on validation users' query vectors",
            "ranker.onnx when present: trained centrally on every user's data",
            "metrics: evaluated on every user's validation and test items",
        ),
        flwr=flwr.__version__,
    )
    result = TrainResult(server_model, cfg, best["round"], best["ndcg"], len(history), seconds, history)
    return result, section
