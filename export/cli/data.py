"""`attnrec synth` and `attnrec download`, and the data arguments that train, evaluate, export and retrieve share."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..data.readers import FORMATS

log = logging.getLogger(__name__)


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument(
        "--data",
        type=Path,
        help="interaction log: CSV, TSV, Parquet, MovieLens, RecBole .inter, SASRec or S3-Rec text",
    )
    src.add_argument(
        "--dataset",
        help="download a public dataset into the cache (needs internet): "
        "ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest-small",
    )
    g.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="input format (default: detected from the file name and content; s3rec = one `user item item …` "
        "line per user, the layout of S3-Rec, CL4SRec, ICLRec and DuoRec)",
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
    _add_cache_dir(g, "download cache for --dataset")


def _add_cache_dir(p, text: str) -> None:
    p.add_argument("--cache-dir", type=Path, help=f"{text} (default: $ATTNREC_CACHE or ~/.cache/attnrec)")


def load_log(args: argparse.Namespace):
    """The interaction log named by the data arguments, k-core filtered if asked; and where it came from."""
    from ..data.filters import kcore
    from ..data.readers import read_interactions

    path, fmt = args.data, args.format
    if getattr(args, "dataset", None):
        from ..data.download import fetch_dataset

        path, fmt = fetch_dataset(args.dataset, args.cache_dir), "movielens"
    t = time.perf_counter()
    log_ = read_interactions(path, fmt, user_col=args.user_col, item_col=args.item_col, time_col=args.time_col)
    log.info("read %s interactions from %s in %.1fs", f"{len(log_):,}", path, time.perf_counter() - t)
    if args.kcore:
        log_, report = kcore(log_, args.kcore, args.kcore)
        log.info("%s", report)
    return log_, str(path)


def load_split(args: argparse.Namespace):
    """The leave-one-out split of the log, and the facts about the data that a version records."""
    from attnrec.engine.repository import DataSection

    from ..data.sequences import build_sequences, leave_one_out

    log_, source = load_log(args)
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


def synthetic_config(args: argparse.Namespace):
    """The generator settings that `add_generator_args`' flags give."""
    from ..data.synthetic import SyntheticConfig

    return SyntheticConfig(
        n_users=args.users,
        n_items=args.items,
        mean_length=args.mean_length,
        seed=args.seed,
        popularity_exponent=args.popularity_exponent,
        stay_prob=args.stay_prob,
        n_categories=args.categories,
        n_segments=args.segments,
        context_rate=args.context_rate,
        segment_effect=args.segment_effect,
        hour_effect=args.hour_effect,
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.synthetic import generate, generate_with_attributes, write, write_attributes

    cfg = synthetic_config(args)
    t = time.perf_counter()
    if cfg.n_categories:
        log_, attrs = generate_with_attributes(cfg, progress=not args.quiet)
        stem = args.out.with_suffix("")
        items = args.item_features_out or stem.with_name(stem.name + "-items.csv")
        users = args.user_features_out or stem.with_name(stem.name + "-users.csv")
        write_attributes(attrs, items, users)
        log.info("wrote item features to %s and user features to %s", items, users)
    else:
        if args.item_features_out or args.user_features_out:
            raise ValueError("--item-features-out and --user-features-out need --categories N (> 0)")
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
    from ..data.download import fetch_dataset

    print(fetch_dataset(args.name, args.cache_dir))
    return 0


def _synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output .parquet")
    add_generator_args(p)
    g = p.add_argument_group("attribute files (with --categories > 0)")
    g.add_argument(
        "--item-features-out",
        type=Path,
        help="item features CSV: item_id,category,price (default: beside --out, NAME-items.csv)",
    )
    g.add_argument(
        "--user-features-out",
        type=Path,
        help="user features CSV: user_id,segment (default: beside --out, NAME-users.csv)",
    )
    p.set_defaults(func=cmd_synth)


def add_generator_args(p: argparse.ArgumentParser) -> None:
    """The generator's flags (`attnrec synth`; benchmarks/synthetic_oracle.py regenerates a log from them)."""
    p.add_argument("--users", type=int, default=5000, help="synthetic users (default: 5000)")
    p.add_argument("--items", type=int, default=3000, help="synthetic items (default: 3000)")
    p.add_argument("--mean-length", type=float, default=30.0, help="mean interactions per user (default: 30)")
    p.add_argument(
        "--popularity-exponent",
        type=float,
        default=0.8,
        help="Zipf exponent of item popularity; lower spreads interactions over more items (default: 0.8)",
    )
    p.add_argument(
        "--stay-prob",
        type=float,
        default=0.85,
        help="chance a step stays in the current topic; lower means more topic switches, where the context "
        "(--categories) decides (default: 0.85)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated log (default: 0)")
    g = p.add_argument_group(
        "attributes and context (off unless --categories > 0; see export/data/synthetic.py): item categories "
        "and prices, user segments, and topic switches that pick a category by segment and hour of day"
    )
    g.add_argument("--categories", type=int, default=0, help="item categories, one per topic (default: 0, off)")
    g.add_argument("--segments", type=int, default=4, help="user segments (default: 4)")
    g.add_argument(
        "--context-rate",
        type=float,
        default=0.6,
        help="chance a topic switch picks its topic by category, from the user's segment and the hour (default: 0.6)",
    )
    g.add_argument(
        "--segment-effect", type=float, default=2.0, help="weight of the segment's category preferences (default: 2)"
    )
    g.add_argument(
        "--hour-effect",
        type=float,
        default=2.0,
        help="weight of the hour block's (6 h, UTC) category preferences (default: 2)",
    )


def _download(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="ml-100k, ml-1m, ml-10m, ml-20m, ml-25m or ml-latest-small")
    _add_cache_dir(p, "where the archive is kept")
    p.set_defaults(func=cmd_download)


COMMANDS = {"synth": _synth, "download": _download}
