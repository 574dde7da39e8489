"""`attnrec export`, and what it shares with `attnrec train`: the index and ranker flags and publishing a version."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from .data import add_data_args, load_split
from .evaluate import add_eval_users

_RANKER_HELP = {
    "n_candidates": "stage one's top-N that the ranker re-orders (training and serving)",
    "attend_last": "the most recent history positions each candidate attends over",
    "keys": "what candidates attend over: items (the ranker's own item embeddings) or hidden (the encoder's "
    "hidden states; the encoder then exports them)",
    "mlp_dim": "hidden size of the ranker's scoring MLP",
    "dropout": "ranker dropout",
    "samples_per_user": "training prefixes per user (the most recent positions of the training part)",
    "lr": "ranker AdamW learning rate",
    "embedding_lr_scale": "the ranker's item id embeddings' learning rate as a share of --ranker-lr (they start as "
    "the encoder's; 0 = frozen)",
    "weight_decay": "ranker AdamW weight decay",
    "batch_size": "ranker training prefixes per batch",
    "epochs": "maximum ranker epochs",
    "patience": "stop after this many epochs without a better two-stage validation NDCG@10",
    "min_gain_z": "ship the ranker only when its best epoch's validation NDCG@10 gain over stage one is at "
    "least this many standard errors of the paired per-user gain (0 = any gain); else the version ships stage "
    "one's order",
    "val_users": "validation users sampled for the ranker's early stopping (all when fewer)",
    "holdout": "leak-free samples: each user's last N training interactions, with the candidates of a second "
    "encoder trained without them (same settings); 0 = recent training prefixes with the served encoder's "
    "candidates, which it was trained on",
    "holdout_auto": "with --ranker-holdout 0: hold out each user's last training interaction (as --ranker-holdout "
    "1, a second encoder training) when the served stage one retrieves its own training targets in its top-N at "
    "least this many times as often as validation targets (it has memorised them: its samples would teach the "
    "ranker nothing); 0 = never",
    "serve_encoder": "with --ranker-holdout: publish the encoder trained on everything (full) or the hold-out one "
    "(holdout)",
    "features": "feature groups the ranker reads when the version has them, comma separated: item, user "
    "(--item-features/--user-features), time (the log's timestamps: each history item's age, the time since "
    "the previous interaction, hour of day and day of week of the request), cf (an item-item collaborative "
    "score: EASE fitted on the training interactions; catalogues up to 40,000 items), trend (the candidate's "
    "interactions in the day, week and month before the request time; needs time), or none; item features, "
    "cf and trend are baked into the ranker, user and time features are its optional inputs",
    "feature_dim": "embedding size of each side-feature (and time) column in the ranker",
    "cross_dim": "rank of a factorised cross of the item features with the user features and the request's time "
    "context (hour, day of week, time since the previous interaction), added to the ranker's score; needs the item "
    "group and the user or time group; 0 = none",
    "cf_lambda": "L2 weight of the ranker's EASE item-item model (the cf feature group); 0 = pick the best of "
    "25, 100, 400 by EASE's own validation NDCG@10",
    "cf_neighbours": "EASE weights kept per item (the strongest) in the ranker's graph (the cf feature group)",
    "wide_fit": "epoch 1 fits the ranker's wide part (log popularity, cf, trend: one linear layer) alone, to "
    "convergence, before the MLP trains; --no-ranker-wide-fit starts with the MLP",
    "feature_dropout": "share of ranker training samples scored without item, without user and without time "
    "features (each separately; and as many again without the history's timestamps only), so requests without "
    "them (no user id, no timestamps) score sensibly",
}


def add_ranker_args(p: argparse.ArgumentParser) -> None:
    from ..config import RankerConfig

    g = p.add_argument_group("second-stage ranker")
    g.add_argument(
        "--ranker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train a target-attention ranker on the encoder's FAISS candidates and ship it in the version "
        "(the encoder then also outputs its hidden states) (default: on)",
    )
    base = RankerConfig()
    for name, text in _RANKER_HELP.items():
        default = getattr(base, name)
        flag = "--ranker-" + name.replace("_", "-")
        if isinstance(default, bool):  # type=bool would read "False" as true
            g.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=f"{text} (default: {default})"
            )
            continue
        g.add_argument(flag, type=type(default), default=default, help=f"{text} (default: {default})")


def _ranker_config(args: argparse.Namespace, seed: int, threads: int):
    from ..config import RankerConfig

    if not args.ranker:
        return None
    return RankerConfig(**{n: getattr(args, "ranker_" + n) for n in _RANKER_HELP}, seed=seed, threads=threads)


def add_publish_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument(
        "--index",
        dest="index_factory",
        help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32 (default: Flat up to 50,000 items, else IVF)",
    )
    g.add_argument(
        "--export-hidden",
        action="store_true",
        help="the ONNX encoder also outputs every position's hidden state (B, L, D) for a ranker; "
        "costs the full last block per request",
    )
    g.add_argument("--recall-n", type=int, default=200, help="N of the recall@N the index is tuned for (default: 200)")
    g.add_argument(
        "--target-recall", type=float, default=0.98, help="recall@N to reach against exact search (default: 0.98)"
    )
    add_eval_users(p)


def add_repo_args(p: argparse.ArgumentParser) -> None:
    """Where a new version goes: REPO_DIR/MODEL_NAME/<next version>."""
    p.add_argument("--out", type=Path, required=True, metavar="REPO_DIR", help="model repository")
    p.add_argument("--name", required=True, metavar="MODEL_NAME", help="model name inside the repository")


def publish_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of export.publish.publish that the index, evaluation and ranker flags set."""
    return dict(
        index_factory=args.index_factory,
        recall_n=args.recall_n,
        target_recall=args.target_recall,
        eval_users=args.eval_users,
        with_hidden=args.export_hidden,
        ranker=_ranker_config(args, args.seed, args.threads),
        progress=not args.quiet,
    )


def publish_version(model, split, info, args, training, features=None, content=None) -> dict:
    """Export, evaluate and publish `model` as a new version (with a ranker unless --no-ranker, with the
    side-feature tables `features` and the content embeddings `content` if given); print its report."""
    from ..evaluate import print_report
    from ..publish import publish

    version_dir, manifest, metrics = publish(
        model,
        split,
        args.out,
        args.name,
        training=training,
        data=info,
        seed=args.seed,
        features=features,
        content=content,
        **publish_options(args),
    )
    print_report(metrics)
    idx = manifest.index
    print(
        f"published {version_dir}  (index {idx.factory} {idx.params}, recall@{idx.recall_n} "
        f"{idx.recall:.4f}; ONNX parity {manifest.encoder.parity.max_abs_diff:.1e}"
        + (f"; ranker parity {manifest.ranker.parity.max_abs_diff:.1e})" if manifest.ranker else ")")
    )
    return metrics


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from attnrec.engine.repository import TrainingSection

    from ..config import TrainConfig
    from ..model import SASRec
    from ..train import item_ids_digest
    from .content import content_of, with_cold_items
    from .train import _feature_tables

    state = torch.load(args.checkpoint, weights_only=False)
    cfg = TrainConfig(**state["train_config"])
    split, info = with_cold_items(args, *load_split(args))  # the catalogue the checkpoint was trained on
    if split.data.n_items != state["n_items"] or state.get(
        "item_ids_sha256", item_ids_digest(split.data.item_ids)
    ) != item_ids_digest(split.data.item_ids):
        raise ValueError(
            f"{args.checkpoint} was trained on another item catalogue ({state['n_items']} items) than "
            f"this data's ({split.data.n_items} items); export it with the data it was trained on"
        )
    model = SASRec(cfg.model_config(state["n_items"]))
    model.load_state_dict(state["best_state"])
    args.seed, args.threads = cfg.seed, cfg.threads
    training = TrainingSection(
        config=asdict(cfg),
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        best_valid_ndcg10=state["best"],
        history=tuple(state["history"]),
        checkpoint=str(args.checkpoint),
    )

    features = _feature_tables(args, split)
    publish_version(model, split, info, args, training, features, content_of(args, features, threads=cfg.threads))
    return 0


def _export(p: argparse.ArgumentParser) -> None:
    from .content import add_content_args
    from .train import _add_feature_args

    p.description = (
        "Export the best weights of a training checkpoint as a new repository version, "
        "training a new ranker on them unless --no-ranker: the way to add (or retrain) the ranker of an "
        "existing encoder. The data must be the data the checkpoint was trained on (for the id map, the "
        "index tuning queries, the ranker's samples and the evaluation), with the same --item-features and "
        "content flags when it was trained with them (they add the cold items to its catalogue)."
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="training checkpoint of `attnrec train` (by default REPO_DIR/MODEL_NAME/.train/checkpoint.pt)",
    )
    add_repo_args(p)
    add_data_args(p)
    _add_feature_args(p)
    add_content_args(p)
    add_publish_args(p)
    add_ranker_args(p)
    p.set_defaults(func=cmd_export)


COMMANDS = {"export": _export}
