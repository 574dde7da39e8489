"""The models one server holds: loading, warm-up, hot swap and repository polling.

`Host` serves one model of the repository (`--model`) as three `ServedModel`s (`encoder`,
`ranker` when the version has one, and `pipeline`, the whole request path). They share one
`LoadedVersion`. A new version is verified, loaded and warmed up beside the serving one, then
the reference is swapped; a request pins the version it started with (see `attnrec.engine.batcher`),
so requests in flight finish on the old version while new ones go to the new version.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batcher import BatchSettings
from .pipeline import Pipeline, RuntimeOptions
from .repository import ArtifactError, list_versions, newest_valid_version
from .served import NotFound, ServedModel
from .served_models import EncoderModel, PipelineModel, RankerModel
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity: the batcher groups requests by version object
class LoadedVersion:
    """A loaded, warmed-up version and its external-id maps."""

    pipeline: Pipeline
    item_keys: np.ndarray  # (n_items,) object: the external id of each row, as str
    rows_by_key: dict[str, int]
    id_type: str  # "int64" or "string"

    @classmethod
    def load(cls, path: Path, options: RuntimeOptions, *, warm_batch: int = 32) -> "LoadedVersion":
        pipeline = Pipeline.load(path, options, verify=False)  # the caller verified the checksums
        keys = np.array([str(x) for x in pipeline.item_ids.tolist()], dtype=object)
        id_type = "int64" if pipeline.item_ids.dtype.kind in "iu" else "string"
        loaded = cls(pipeline, keys, {k: i for i, k in enumerate(keys.tolist())}, id_type)
        loaded.warm_up(warm_batch)
        return loaded

    @property
    def version(self) -> int:
        return self.pipeline.version

    def warm_up(self, max_batch: int) -> None:
        """Run the request path at the shapes it will see, so first requests pay no allocation cost."""
        rng = np.random.default_rng(0)
        p = self.pipeline
        for batch, length in ((1, 1), (1, p.max_len), (max_batch, p.max_len), (max_batch, 1)):
            histories = [rng.integers(0, p.n_items, size=length) for _ in range(batch)]
            p.recommend(histories, min(10, p.n_items))


class Host:
    """`ModelHost` over one repository model (see engine/served.py)."""

    def __init__(
        self,
        repo: Path | str,
        name: str,
        *,
        options: RuntimeOptions = RuntimeOptions(),
        batching: BatchSettings = BatchSettings(),
        max_k: int = 1000,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.repo, self.name, self.options, self.batching = Path(repo), name, options, batching
        self.telemetry = telemetry or Telemetry()
        self.draining = False
        self._current: LoadedVersion | None = None
        self._listing: tuple[int, ...] | None = None  # versions present at the last (re)load attempt
        self._lock = asyncio.Lock()
        self._unloaded: set[str] = set()
        # Batches of the three models may run at once; one more thread loads new versions.
        self.executor = ThreadPoolExecutor(max_workers=3 * batching.instances + 1, thread_name_prefix="attnrec")
        args = (self, batching, self.executor, self.telemetry)
        self.encoder = EncoderModel(*args)
        self.ranker = RankerModel(*args)
        self.pipeline = PipelineModel(*args, max_k=max_k)
        self._models = {m.name: m for m in (self.encoder, self.ranker, self.pipeline)}

    # ── what the servicers see ────────────────────────────────────────────────────────────
    @property
    def current(self) -> LoadedVersion | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None and not self.draining

    def is_loaded(self, name: str) -> bool:
        return self._current is not None and name not in self._unloaded

    def models(self) -> list[ServedModel]:
        v = self._current
        return [m for m in self._models.values() if m is not self.ranker or (v is not None and v.pipeline.ranker)]

    def get(self, name: str, version: str = "") -> ServedModel:
        model = self._models.get(name)
        v = self._current
        if model is None or (model is self.ranker and v is not None and v.pipeline.ranker is None):
            known = ", ".join(m.name for m in self.models())
            raise NotFound(f"no model {name!r} on this server (it serves: {known})")
        if version and v is not None and version != str(v.version):
            raise NotFound(f"model {name!r} version {version} is not serving (version {v.version} is)")
        return model

    async def load(self, name: str) -> None:
        self.get(name)
        self._unloaded.discard(name)
        await self.reload(force=True)

    async def unload(self, name: str) -> None:
        self.get(name)
        self._unloaded.add(name)

    # ── loading and hot swap ──────────────────────────────────────────────────────────────
    async def start(self) -> None:
        """Load and warm up the newest valid version; raises ArtifactError when there is none."""
        if not await self.reload(force=True):
            if self._current is None:
                raise ArtifactError(f"no loadable version of model {self.name!r} in {self.repo}")

    async def reload(self, *, force: bool = False) -> bool:
        """Swap to the newest valid version if it differs from the serving one. Returns whether it
        swapped. Without `force`, does nothing while the repository's version folders are unchanged."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            listing = tuple(list_versions(self.repo, self.name))
            if not force and listing == self._listing:
                return False
            self._listing = listing
            cur = self._current
            try:
                path, manifest = await loop.run_in_executor(self.executor, newest_valid_version, self.repo, self.name)
            except ArtifactError as exc:
                self._refused(f"{exc}" + (f"; version {cur.version} keeps serving" if cur else ""))
                return False
            if cur is not None and manifest.version == cur.version:
                return False
            if cur is not None and manifest.version < cur.version and cur.pipeline.path.is_dir():
                self._refused(f"version {cur.version} is still present but failed verification; it keeps serving")
                return False
            try:
                loaded = await loop.run_in_executor(
                    self.executor,
                    lambda: LoadedVersion.load(path, self.options, warm_batch=self.batching.max_batch_size),
                )
            except Exception as exc:  # a broken graph or index: refuse it, keep serving
                self._refused(
                    f"{path}: failed to load: {exc}" + (f"; version {cur.version} keeps serving" if cur else "")
                )
                return False
            self._current = loaded  # the swap: one reference assignment
            self.telemetry.model_version.labels(self.name).set(loaded.version)
            self.telemetry.model_loads.labels(self.name, "loaded").inc()
            providers = ",".join(loaded.pipeline.encoder.providers)
            was = f" (was version {cur.version})" if cur else ""
            log.info("serving %s version %d from %s on %s%s", self.name, loaded.version, path, providers, was)
            return True

    def _refused(self, why: str) -> None:
        self.telemetry.model_loads.labels(self.name, "refused").inc()
        log.error("model %s: %s", self.name, why)

    async def poll(self, interval: float) -> None:
        """Check the repository every `interval` seconds and swap in new versions (run as a task)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # keep polling whatever happened
                log.exception("model %s: polling the repository failed", self.name)

    async def close(self) -> None:
        for m in self._models.values():
            await m.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
