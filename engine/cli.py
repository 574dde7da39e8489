"""`attnrec serve` and `attnrec query`, and the server-connection flags that `attnrec retrieve --server` shares.

Beside the server they drive; like the rest of engine/ they never import torch (nor the offline
half or the benchmarks), and at import time only the standard library.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from attnrec.engine.settings import from_args

    settings = from_args(args)
    if settings.worker_count > 1:
        from attnrec.engine.workers import supervise

        return supervise(settings)
    from attnrec.engine.server import serve

    return asyncio.run(serve(settings))


def add_client_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--server", required=required, metavar="HOST:PORT", help="address of a running `attnrec serve`")
    g.add_argument("--token", default=None, help="bearer token (default: $ATTNREC_AUTH_TOKEN)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--tls-ca", type=Path, help="CA bundle (PEM) that signed the server's certificate (turns TLS on)")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="client private key (PEM), for mutual TLS")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: 30)")


def connect(args: argparse.Namespace):
    """A RecommenderClient for the connection flags of `add_client_args`."""
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


def add_rerank_args(p: argparse.ArgumentParser) -> None:
    """The re-rank strengths of RecommendRequest (engine/rerank.py), shared by `query` and `retrieve`."""
    p.add_argument(
        "--diversity",
        type=float,
        default=0.0,
        metavar="0..1",
        help="re-rank for diversity: greedy maximal marginal relevance over the item embeddings, picking the "
        "top k from the ranker's candidates (stage one's n-candidates, default 200, without a ranker); "
        "0 = the answer as without it (default: 0)",
    )
    p.add_argument(
        "--popularity-calibration",
        type=float,
        default=0.0,
        metavar="0..1",
        help="re-rank toward the user's own popularity mix: the answer's share of head/mid/tail items pulled "
        "toward the history's (Jensen-Shannon divergence); 0 = unchanged (default: 0)",
    )


def cmd_query(args: argparse.Namespace) -> int:
    import grpc
    from rich.console import Console
    from rich.table import Table

    split = lambda s: [x for x in (s or "").split(",") if x]  # noqa: E731
    try:
        with connect(args) as client:
            if args.reload:
                print(json.dumps(client.reload(), indent=2))
                return 0
            if args.info:
                print(json.dumps(client.model_info(), indent=2))
                return 0
            if args.record:
                if not args.user_id:
                    raise ValueError("--record needs --user-id")
                print(json.dumps({"stored_events": client.record_events(args.user_id, split(args.record))}))
                return 0
            if args.set_unavailable or args.set_available:
                items, available = split(args.set_unavailable or args.set_available), bool(args.set_available)
                print(json.dumps(client.set_item_availability(items, available)))
                return 0
            r = client.recommend(
                split(args.history),
                args.k,
                exclude=split(args.exclude),
                n_candidates=args.n_candidates,
                timings=True,
                user_id=args.user_id,
                include_attributes=args.include_attributes,
                exclude_attributes=args.exclude_attributes,
                diversity=args.diversity,
                popularity_calibration=args.popularity_calibration,
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
    notes = [f"{r.stored_events} stored events of user {args.user_id} used"] if args.user_id else []
    notes += [f"{r.unknown_items} unknown history items skipped"] if r.unknown_items else []
    notes += ["popularity fallback (no known history item)"] if r.popularity_fallback else []
    notes += [f"{r.truncated_items} oldest items not encoded (max length)"] if r.truncated_items else []
    t = r.timings
    notes.append(
        f"server {t['total_ms']:.2f} ms (queue {t['queue_ms']:.2f}, encoder {t['encoder_ms']:.2f}, "
        f"search {t['search_ms']:.2f}, ranker {t['ranker_ms']:.2f}; batch of {t['batch_size']})"
    )
    console.print("\n".join(notes))
    return 0


def _serve(p: argparse.ArgumentParser) -> None:
    from .settings import add_arguments

    p.description = (
        "Serve a model repository's newest valid version: the attnrec.v1.Recommender API, "
        "grpc.health.v1 and server reflection, with dynamic batching, hot swap of new versions, "
        "Prometheus metrics and a graceful drain on SIGTERM/SIGINT. Every flag can also be set "
        "with an ATTNREC_<FLAG> environment variable (e.g. ATTNREC_PORT) or in a TOML --config file."
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def _query(p: argparse.ArgumentParser) -> None:
    p.description = "Call attnrec.v1.Recommender on a running server with the typed client (engine/client.py)."
    add_client_args(p)
    p.add_argument("--history", default="", help="the user's item ids, oldest first, comma-separated")
    p.add_argument("--k", type=int, default=10, help="how many items (default: 10)")
    p.add_argument("--exclude", default="", help="item ids never to return, comma-separated")
    p.add_argument("--n-candidates", type=int, default=0, help="index candidates for the ranker (0: the model's)")
    p.add_argument("--user-id", default="", help="use this user's stored history (before --history)")
    p.add_argument(
        "--include-attributes",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="only items whose attribute NAME is one of the VALUEs given for it (the version's item attributes)",
    )
    p.add_argument(
        "--exclude-attributes",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="never items whose attribute NAME is VALUE",
    )
    p.add_argument(
        "--record",
        default="",
        metavar="ITEMS",
        help="RecordEvents: append these item ids (comma-"
        "separated, oldest first) to --user-id's stored history, instead of recommending",
    )
    p.add_argument(
        "--set-unavailable",
        default="",
        metavar="ITEMS",
        help="SetItemAvailability: never return these item ids (comma-separated), on every replica",
    )
    p.add_argument(
        "--set-available",
        default="",
        metavar="ITEMS",
        help="SetItemAvailability: make these item ids (comma-separated) available again",
    )
    add_rerank_args(p)
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--info", action="store_true", help="print the serving model's info instead")
    p.add_argument(
        "--reload",
        action="store_true",
        help="ask the server to load the newest valid version now, and print which versions it refused "
        "(model control: the server needs --model-control, or --admin-token and this --token set to it)",
    )
    p.set_defaults(func=cmd_query)


COMMANDS = {"serve": _serve, "query": _query}
