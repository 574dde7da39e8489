"""Offline candidate retrieval: every user's top-N items to Parquet, with the serving runtime.

Runs the version's `Pipeline` (ONNX encoder, FAISS index and, with `rank`, the ranker; no
torch), so it answers what the server answers for the same version. Users stream through in
batches and each batch becomes one Parquet row group, so memory does not grow with the
number of users. The output is written under a hidden temporary name and renamed into place
when complete: a crash never leaves a file that looks finished.

With `rank`, the ranker gets what the server gives it: each user's external id (its stored user
features) and, when the log has timestamps, the history's seconds and a request time, the server's
rule with the job's clock (or `as_of`) in place of the server's: max(clock, the newest timestamp).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnrec.engine.errors import InvalidRequest
from attnrec.engine.features import load_features
from attnrec.engine.index import RowMask
from attnrec.engine.item_filter import ItemAttributes
from attnrec.engine.pipeline import Pipeline, RuntimeOptions
from attnrec.engine.ranker import OnnxRanker
from attnrec.engine.repository import ArtifactError, Manifest
from attnrec.engine.rerank import RerankOptions

from .data.sequences import SequenceData

log = logging.getLogger(__name__)


@dataclass
class RetrieveReport:
    out: Path
    users: int
    rows: int
    seconds: float
    unknown_users: list = field(default_factory=list)  # requested ids with no known interactions

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds else 0.0


def select_users(data: SequenceData, wanted: np.ndarray | None) -> tuple[np.ndarray, list]:
    """Internal indices of the requested external user ids (all users when None), and the
    requested ids that are not in the data, in request order."""
    if wanted is None:
        return np.arange(data.n_users), []
    if data.user_ids.dtype.kind in "iu":
        parsed = []
        for w in wanted.tolist():
            try:
                parsed.append(int(w))
            except ValueError:
                parsed.append(None)
        lookup = {u: i for i, u in enumerate(data.user_ids.tolist())}
        idx = [lookup.get(p) if p is not None else None for p in parsed]
    else:
        lookup = {str(u): i for i, u in enumerate(data.user_ids.tolist())}
        idx = [lookup.get(str(w)) for w in wanted.tolist()]
    unknown = [w for w, i in zip(wanted.tolist(), idx) if i is None]
    return np.array([i for i in idx if i is not None], dtype=np.int64), unknown


def history_seconds(data: SequenceData, u: int) -> np.ndarray:
    """Internal user u's history timestamps as the ranker reads them: int64 Unix seconds, floored."""
    return np.floor(data.timestamps[data.offsets[u] : data.offsets[u + 1]]).astype(np.int64)


def request_time(stamps: np.ndarray, clock: int) -> int:
    """A history's request time, the server's rule (engine/models.py): the clock, or the newest
    timestamp when that is later; 0 (unknown time) for a history without a known timestamp."""
    if not len(stamps) or int(stamps.max()) <= 0:
        return 0
    return max(int(clock), int(stamps.max()))


def ranker_reads_time(version_dir: Path, manifest: Manifest) -> bool:
    """Whether the version's ranker has time inputs (its ONNX graph says; a copied version's manifest
    may not list them). A one-thread session, so a Ray driver can ask too."""
    if manifest.files.ranker is None:
        return False
    return OnnxRanker(Path(version_dir) / manifest.files.ranker.path, intra_op_threads=1).reads_time


def job_clock(
    as_of: int | None, data: SequenceData, reads_time: bool, schema: pa.Schema
) -> tuple[int | None, pa.Schema]:
    """The clock of a job whose ranker reads time (`reads_time`: a ranked job, a time ranker): `as_of`,
    default now, fixed once so that every batch and every Ray actor ranks at the same time, and the
    schema with it in the metadata (`as_of`); (None, schema) when no ranker reads it."""
    if as_of is not None and as_of <= 0:
        raise ValueError(f"--as-of must be Unix seconds above 0, got {as_of}")
    if not (reads_time and data.timed):
        if as_of is not None:
            why = "the log has no timestamps" if reads_time else "no --rank, or the ranker has no time features"
            log.warning("--as-of is not used: %s", why)
        return None, schema
    as_of = int(time.time()) if as_of is None else int(as_of)
    return as_of, schema.with_metadata({**schema.metadata, b"as_of": str(as_of).encode()})


def read_user_file(path: Path) -> np.ndarray:
    """One user id per line; blank lines ignored."""
    return np.array([line.strip() for line in Path(path).read_text().splitlines() if line.strip()], dtype=object)


def _id_type(ids: np.ndarray) -> pa.DataType:
    return pa.int64() if ids.dtype.kind in "iu" else pa.string()


def item_mask(
    version_dir: Path, manifest: Manifest, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> RowMask | None:
    """The catalogue rows `--include-attributes` / `--exclude-attributes` keep (None: no filter), over the
    item attributes stored in the version, with the server's semantics (engine/item_filter.py)."""
    if not include and not exclude:
        return None
    attributes = ItemAttributes(load_features(version_dir, manifest).item, manifest.model.n_items)
    try:
        allowed = attributes.allowed(include, exclude)
    except InvalidRequest as exc:
        raise ValueError(f"{version_dir}: {exc}") from None
    return None if allowed is None else RowMask(allowed)


def output_schema(
    data: SequenceData,
    model: str,
    version: int,
    top_n: int,
    rank: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rerank: RerankOptions = RerankOptions(),
) -> pa.Schema:
    filters = {"include_attributes": json.dumps(list(include)), "exclude_attributes": json.dumps(list(exclude))}
    return pa.schema(
        [
            ("user_id", _id_type(data.user_ids)),
            ("rank", pa.int32()),
            ("item_id", _id_type(data.item_ids[1:])),
            ("score", pa.float32()),
            ("model_version", pa.int32()),
        ],
        metadata={
            "model": model,
            "model_version": str(version),
            "top_n": str(top_n),
            "exclude_seen": "true",
            "ranked": "true" if rank else "false",  # scores are the ranker's, not inner products
            **(filters if include or exclude else {}),
            # the order is the re-rank's (engine/rerank.py) when either is above 0; scores stay the model's
            "diversity": str(rerank.diversity),
            "popularity_calibration": str(rerank.popularity_calibration),
        },
    )


class BatchRetriever:
    """The version's pipeline, loaded once; one call = one batch of users → rows.

    Shared by the single-process job and the Ray actors, so both compute the same thing.
    With `rank`, FAISS fetches the ranker's N candidates and the ranker picks the top-n. `include` /
    `exclude`: business filters ("name=value" over the version's item attributes), applied in the search.
    With an active `rerank`, the re-rank picks the top-n from that pool (engine/rerank.py).
    The ranker reads each user's external id (user features) and, given the histories' timestamps,
    their times and a request time of max(`as_of` (None: the clock at the call), newest timestamp).
    """

    def __init__(
        self,
        version_dir: Path,
        manifest: Manifest,
        item_ids: np.ndarray,
        schema: pa.Schema,
        top_n: int,
        threads: int = 0,
        rank: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        rerank: RerankOptions = RerankOptions(),
        as_of: int | None = None,
    ) -> None:
        # The caller opened (and verified) the version: no second pass over the checksums.
        self.pipeline = Pipeline.load(version_dir, RuntimeOptions(intra_op_threads=threads), verify=False)
        if rank and self.pipeline.ranker is None:
            raise ArtifactError(f"{version_dir}: --rank needs a version with a ranker; this one has none")
        self.item_ids, self.schema, self.top_n, self.version = item_ids, schema, top_n, manifest.version
        self.rank, self.rerank, self.as_of = rank, rerank, as_of
        self.mask = item_mask(version_dir, manifest, include, exclude)

    @property
    def reads_time(self) -> bool:
        """Whether the answer depends on the histories' timestamps (a ranked job, a time ranker)."""
        return self.rank and self.pipeline.ranker is not None and self.pipeline.ranker.reads_time

    def __call__(
        self, user_ids: np.ndarray, histories: list[np.ndarray], times: list[np.ndarray] | None = None
    ) -> pa.Table:
        """histories: token arrays (catalogue row + 1), one per user. Every item of the whole
        history is excluded (Pipeline.recommend does that), not only the most recent max_len
        that the encoder reads. times: each history's int64 Unix seconds (None: the log has none)."""
        masks = None if self.mask is None else [self.mask] * len(histories)
        ranker = {}
        if self.rank:
            # The ids as strings, as evaluate and the server's user_id give them.
            ranker["user_ids"] = [str(u) for u in np.asarray(user_ids).tolist()]
            if times is not None and self.reads_time:
                clock = int(time.time()) if self.as_of is None else self.as_of
                ranker["history_times"] = times
                ranker["request_times"] = [request_time(t, clock) for t in times]
        rec = self.pipeline.recommend(
            [h - 1 for h in histories],
            self.top_n,
            rank=self.rank,
            masks=masks,
            diversity=self.rerank.diversity,
            popularity_calibration=self.rerank.popularity_calibration,
            **ranker,
        )
        found, scores = rec.rows, rec.scores
        ok = found >= 0  # a catalogue smaller than top-n + history leaves empty slots
        ranks = np.broadcast_to(np.arange(1, found.shape[1] + 1, dtype=np.int32), found.shape)
        return pa.table(
            {
                "user_id": pa.array(np.repeat(user_ids, ok.sum(axis=1)), type=self.schema.field("user_id").type),
                "rank": ranks[ok],
                "item_id": pa.array(self.item_ids[found[ok]], type=self.schema.field("item_id").type),
                "score": scores[ok].astype(np.float32),
                "model_version": np.full(int(ok.sum()), self.version, dtype=np.int32),
            },
            schema=self.schema,
        )


def plan(
    data: SequenceData,
    manifest: Manifest,
    users: np.ndarray | None,
    top_n: int,
    rank: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rerank: RerankOptions = RerankOptions(),
) -> tuple[np.ndarray, list, pa.Schema]:
    """What both job runners start from: the users to serve (unknown requested ids warned
    about) and the output schema."""
    if top_n < 1:
        raise ValueError(f"top-n must be at least 1, got {top_n}")
    chosen, unknown = select_users(data, users)
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" …" if len(unknown) > 10 else "")
        log.warning("%d requested users have no interactions with known items and get no rows: %s", len(unknown), shown)
    if rank and manifest.files.ranker is None:
        raise ArtifactError(f"{manifest.name} version {manifest.version} has no ranker: retrieve without --rank")
    schema = output_schema(data, manifest.name, manifest.version, top_n, rank, include, exclude, rerank)
    return chosen, unknown, schema


def retrieve(
    version_dir: Path,
    manifest: Manifest,
    data: SequenceData,
    out: Path,
    *,
    top_n: int = 100,
    users: np.ndarray | None = None,
    batch_size: int = 1024,
    threads: int = 0,
    rank: bool = False,
    progress: bool = True,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rerank: RerankOptions = RerankOptions(),
    as_of: int | None = None,
) -> RetrieveReport:
    """Top-`top_n` items for each user in `data` (or the external ids in `users`), seen items
    excluded, written to `out` as Parquet: user_id, rank (1-based), item_id, score, model_version.
    With `rank`, stage one's candidates re-ordered by the version's ranker (scores are the ranker's).
    `include` / `exclude`: "name=value" business filters over the version's item attributes; `rerank`:
    diversity / popularity-calibration re-rank strengths (default: none). `as_of`: the request time
    (Unix seconds) a ranker with time features sees, raised to a user's newest timestamp when that is
    later (default: the clock at the start, the server's rule); in the Parquet metadata as `as_of`.

    `data` must be built with the version's id map (build_sequences(log, item_vocab=...)).
    """
    chosen, unknown, schema = plan(data, manifest, users, top_n, rank, include, exclude, rerank)
    as_of, schema = job_clock(as_of, data, rank and ranker_reads_time(version_dir, manifest), schema)
    item_ids = np.asarray(data.item_ids[1:])
    step = BatchRetriever(
        version_dir, manifest, item_ids, schema, top_n, threads, rank, include, exclude, rerank, as_of
    )
    timed = as_of is not None  # job_clock: a timed log and a ranker that reads time
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    t0, rows = time.perf_counter(), 0
    columns = [
        TextColumn("[bold]retrieve"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    ]
    try:
        with pq.ParquetWriter(tmp, schema) as writer, Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("users", total=len(chosen), rate="")
            for s in range(0, len(chosen), batch_size):
                batch = chosen[s : s + batch_size]
                times = [history_seconds(data, u) for u in batch] if timed else None
                table = step(data.user_ids[batch], [data.sequence(u) for u in batch], times)
                writer.write_table(table)  # one row group per batch of users
                rows += table.num_rows
                bar.update(
                    task, advance=len(batch), rate=f"{(s + len(batch)) / (time.perf_counter() - t0):,.0f} users/s"
                )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    report = RetrieveReport(out, len(chosen), rows, time.perf_counter() - t0, unknown)
    log.info(
        "wrote %s rows for %s users to %s in %.1fs (%.0f users/s)",
        f"{rows:,}",
        f"{len(chosen):,}",
        out,
        report.seconds,
        report.users_per_s,
    )
    return report
