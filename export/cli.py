"""The `attnrec` command line.

Subcommands import what they need when they run, so `attnrec --help` and the serving
commands never load torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

log = logging.getLogger("attnrec")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise


# ── data arguments shared by train / evaluate / export ─────────────────────────────────────
def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument(
        "--data", type=Path, help="interaction log: CSV, TSV, Parquet, MovieLens, RecBole .inter or SASRec text"
    )
    src.add_argument(
        "--dataset",
        help="download a public dataset into the cache (needs internet): "
        "ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest-small",
    )
    g.add_argument(
        "--format",
        default="auto",
        choices=["auto", "csv", "tsv", "parquet", "movielens", "recbole", "sasrec"],
        help="input format (default: detected from the file name and content)",
    )
    g.add_argument("--user-col", help="user id column (default: detected, e.g. user_id / userId)")
    g.add_argument("--item-col", help="item id column (default: detected, e.g. item_id / movieId)")
    g.add_argument("--time-col", help="timestamp column (default: detected; without one, file order is time order)")
    g.add_argument(
        "--kcore",
        type=int,
        default=0,
        metavar="K",
        help="keep only users and items with at least K interactions, iteratively (default: 0, off)",
    )
    g.add_argument(
        "--cache-dir", type=Path, help="download cache for --dataset (default: $ATTNREC_CACHE or ~/.cache/attnrec)"
    )


def _load_log(args: argparse.Namespace):
    from .data.filters import kcore
    from .data.readers import read_interactions

    path, fmt = args.data, args.format
    if getattr(args, "dataset", None):
        from .data.download import fetch_dataset

        path, fmt = fetch_dataset(args.dataset, args.cache_dir), "movielens"
    t = time.perf_counter()
    log_ = read_interactions(path, fmt, user_col=args.user_col, item_col=args.item_col, time_col=args.time_col)
    log.info("read %s interactions from %s in %.1fs", f"{len(log_):,}", path, time.perf_counter() - t)
    if args.kcore:
        log_, report = kcore(log_, args.kcore, args.kcore)
        log.info("%s", report)
    return log_, str(path)


def _load_split(args: argparse.Namespace):
    from attnrec.engine.repository import DataSection

    from .data.sequences import build_sequences, leave_one_out

    log_, source = _load_log(args)
    data = build_sequences(log_)
    split = leave_one_out(data)
    info = DataSection(
        source=source,
        format=args.format,
        interactions=int(len(data.items)),
        users=data.n_users,
        items=data.n_items,
        kcore=args.kcore,
    )
    log.info(
        "%d users, %d items, %s interactions; %d evaluated users",
        data.n_users,
        data.n_items,
        f"{len(data.items):,}",
        len(split.test),
    )
    return split, info


# ── training arguments (one flag per TrainConfig field) ───────────────────────────────────
_TRAIN_HELP = {
    "max_len": "longest history the model reads (older items are dropped)",
    "dim": "embedding and hidden size",
    "n_blocks": "transformer blocks",
    "n_heads": "attention heads",
    "ffn_dim": "feed-forward inner size",
    "dropout": "dropout rate",
    "loss": "ce: full softmax over the catalogue; sampled: shared sampled negatives (huge catalogues)",
    "mask_seen": "with --loss ce, leave items already in the history out of the softmax, as evaluation does",
    "n_negatives": "negatives per batch for --loss sampled",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "batch_size": "training windows per batch",
    "epochs": "maximum epochs",
    "ema_decay": "if > 0, validate and export an exponential moving average of the weights (e.g. 0.99)",
    "patience": "stop after this many epochs without a better validation NDCG@10",
    "val_users": "validation users sampled for early stopping (all when fewer)",
    "time_budget_s": "stop training after this many seconds (0: no limit)",
    "threads": "torch CPU threads (0: torch's default)",
    "seed": "random seed (data order, initialisation, sampling)",
}


def _add_train_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    from .config import TrainConfig

    g = p.add_argument_group("model and training")
    base = TrainConfig()
    for f in fields(TrainConfig):
        default = (defaults or {}).get(f.name, getattr(base, f.name))
        kind = type(getattr(base, f.name))
        if kind is bool:
            kw = {"action": argparse.BooleanOptionalAction}
        else:
            kw = {"type": kind, **({"choices": ["ce", "sampled"]} if f.name == "loss" else {})}
        g.add_argument(
            "--" + f.name.replace("_", "-"), default=default, help=f"{_TRAIN_HELP[f.name]} (default: {default})", **kw
        )


_RANKER_HELP = {
    "n_candidates": "stage one's top-N that the ranker re-orders (training and serving)",
    "attend_last": "the most recent history positions each candidate attends over",
    "keys": "what candidates attend over: items (the ranker's own item embeddings) or hidden (the encoder's "
    "hidden states; the encoder then exports them)",
    "mlp_dim": "hidden size of the ranker's scoring MLP",
    "dropout": "ranker dropout",
    "samples_per_user": "training prefixes per user (the most recent positions of the training part)",
    "lr": "ranker AdamW learning rate",
    "weight_decay": "ranker AdamW weight decay",
    "batch_size": "ranker training prefixes per batch",
    "epochs": "maximum ranker epochs",
    "patience": "stop after this many epochs without a better two-stage validation NDCG@10",
    "val_users": "validation users sampled for the ranker's early stopping (all when fewer)",
}


def _add_ranker_args(p: argparse.ArgumentParser) -> None:
    from .config import RankerConfig

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
        g.add_argument(
            "--ranker-" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{text} (default: {default})",
        )


def _ranker_config(args: argparse.Namespace, seed: int, threads: int):
    from .config import RankerConfig

    if not args.ranker:
        return None
    return RankerConfig(**{n: getattr(args, "ranker_" + n) for n in _RANKER_HELP}, seed=seed, threads=threads)


def _train_config(args: argparse.Namespace):
    from .config import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _add_publish_args(p: argparse.ArgumentParser) -> None:
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
    _add_eval_users(p)


def _add_eval_users(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-users",
        type=int,
        default=0,
        metavar="N",
        help="evaluate a seeded sample of N users instead of all (for huge catalogues; default: 0, all)",
    )


def _publish(model, split, info, args, training) -> dict:
    from .evaluate import print_report
    from .publish import publish

    version_dir, manifest, metrics = publish(
        model,
        split,
        args.out,
        args.name,
        training=training,
        data=info,
        index_factory=args.index_factory,
        recall_n=args.recall_n,
        target_recall=args.target_recall,
        eval_users=args.eval_users,
        with_hidden=args.export_hidden,
        ranker=_ranker_config(args, args.seed, args.threads),
        seed=args.seed,
        progress=not args.quiet,
    )
    print_report(metrics)
    idx = manifest.index
    print(
        f"published {version_dir}  (index {idx.factory} {idx.params}, recall@{idx.recall_n} "
        f"{idx.recall:.4f}; ONNX parity {manifest.encoder.parity.max_abs_diff:.1e}"
        + (f"; ranker parity {manifest.ranker.parity.max_abs_diff:.1e})" if manifest.ranker else ")")
    )
    return metrics


def cmd_train(args: argparse.Namespace) -> int:
    from attnrec.engine.repository import TrainingSection

    from .train import train

    split, info = _load_split(args)
    cfg = _train_config(args)
    ckpt = args.checkpoint or (Path(args.out) / args.name / ".train" / "checkpoint.pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    result = train(split, cfg, checkpoint=ckpt, resume=args.resume, progress=not args.quiet)
    log.info(
        "best validation NDCG@10 %.4f at epoch %d (%d epochs, %.0fs)",
        result.best_valid_ndcg10,
        result.best_epoch,
        result.epochs_run,
        result.seconds,
    )
    training = TrainingSection(
        config=asdict(cfg),
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        train_seconds=result.seconds,
        best_valid_ndcg10=result.best_valid_ndcg10,
        history=tuple(result.history),
        checkpoint=str(ckpt),
    )
    _publish(result.model, split, info, args, training)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from attnrec.engine.repository import TrainingSection

    from .config import TrainConfig
    from .model import SASRec
    from .train import item_ids_digest

    state = torch.load(args.checkpoint, weights_only=False)
    cfg = TrainConfig(**state["train_config"])
    split, info = _load_split(args)
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
    _publish(model, split, info, args, training)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_repo, print_report

    log_, _ = _load_log(args)
    result = evaluate_repo(
        args.repo,
        args.name,
        log_,
        version=args.version,
        threads=args.threads,
        max_users=args.eval_users,
        n_candidates=args.candidates,
        progress=not args.quiet,
    )
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", args.json)
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from .data.sequences import build_sequences
    from .retrieve import read_user_file, retrieve

    users = read_user_file(args.users) if args.users else None
    if args.server:
        from .retrieve_server import retrieve_from_server

        log_, _ = _load_log(args)
        with _client(args) as client:
            report = retrieve_from_server(
                client,
                build_sequences(log_),
                args.out,
                top_n=args.top_n,
                users=users,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
        return 3 if report.unknown_users and args.strict_users else 0
    if args.repo is None or args.name is None:
        raise ValueError("retrieve needs --repo and --name (or --server HOST:PORT)")
    from attnrec.engine.repository import resolve_version

    from .evaluate import load_item_ids

    version_dir, manifest = resolve_version(args.repo, args.name, args.version)
    log_, _ = _load_log(args)
    data = build_sequences(log_, item_vocab=load_item_ids(version_dir, manifest))
    if args.ray is not None:
        from .retrieve_ray import retrieve_ray

        report = retrieve_ray(
            version_dir,
            manifest,
            data,
            args.out,
            top_n=args.top_n,
            users=users,
            batch_size=args.batch_size,
            address=None if args.ray == "local" else args.ray,
            workers=args.workers,
            rank=args.rank,
        )
    else:
        report = retrieve(
            version_dir,
            manifest,
            data,
            args.out,
            top_n=args.top_n,
            users=users,
            batch_size=args.batch_size,
            threads=args.threads,
            rank=args.rank,
            progress=not args.quiet,
        )
    if report.unknown_users and args.strict_users:
        log.error("%d requested users were not found (--strict-users)", len(report.unknown_users))
        return 3
    return 0


# ── serving (never imports torch) ─────────────────────────────────────────────────────────
def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from attnrec.engine.server import serve
    from attnrec.engine.settings import from_args

    return asyncio.run(serve(from_args(args)))


def _add_client_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--server", required=required, metavar="HOST:PORT", help="address of a running `attnrec serve`")
    g.add_argument("--token", default=None, help="bearer token (default: $ATTNREC_AUTH_TOKEN)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--tls-ca", type=Path, help="CA bundle (PEM) that signed the server's certificate (turns TLS on)")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="client private key (PEM), for mutual TLS")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: 30)")


def _client(args: argparse.Namespace):
    import os

    from attnrec.engine.client import RecommenderClient

    token = args.token if args.token is not None else os.environ.get("ATTNREC_AUTH_TOKEN", "")
    return RecommenderClient(
        args.server,
        token=token,
        timeout=args.timeout,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def cmd_query(args: argparse.Namespace) -> int:
    import grpc
    from rich.console import Console
    from rich.table import Table

    split = lambda s: [x for x in (s or "").split(",") if x]  # noqa: E731
    try:
        with _client(args) as client:
            if args.reload:
                print(json.dumps(client.reload(), indent=2))
                return 0
            if args.info:
                print(json.dumps(client.model_info(), indent=2))
                return 0
            r = client.recommend(
                split(args.history), args.k, exclude=split(args.exclude), n_candidates=args.n_candidates, timings=True
            )
    except grpc.RpcError as exc:
        log.error("%s: %s", exc.code().name, exc.details())
        return 1
    if args.json:
        print(json.dumps(asdict(r), indent=2))
        return 0
    table = Table(title=f"{r.model} v{r.version}: top {len(r.items)}")
    table.add_column("rank", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    for i, (item, score) in enumerate(zip(r.items, r.scores), 1):
        table.add_row(str(i), item, f"{score:.4f}")
    console = Console()
    console.print(table)
    notes = [f"{r.unknown_items} unknown history items skipped"] if r.unknown_items else []
    notes += ["popularity fallback (no known history item)"] if r.popularity_fallback else []
    notes += [f"{r.truncated_items} oldest items not encoded (max length)"] if r.truncated_items else []
    t = r.timings
    notes.append(
        f"server {t['total_ms']:.2f} ms (queue {t['queue_ms']:.2f}, encoder {t['encoder_ms']:.2f}, "
        f"search {t['search_ms']:.2f}, ranker {t['ranker_ms']:.2f}; batch of {t['batch_size']})"
    )
    console.print("\n".join(notes))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SyntheticConfig, generate, write

    cfg = SyntheticConfig(
        n_users=args.users,
        n_items=args.items,
        mean_length=args.mean_length,
        seed=args.seed,
        popularity_exponent=args.popularity_exponent,
    )
    t = time.perf_counter()
    log_ = generate(cfg, progress=not args.quiet)
    write(log_, args.out)
    log.info(
        "wrote %s interactions (%d users, %d items) to %s in %.1fs",
        f"{len(log_):,}",
        args.users,
        args.items,
        args.out,
        time.perf_counter() - t,
    )
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .data.download import fetch_dataset

    print(fetch_dataset(args.name, args.cache_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, n_users=args.users, n_items=args.items, seed=args.seed, quiet=args.quiet)


def cmd_bench(args: argparse.Namespace) -> int:
    from attnrec.benchmarks.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnrec",
        description="attnrec: train, export, evaluate and serve attention-based recommenders "
        "(SASRec + FAISS + onnxruntime).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train SASRec (+ ranker), evaluate, export ONNX + FAISS index as a new repository version",
        description="Train a SASRec encoder on an interaction log (leave-one-out split, early stopping "
        "on validation NDCG@10), then export the verified ONNX encoder and a tuned FAISS index, train "
        "the second-stage ranker on their candidates (unless --no-ranker), and publish all of it "
        "as a new version of REPO_DIR/MODEL_NAME.",
    )
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="REPO_DIR", help="model repository")
    p.add_argument("--name", required=True, metavar="MODEL_NAME", help="model name inside the repository")
    p.add_argument(
        "--checkpoint", type=Path, help="training checkpoint (default: REPO_DIR/MODEL_NAME/.train/checkpoint.pt)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    _add_train_args(p)
    _add_publish_args(p)
    _add_ranker_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a repository version: exact ranking, FAISS top-k, FAISS top-N + ranker",
        description="Evaluate the newest valid (or --version) version of a model on an interaction log, "
        "with the same leave-one-out split as training, side by side on the same users: (a) exact full "
        "ranking by the encoder, (b) FAISS top-k, (c) FAISS top-N re-ranked by the version's ranker, and "
        "stage one's recall@N. No torch needed.",
    )
    p.add_argument("--repo", type=Path, required=True, metavar="REPO_DIR")
    p.add_argument("--name", required=True, metavar="MODEL_NAME")
    p.add_argument("--version", type=int, help="version number (default: newest valid)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the metrics as JSON")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument(
        "--candidates",
        type=int,
        metavar="N",
        help="stage one's top-N for the ranked row and the recall of stage one (default: the version's, else 200)",
    )
    _add_eval_users(p)
    _add_data_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="export a training checkpoint (ONNX + FAISS index + ranker) as a new version",
        description="Export the best weights of a training checkpoint as a new repository version, "
        "training a new ranker on them unless --no-ranker: the way to add (or retrain) the ranker of an "
        "existing encoder. The data must be the data the checkpoint was trained on (for the id map, the "
        "index tuning queries, the ranker's samples and the evaluation).",
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="REPO_DIR")
    p.add_argument("--name", required=True, metavar="MODEL_NAME")
    _add_data_args(p)
    _add_publish_args(p)
    _add_ranker_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "retrieve",
        help="every user's top-N items to Parquet (ONNX + FAISS [+ ranker with --rank], no torch)",
        description="Offline candidate retrieval with a repository version's ONNX encoder and FAISS "
        "index (and its ranker with --rank): for every user of the interaction log (or those in --users), the top-N "
        "items not yet seen, from the user's whole history, written to Parquet "
        "(user_id, rank, item_id, score, model_version). Streams users in batches; the "
        "output file appears only when complete. With --server, the same job through a running "
        "`attnrec serve` (RecommendStream) instead of a local repository.",
    )
    p.add_argument("--repo", type=Path, metavar="REPO_DIR", help="model repository (not with --server)")
    p.add_argument("--name", metavar="MODEL_NAME", help="model name (not with --server)")
    p.add_argument("--version", type=int, help="version number (default: newest valid)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.parquet")
    p.add_argument("--top-n", type=int, default=100, help="candidates per user (default: 100)")
    p.add_argument(
        "--rank",
        action="store_true",
        help="re-order stage one's top-N (the version's n_candidates) with the version's ranker and keep the "
        "top-n: what the server answers (default: retrieval only, FAISS order and inner-product scores)",
    )
    p.add_argument("--users", type=Path, metavar="FILE", help="only these users: one external user id per line")
    p.add_argument(
        "--strict-users",
        action="store_true",
        help="exit with status 3 when a user in --users is not in the data (default: warn and go on)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1024, help="users per batch and per Parquet row group (default: 1024)"
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run as a Ray Data pipeline and write a Parquet dataset (a folder) at --out: on a new local "
        "Ray instance, or on the cluster at ADDRESS (e.g. ray://head:10001 or auto); needs attnrec[ray] "
        "and a repository path every node can read",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="Ray actors, one CPU each, each loading the model once (default: 2)"
    )
    _add_data_args(p)
    _add_client_args(p, required=False)
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser(
        "serve",
        help="serve the newest valid version of a repository model over gRPC (no torch)",
        description="Serve a model repository's newest valid version: the attnrec.v1.Recommender API, "
        "grpc.health.v1 and server reflection, with dynamic batching, hot swap of new versions, "
        "Prometheus metrics and a graceful drain on SIGTERM/SIGINT. Every flag can also be set "
        "with an ATTNREC_<FLAG> environment variable (e.g. ATTNREC_PORT) or in a TOML --config file.",
    )
    from attnrec.engine.settings import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "query",
        help="ask a running server for one user's recommendations (or its model info)",
        description="Call attnrec.v1.Recommender on a running server with the typed client (engine/client.py).",
    )
    _add_client_args(p)
    p.add_argument("--history", default="", help="the user's item ids, oldest first, comma-separated")
    p.add_argument("--k", type=int, default=10, help="how many items (default: 10)")
    p.add_argument("--exclude", default="", help="item ids never to return, comma-separated")
    p.add_argument("--n-candidates", type=int, default=0, help="index candidates for the ranker (0: the model's)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--info", action="store_true", help="print the serving model's info instead")
    p.add_argument("--reload", action="store_true", help="ask the server to load the newest valid version now")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("demo", help="synthetic data → train → evaluate → export → example recommendations (~2 min)")
    p.add_argument("--out", type=Path, default=Path("attnrec-demo"), help="working folder (default: ./attnrec-demo)")
    p.add_argument("--users", type=int, default=3000, help="synthetic users (default: 3000)")
    p.add_argument("--items", type=int, default=2000, help="synthetic items (default: 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write a synthetic interaction log (Parquet) with sequential structure")
    p.add_argument("--out", type=Path, required=True, help="output .parquet")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--mean-length", type=float, default=30.0, help="mean interactions per user (default: 30)")
    p.add_argument(
        "--popularity-exponent",
        type=float,
        default=0.8,
        help="Zipf exponent of item popularity; lower spreads interactions over more items (default: 0.8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "bench",
        help="benchmark suite: per-stage latency and throughput as JSON, Markdown and PNG (see README)",
        description="Run the benchmark stages (model: torch vs onnxruntime; retrieval: exact vs IVF/HNSW; ...) "
        "with warm-up, fixed windows and repeated points, and write bench-<stage>-<date>.{json,md,png}. "
        "Same as `python -m benchmarks`.",
    )
    from attnrec.benchmarks.cli import add_arguments as add_bench_arguments  # stdlib only at import time

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("download", help="download a public dataset into the cache and print the ratings file's path")
    p.add_argument("name", help="ml-100k, ml-1m, ml-10m, ml-20m, ml-25m or ml-latest-small")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # one clear line for expected failures; a traceback with -v
        from attnrec.engine.repository import ArtifactError

        from .data.log import DataError

        if isinstance(exc, (DataError, ArtifactError, FileNotFoundError, ValueError)) and not args.verbose:
            log.error("%s", exc)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
