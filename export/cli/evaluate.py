"""`attnrec evaluate` and `attnrec retrieve`: a published version on an interaction log, with no torch."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from attnrec.engine.cli import add_client_args, add_rerank_args, connect

from .data import add_data_args, load_log

log = logging.getLogger(__name__)


def add_eval_users(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-users",
        type=int,
        default=0,
        metavar="N",
        help="evaluate a seeded sample of N users instead of all (for huge catalogues; default: 0, all)",
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_repo, print_report

    log_, _ = load_log(args)
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
    from attnrec.engine.rerank import RerankOptions

    from ..data.sequences import build_sequences
    from ..retrieve import read_user_file, retrieve

    users = read_user_file(args.users) if args.users else None
    rerank = RerankOptions(args.diversity, args.popularity_calibration)  # ValueError outside 0..1
    if args.server:
        from ..retrieve_server import retrieve_from_server

        if args.as_of is not None:
            raise ValueError("--as-of is not for --server: a request's time is the server's clock")
        log_, _ = load_log(args)
        with connect(args) as client:
            report = retrieve_from_server(
                client,
                build_sequences(log_),
                args.out,
                top_n=args.top_n,
                users=users,
                batch_size=args.batch_size,
                progress=not args.quiet,
                include=args.include_attributes,
                exclude=args.exclude_attributes,
                rerank=rerank,
            )
        return 3 if report.unknown_users and args.strict_users else 0
    if args.repo is None or args.name is None:
        raise ValueError("retrieve needs --repo and --name (or --server HOST:PORT)")
    from attnrec.engine.repository import resolve_version

    from ..evaluate import load_item_ids

    version_dir, manifest = resolve_version(args.repo, args.name, args.version)
    log_, _ = load_log(args)
    data = build_sequences(log_, item_vocab=load_item_ids(version_dir, manifest))
    job = dict(
        top_n=args.top_n,
        users=users,
        batch_size=args.batch_size,
        rank=args.rank,
        include=args.include_attributes,
        exclude=args.exclude_attributes,
        rerank=rerank,
        as_of=args.as_of,
    )
    if args.ray is not None:
        from ..retrieve_ray import retrieve_ray

        address = None if args.ray == "local" else args.ray
        report = retrieve_ray(version_dir, manifest, data, args.out, address=address, workers=args.workers, **job)
    else:
        report = retrieve(version_dir, manifest, data, args.out, threads=args.threads, progress=not args.quiet, **job)
    if report.unknown_users and args.strict_users:
        log.error("%d requested users were not found (--strict-users)", len(report.unknown_users))
        return 3
    return 0


def _add_version_args(p: argparse.ArgumentParser, required: bool) -> None:
    suffix = "" if required else " (not with --server)"
    p.add_argument("--repo", type=Path, required=required, metavar="REPO_DIR", help="model repository" + suffix)
    p.add_argument("--name", required=required, metavar="MODEL_NAME", help="model name" + suffix)
    p.add_argument("--version", type=int, help="version number (default: newest valid)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Evaluate the newest valid (or --version) version of a model on an interaction log, "
        "with the same leave-one-out split as training, side by side on the same users: (a) exact full "
        "ranking by the encoder, (b) FAISS top-k, (c) FAISS top-N re-ranked by the version's ranker, and "
        "stage one's recall@N. No torch needed."
    )
    _add_version_args(p, required=True)
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the metrics as JSON")
    _add_threads(p)
    p.add_argument(
        "--candidates",
        type=int,
        metavar="N",
        help="stage one's top-N for the ranked row and the recall of stage one (default: the version's, else 200)",
    )
    add_eval_users(p)
    add_data_args(p)
    p.set_defaults(func=cmd_evaluate)


def _retrieve(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Offline candidate retrieval with a repository version's ONNX encoder and FAISS "
        "index (and its ranker with --rank): for every user of the interaction log (or those in --users), the top-N "
        "items not yet seen, from the user's whole history, written to Parquet "
        "(user_id, rank, item_id, score, model_version). Streams users in batches; the "
        "output file appears only when complete. With --server, the same job through a running "
        "`attnrec serve` (RecommendStream) instead of a local repository."
    )
    _add_version_args(p, required=False)
    p.add_argument(
        "--out", type=Path, required=True, metavar="OUT.parquet", help="the Parquet file (a folder with --ray)"
    )
    p.add_argument("--top-n", type=int, default=100, help="candidates per user (default: 100)")
    p.add_argument(
        "--rank",
        action="store_true",
        help="re-order stage one's top-N (the version's n_candidates) with the version's ranker and keep the "
        "top-n: what the server answers (default: retrieval only, FAISS order and inner-product scores)",
    )
    p.add_argument(
        "--as-of",
        type=int,
        metavar="SECONDS",
        help="with --rank and a ranker with time features: the request time, in Unix seconds, from which "
        "the history's ages, hour and day of week are computed (a user whose newest timestamp is later gets "
        "that one, the server's rule); give it when backfilling an old log, which the clock would make "
        "decades old (default: the job's clock at its start; not with --server, whose clock it is)",
    )
    add_rerank_args(p)
    p.add_argument("--users", type=Path, metavar="FILE", help="only these users: one external user id per line")
    p.add_argument(
        "--include-attributes",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="only items whose attribute NAME (from the version's --item-features) is one of the VALUEs given "
        "for it, for every NAME given (a multi-valued attribute: any of its values); repeatable",
    )
    p.add_argument(
        "--exclude-attributes",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="never items whose attribute NAME is VALUE; repeatable. Both filters run inside the index "
        "search, so every user still gets top-n items when enough pass (as the server's Recommend)",
    )
    p.add_argument(
        "--strict-users",
        action="store_true",
        help="exit with status 3 when a user in --users is not in the data (default: warn and go on)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1024, help="users per batch and per Parquet row group (default: 1024)"
    )
    _add_threads(p)
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
    add_data_args(p)
    add_client_args(p, required=False)
    p.set_defaults(func=cmd_retrieve)


COMMANDS = {"evaluate": _evaluate, "retrieve": _retrieve}
