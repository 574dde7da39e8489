"""`attnrec train` (one flag per TrainConfig field) and `attnrec demo`, the whole offline path on synthetic data."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path

from .content import add_content_args, content_of, with_cold_items
from .data import add_data_args, load_split
from .export import add_publish_args, add_ranker_args, add_repo_args, publish_version

log = logging.getLogger(__name__)

_TRAIN_HELP = {
    "max_len": "longest history the model reads (older items are dropped); 0: the 99th percentile of the "
    "training histories' lengths, rounded up to a multiple of 10, within 50..200 (logged)",
    "dim": "embedding and hidden size",
    "n_blocks": "transformer blocks",
    "n_heads": "attention heads",
    "ffn_dim": "feed-forward inner size",
    "dropout": "dropout rate",
    "loss": "ss: sampled softmax, --n-negatives uniform negatives per position; ce: full softmax over the "
    "catalogue; sampled: shared popularity-sampled negatives with logQ correction (huge catalogues); "
    "auto: ce up to 4,096 items, ss up to 100,000, else sampled (logged)",
    "mask_seen": "with --loss ce or ss, leave items already in the history out of the softmax, as evaluation does",
    "n_negatives": "negatives per position (--loss ss) or per batch (--loss sampled); "
    "0: for ss 512 on catalogues of at most 512 x --dim items, else 256; 2048 for sampled",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "batch_size": "training windows per batch; 0: 128 for --loss ss, 64 for ce and sampled",
    "epochs": "maximum epochs",
    "ema_decay": "if > 0, validate and export an exponential moving average of the weights (e.g. 0.99)",
    "patience": "stop after this many epochs without a better validation NDCG@10",
    "val_users": "validation users sampled for early stopping (all when fewer)",
    "time_budget_s": "stop training after this many seconds (0: no limit)",
    "threads": "torch CPU threads (0: torch's default)",
    "length_batches": "group windows of similar length into batches (less padding; changes the data order)",
    "device": "where to train: cpu, cuda (bf16 autocast), or auto (cuda when torch sees a GPU)",
    "seed": "random seed (data order, initialisation, sampling)",
}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from ..config import TrainConfig

    g = p.add_argument_group("model and training")
    base = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(base, f.name)
        kind = type(default)
        if kind is bool:
            kw = {"action": argparse.BooleanOptionalAction}
        else:
            choices = {"loss": ["auto", "ss", "ce", "sampled"], "device": ["auto", "cpu", "cuda"]}.get(f.name)
            kw = {"type": kind, **({"choices": choices} if choices else {})}
        g.add_argument(
            "--" + f.name.replace("_", "-"), default=default, help=f"{_TRAIN_HELP[f.name]} (default: {default})", **kw
        )


def _train_config(args: argparse.Namespace):
    from ..config import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("side features (stored in the version with checksums, for the ranker)")
    g.add_argument(
        "--item-features",
        type=Path,
        metavar="FILE",
        help="item side features, one row per item id: RecBole .item, CSV, TSV or Parquet; categorical "
        "(multi-valued: space separated in RecBole token_seq, '|' in CSV/TSV/Parquet), numeric (quantile "
        "buckets) and text columns (kept as strings); items missing from it get unknown values",
    )
    g.add_argument(
        "--user-features",
        type=Path,
        metavar="FILE",
        help="user side features, one row per user id (e.g. RecBole .user: age, gender, occupation, zip); "
        "same formats and roles as --item-features; users missing from it get unknown values",
    )
    g.add_argument(
        "--feature-columns",
        type=_column_roles,
        default={},
        metavar="COL=ROLE,...",
        help="set feature columns' roles instead of the detected ones, e.g. movie_title=text,"
        "release_year=numeric,zip_code=drop; roles: id, categorical, multi, numeric, text, drop "
        "(detection: an id name -> id; title/name/description... -> text; RecBole float -> numeric; "
        "token_seq, lists or '|' -> multi; ..._id/code/zip -> categorical; >= 99%% numbers with > 20 distinct "
        "values -> numeric; else categorical; see the README)",
    )


def _add_privacy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "differential privacy (DP-SGD with Opacus; user-level: one clipped window per sampled user per step)"
    )
    g.add_argument(
        "--dp-epsilon",
        type=float,
        metavar="E",
        help="train the encoder with user-level DP-SGD to this epsilon for the whole run (the noise is calibrated "
        "to it; `inf`: the same loop with clipping and no noise, not private); the manifest's training.privacy "
        "records epsilon, delta, clip norm, noise multiplier and accountant, and which artifacts it does not cover. "
        "Fixed length (--dp-epochs), no early stopping; --loss ce only; max-len 0 means 50 here",
    )
    g.add_argument(
        "--dp-delta", type=float, default=0.0, metavar="D", help="delta (default: 0, meaning 1 / the number of users)"
    )
    g.add_argument(
        "--dp-max-grad-norm",
        type=float,
        default=1.0,
        metavar="C",
        help="clip each sampled user's gradient to this L2 norm (default: 1.0)",
    )
    g.add_argument(
        "--dp-epochs",
        type=int,
        default=10,
        metavar="N",
        help="expected passes over the users: steps = N / sampling rate (default: 10)",
    )
    g.add_argument(
        "--dp-batch-users",
        type=int,
        default=0,
        metavar="N",
        help="expected users per step; each user is sampled with probability N / users (Poisson) "
        "(default: 0, a quarter of the users, at most 512)",
    )
    g.add_argument(
        "--dp-lr",
        type=float,
        default=1e-2,
        metavar="LR",
        help="AdamW learning rate of DP training, in place of --lr (few noisy steps need larger ones) (default: 0.01)",
    )
    g.add_argument(
        "--dp-accountant",
        choices=["rdp", "prv"],
        default="rdp",
        help="Opacus privacy accountant that computes epsilon (default: rdp)",
    )


def _add_federated_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "federated simulation (Flower FedAvg over K clients holding disjoint users; export/federated.py)"
    )
    g.add_argument(
        "--federated",
        type=int,
        metavar="K",
        help="train the encoder by federated averaging across K simulated clients: the users are shuffled by "
        "--seed and cut into K disjoint shards, each client trains --fed-local-epochs epochs of the ordinary "
        "training step on its shard per round, and Flower's FedAvg server (grpc-bidi on 127.0.0.1, clients in "
        "threads) averages their weights weighted by their training windows; validation NDCG@10 after every "
        "round, the best round is published; the manifest's training.federated records K, rounds, local epochs "
        "and strategy. --epochs and --patience do not apply; not with --dp-epsilon, --resume or --ema-decay",
    )
    g.add_argument("--fed-rounds", type=int, default=20, metavar="R", help="federated rounds (default: 20)")
    g.add_argument(
        "--fed-local-epochs",
        type=int,
        default=1,
        metavar="E",
        help="local epochs each client trains per round (default: 1)",
    )


def _federated_config(args: argparse.Namespace):
    if args.federated is None:
        return None
    from ..federated import FederatedConfig

    if args.dp_epsilon is not None:
        raise ValueError(
            "--federated with --dp-epsilon is not available: DP-SGD trains centrally (export/dp_train.py); "
            "federated training here is not differentially private"
        )
    if args.resume:
        raise ValueError("--resume is not available with --federated (a federated run keeps no checkpoint)")
    return FederatedConfig(clients=args.federated, rounds=args.fed_rounds, local_epochs=args.fed_local_epochs)


def _privacy_config(args: argparse.Namespace, epsilon: float | None = None):
    """The --dp-* flags as a PrivacyConfig (None without --dp-epsilon); `epsilon` stands in for --dp-epsilon."""
    epsilon = args.dp_epsilon if epsilon is None else epsilon
    if epsilon is None:
        return None
    from ..config import PrivacyConfig

    return PrivacyConfig(
        epsilon=epsilon,
        delta=args.dp_delta,
        max_grad_norm=args.dp_max_grad_norm,
        epochs=args.dp_epochs,
        batch_users=args.dp_batch_users,
        accountant=args.dp_accountant,
        lr=args.dp_lr,
    )


def _column_roles(text: str) -> dict[str, str]:
    from ..data.features import parse_column_roles

    try:
        return parse_column_roles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _feature_tables(args: argparse.Namespace, split):
    """The side-feature tables of --item-features/--user-features, read before training so a bad file
    fails fast; None without them."""
    if args.item_features is None and args.user_features is None and not args.feature_columns:
        return None
    from ..data.features import feature_tables

    return feature_tables(
        split.data.item_ids[1:],
        split.data.user_ids,
        item_path=args.item_features,
        user_path=args.user_features,
        roles=args.feature_columns,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import train

    privacy = _privacy_config(args)  # ValueError on a bad --dp-* value, before the data is read
    federated = _federated_config(args)  # likewise for --federated / --fed-*
    if privacy is not None and args.resume:
        raise ValueError("--resume is not available with --dp-epsilon (a DP run is one fixed-length pass)")
    split, info = with_cold_items(args, *load_split(args))
    features = _feature_tables(args, split)
    cfg = _train_config(args)
    content = content_of(args, features, threads=cfg.threads)
    if privacy is not None:
        from ..dp_train import train_dp

        if args.ranker:
            log.warning("--dp-epsilon: the ranker is trained without differential privacy (--no-ranker leaves it out)")
        result, section = train_dp(split, cfg, privacy, progress=not args.quiet)
        log.info(
            "privacy: epsilon %s (target %s) at delta %.3g; clip norm %g, noise multiplier %.4f, %s accountant, "
            "sampling rate %.4f over %d users, %d steps; not covered: %s",
            "inf (no noise)" if section.epsilon is None else f"{section.epsilon:.3f}",
            "inf" if section.target_epsilon is None else f"{section.target_epsilon:g}",
            section.delta,
            section.max_grad_norm,
            section.noise_multiplier,
            section.accountant,
            section.sample_rate,
            section.users,
            section.steps,
            "; ".join(section.not_covered),
        )
        training = result.section(
            note="DP-SGD: fixed length, the last weights are exported (best_valid_ndcg10 is the last epoch's)",
            privacy=section,
        )
        publish_version(result.model, split, info, args, training, features=features, content=content)
        return 0
    if federated is not None:
        from ..federated import train_federated

        if args.ranker:
            log.warning("--federated: the ranker is trained centrally on every user's data (--no-ranker leaves it out)")
        result, section = train_federated(split, cfg, federated, progress=not args.quiet)
        log.info(
            "federated: best validation NDCG@10 %.4f at round %d of %d (%d clients, %d local epochs, %.0fs)",
            result.best_valid_ndcg10,
            section.best_round,
            section.rounds,
            section.clients,
            section.local_epochs,
            result.seconds,
        )
        training = result.section(
            note="federated: best_epoch is the best round; history has one entry per round", federated=section
        )
        publish_version(result.model, split, info, args, training, features=features, content=content)
        return 0
    ckpt = args.checkpoint or (Path(args.out) / args.name / ".train" / "checkpoint.pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    result = train(split, cfg, checkpoint=ckpt, resume=args.resume, fresh=args.fresh, progress=not args.quiet)
    log.info(
        "best validation NDCG@10 %.4f at epoch %d (%d epochs, %.0fs)",
        result.best_valid_ndcg10,
        result.best_epoch,
        result.epochs_run,
        result.seconds,
    )
    training = result.section(
        checkpoint=str(ckpt),
    )
    publish_version(result.model, split, info, args, training, features=features, content=content)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.out, n_users=args.users, n_items=args.items, seed=args.seed, quiet=args.quiet)


def _train(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a SASRec encoder on an interaction log (leave-one-out split, early stopping "
        "on validation NDCG@10), then export the verified ONNX encoder and a tuned FAISS index, train "
        "the second-stage ranker on their candidates (unless --no-ranker), and publish all of it "
        "as a new version of REPO_DIR/MODEL_NAME."
    )
    add_data_args(p)
    add_repo_args(p)
    p.add_argument(
        "--checkpoint", type=Path, help="training checkpoint (default: REPO_DIR/MODEL_NAME/.train/checkpoint.pt)"
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    again.add_argument(
        "--fresh",
        action="store_true",
        help="start over, overwriting the checkpoint of an earlier run (without --resume or --fresh, "
        "an existing checkpoint is refused)",
    )
    _add_feature_args(p)
    add_content_args(p)
    _add_train_args(p)
    _add_privacy_args(p)
    _add_federated_args(p)
    add_publish_args(p)
    add_ranker_args(p)
    p.set_defaults(func=cmd_train)


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("attnrec-demo"), help="working folder (default: ./attnrec-demo)")
    p.add_argument("--users", type=int, default=3000, help="synthetic users (default: 3000)")
    p.add_argument("--items", type=int, default=2000, help="synthetic items (default: 2000)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed of the data, the training and the examples (default: 0)"
    )
    p.set_defaults(func=cmd_demo)


COMMANDS = {"train": _train, "demo": _demo}
