"""`attnrec retrieve --ray`: the same job as a Ray Data pipeline, for more users than one machine serves.

Each Ray actor loads the version's pipeline (ONNX encoder, FAISS index, ranker) once (from the repository
path, which every node must see) and runs the very `BatchRetriever` of the single-process
job on its batches, so both give the same rows. In a ranked job on a timed log whose ranker reads time,
each user's history timestamps travel beside the history (a `history_timestamps` list<int64> column)
and the driver fixes the request time once (`as_of`, default its clock), so every actor ranks at the
same time. Ray is an optional extra: `attnrec[ray]`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnrec.engine.repository import Manifest, open_version
from attnrec.engine.rerank import RerankOptions

from .data.sequences import SequenceData
from .retrieve import BatchRetriever, RetrieveReport, history_seconds, item_mask, job_clock, plan, ranker_reads_time

log = logging.getLogger(__name__)


class _Actor:
    """A Ray Data callable class: constructed once per actor, called per batch."""

    def __init__(
        self,
        version_dir: str,
        item_ids: np.ndarray,
        schema: pa.Schema,
        top_n: int,
        rank: bool,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        rerank: RerankOptions = RerankOptions(),
        as_of: int | None = None,
    ) -> None:
        manifest = open_version(version_dir, verify=False)  # the driver verified the checksums
        # One ORT thread per actor: Ray gives each actor one CPU. The filters travel as strings (a FAISS
        # selector does not pickle) and each actor builds its own mask.
        self.step = BatchRetriever(
            Path(version_dir),
            manifest,
            item_ids,
            schema,
            top_n,
            threads=1,
            rank=rank,
            include=include,
            exclude=exclude,
            rerank=rerank,
            as_of=as_of,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = _lists(batch.column("history"))
        times = _lists(batch.column("history_timestamps")) if "history_timestamps" in batch.column_names else None
        user_ids = batch.column("user_id").to_numpy(zero_copy_only=False)
        return self.step(user_ids, histories, times)


def _lists(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A list<int64> column as one numpy array per row."""
    arr = column.combine_chunks()
    offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def _list_column(parts: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def retrieve_ray(
    version_dir: Path,
    manifest: Manifest,
    data: SequenceData,
    out: Path,
    *,
    top_n: int = 100,
    users: np.ndarray | None = None,
    batch_size: int = 1024,
    address: str | None = None,
    workers: int = 2,
    rank: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rerank: RerankOptions = RerankOptions(),
    as_of: int | None = None,
) -> RetrieveReport:
    """Write a Parquet dataset (a folder of files) at `out`; it appears only when complete.
    `as_of`: as in `retrieve` (default: the driver's clock when the job starts)."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--ray needs Ray: pip install 'attnrec[ray]'") from exc
    chosen, unknown, schema = plan(data, manifest, users, top_n, rank, include, exclude, rerank)
    item_mask(version_dir, manifest, include, exclude)  # a bad filter stops here, before Ray starts
    reads_time = rank and ranker_reads_time(version_dir, manifest)
    as_of, schema = job_clock(as_of, data, reads_time, schema)
    columns = {
        "user_id": pa.array(data.user_ids[chosen], type=schema.field("user_id").type),
        "history": _list_column([data.sequence(u) for u in chosen]),
    }
    if data.timed and reads_time:
        columns["history_timestamps"] = _list_column([history_seconds(data, u) for u in chosen])
    table = pa.table(columns)

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else workers, log_to_driver=False)
    t0 = time.perf_counter()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        # One input block per batch, so every actor gets work from the start.
        blocks = [table.slice(i, batch_size) for i in range(0, max(table.num_rows, 1), batch_size)]
        ds = ray.data.from_arrow(blocks).map_batches(
            _Actor,
            fn_constructor_kwargs={
                "version_dir": str(version_dir),
                "item_ids": np.asarray(data.item_ids[1:]),
                "schema": schema,
                "top_n": top_n,
                "rank": rank,
                "include": tuple(include),
                "exclude": tuple(exclude),
                "rerank": rerank,
                "as_of": as_of,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=workers,
            num_cpus=1,
        )
        ds.write_parquet(str(tmp))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
        old = None
        if out.exists():  # swap the new dataset in, then drop the old one
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if started_here:
            ray.shutdown()
    report = RetrieveReport(out, len(chosen), rows, time.perf_counter() - t0, unknown)
    log.info(
        "Ray: wrote %s rows for %s users to %s in %.1fs (%.0f users/s)",
        f"{rows:,}",
        f"{len(chosen):,}",
        out,
        report.seconds,
        report.users_per_s,
    )
    return report
