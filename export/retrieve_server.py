"""Offline candidate retrieval through a running server's `RecommendStream` (for gRPC-only clients).

Writes the Parquet that `attnrec.export.retrieve` writes (user_id, rank, item_id, score, model_version;
one row group per batch of users; renamed into place when complete) from the server's answers:
each user's whole history goes out as external item ids, k = top-n, and the server excludes the
history and encodes its most recent max-length items, exactly as the single-process job does.
Users none of whose items the serving version knows get no rows (the single-process job never
sees them either); they are reported like unknown users. When the log has timestamps, each request
carries the history's (`history_timestamps`, Unix seconds, floored), so a ranker with time features
gets them; the request time is then the server's clock (or the newest timestamp). No `user_id` goes
out: on a server it names a stored history (refused without a history store), so a ranker's user
features see every user as unknown here.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnrec.engine.client import RecommenderClient, request
from attnrec.engine.rerank import RerankOptions

from .data.sequences import SequenceData
from .retrieve import RetrieveReport, history_seconds, output_schema, select_users

log = logging.getLogger(__name__)


def retrieve_from_server(
    client: RecommenderClient,
    data: SequenceData,
    out: Path,
    *,
    top_n: int = 100,
    users: np.ndarray | None = None,
    batch_size: int = 1024,
    progress: bool = True,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rerank: RerankOptions = RerankOptions(),
) -> RetrieveReport:
    """Top-`top_n` unseen items of each user of `data` (or of the external ids in `users`) from the
    server behind `client`, to Parquet at `out`. `data` is built from the log with its own id map.
    `include` / `exclude`: the requests' business filters (the server also leaves out unavailable items);
    `rerank`: the requests' diversity / popularity_calibration."""
    if top_n < 1:
        raise ValueError(f"top-n must be at least 1, got {top_n}")
    info = client.model_info()
    chosen, unknown = select_users(data, users)
    schema = output_schema(data, info["model"], info["version"], top_n, info["has_ranker"], include, exclude, rerank)
    item_type = schema.field("item_id").type
    parse = int if pa.types.is_integer(item_type) else str

    def requests() -> Iterator:
        for n, u in enumerate(chosen):
            history = data.item_ids[data.sequence(u)].tolist()
            stamps = history_seconds(data, u).tolist() if data.timed else ()
            yield request(
                history,
                top_n,
                request_id=str(n),
                include_attributes=include,
                exclude_attributes=exclude,
                diversity=rerank.diversity,
                popularity_calibration=rerank.popularity_calibration,
                history_timestamps=stamps,
            )

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    t0, rows, no_known = time.perf_counter(), 0, []
    columns = [TextColumn("[bold]retrieve (server)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    cols: dict[str, list] = {name: [] for name in schema.names}

    def flush(writer: pq.ParquetWriter) -> int:
        table = pa.table(cols, schema=schema)
        writer.write_table(table)  # one row group per batch of users
        for c in cols.values():
            c.clear()
        return table.num_rows

    try:
        with pq.ParquetWriter(tmp, schema) as writer, Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("users", total=len(chosen))
            for n, reply in enumerate(client.recommend_stream(requests())):
                user = data.user_ids[chosen[n]]
                if reply.error is not None:
                    raise RuntimeError(f"user {user}: server error {reply.error[0]}: {reply.error[1]}")
                if reply.popularity_fallback:
                    no_known.append(user)
                else:
                    cols["user_id"] += [user] * len(reply.items)
                    cols["rank"] += list(range(1, len(reply.items) + 1))
                    cols["item_id"] += [parse(x) for x in reply.items]
                    cols["score"] += reply.scores
                    cols["model_version"] += [reply.version] * len(reply.items)
                if (n + 1) % batch_size == 0 or n + 1 == len(chosen):
                    rows += flush(writer)
                bar.update(task, advance=1)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if no_known:
        log.warning("%d users have no item the serving version knows and get no rows", len(no_known))
    report = RetrieveReport(out, len(chosen) - len(no_known), rows, time.perf_counter() - t0, unknown + no_known)
    log.info("wrote %s rows for %s users to %s in %.1fs", f"{rows:,}", f"{report.users:,}", out, report.seconds)
    return report
