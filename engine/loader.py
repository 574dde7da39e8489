"""Loading what a server serves: repository polling, verification, load and warm-up, hot swap,
and KServe's load/unload/reload.

`ModelLoader` serves one model of the repository (`--model`) through a `ModelRegistry`
(engine/models.py): it writes the registry's `VersionSlot`, the models only read it. A new
version is verified, loaded and warmed up beside the serving one, then the slot's reference is
swapped; a request pins the version it started with (see engine/batcher.py), so requests in
flight finish on the old version while new ones go to the new version.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from .features import load_features
from .item_filter import ItemAttributes, ItemFilters
from .models import LoadedVersion, ModelRegistry
from .pipeline import Pipeline, RuntimeOptions
from .repository import ArtifactError, list_versions, newest_valid_version

log = logging.getLogger(__name__)


def load_version(path: Path, options: RuntimeOptions, *, warm_batch: int = 32) -> LoadedVersion:
    """Load a verified version folder, map its external ids, read its item attributes (for request
    filters), and warm it up."""
    pipeline = Pipeline.load(path, options, verify=False)  # the caller verified the checksums
    keys = np.array([str(x) for x in pipeline.item_ids.tolist()], dtype=object)
    id_type = "int64" if pipeline.item_ids.dtype.kind in "iu" else "string"
    rows_by_key = {k: i for i, k in enumerate(keys.tolist())}
    attributes = ItemAttributes(load_features(path, pipeline.manifest).item, pipeline.n_items)
    loaded = LoadedVersion(
        pipeline,
        pipeline.version,
        pipeline.n_items,
        pipeline.max_len,
        keys,
        rows_by_key,
        id_type,
        ItemFilters(attributes, rows_by_key),
    )
    warm_up(pipeline, warm_batch)
    return loaded


def warm_up(p: Pipeline, max_batch: int) -> None:
    """Run the request path at the shapes it will see, so first requests pay no allocation cost."""
    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (1, p.max_len), (max_batch, p.max_len), (max_batch, 1)):
        histories = [rng.integers(0, p.n_items, size=length) for _ in range(batch)]
        p.recommend(histories, min(10, p.n_items))


class ModelLoader:
    """Loads repository model `models.name` from `repo` into `models` and keeps it current."""

    def __init__(self, repo: Path | str, models: ModelRegistry, options: RuntimeOptions = RuntimeOptions()) -> None:
        self.repo, self.name, self.models, self.options = Path(repo), models.name, models, options
        self.slot = models.slot
        self.telemetry = models.telemetry
        self._listing: tuple[int, ...] | None = None  # versions present at the last (re)load attempt
        self._lock = asyncio.Lock()
        # announce(event, model): told of every local "swap", "load" and "unload", so the other workers
        # of a `--workers N` server follow (engine/workers.py); their own follow-ups are not announced.
        self.announce: Callable[[str, str], None] | None = None

    # ── KServe's repository API ───────────────────────────────────────────────────────────
    async def load(self, name: str, *, announce: bool = True) -> None:
        """Load (or reload) the newest valid version of the repository model behind `name`."""
        self.models.get(name)  # NotFound for a model this server does not serve
        self.slot.unloaded.discard(name)
        await self.reload(force=True, announce=False)
        self._announce("load", name, announce)

    async def unload(self, name: str, *, announce: bool = True) -> None:
        """Mark `name` unloaded: listed UNAVAILABLE, its requests refused; the others keep serving."""
        self.models.get(name)
        self.slot.unloaded.add(name)
        self._announce("unload", name, announce)

    def _announce(self, event: str, name: str, announce: bool) -> None:
        if announce and self.announce is not None:
            self.announce(event, name)

    async def follow(self, event: str, name: str) -> None:
        """Do what another worker announced (never announced again)."""
        if event == "unload":
            await self.unload(name, announce=False)
        elif event == "load":
            await self.load(name, announce=False)
        else:
            await self.reload(force=True, announce=False)

    # ── loading and hot swap ──────────────────────────────────────────────────────────────
    async def start(self) -> None:
        """Load and warm up the newest valid version; raises ArtifactError when there is none."""
        if not await self.reload(force=True, announce=False):
            if self.slot.current is None:
                raise ArtifactError(f"no loadable version of model {self.name!r} in {self.repo}")

    async def reload(self, *, force: bool = False, announce: bool = True) -> bool:
        """Swap to the newest valid version if it differs from the serving one. Returns whether it
        swapped. Without `force`, does nothing while the repository's version folders are unchanged."""
        loop, executor = asyncio.get_running_loop(), self.models.executor
        async with self._lock:
            listing = tuple(list_versions(self.repo, self.name))
            if not force and listing == self._listing:
                return False
            self._listing = listing
            cur = self.slot.current
            try:
                path, manifest = await loop.run_in_executor(executor, newest_valid_version, self.repo, self.name)
            except ArtifactError as exc:
                self._refused(f"{exc}" + (f"; version {cur.version} keeps serving" if cur else ""))
                return False
            if cur is not None and manifest.version == cur.version:
                return False
            if cur is not None and manifest.version < cur.version and cur.compute.path.is_dir():
                self._refused(f"version {cur.version} is still present but failed verification; it keeps serving")
                return False
            try:
                loaded = await loop.run_in_executor(
                    executor,
                    lambda: load_version(path, self.options, warm_batch=self.models.batching.max_batch_size),
                )
            except Exception as exc:  # a broken graph or index: refuse it, keep serving
                self._refused(
                    f"{path}: failed to load: {exc}" + (f"; version {cur.version} keeps serving" if cur else "")
                )
                return False
            self.slot.current = loaded  # the swap: one reference assignment, read by engine/models.py
            # The version's objects (100k id strings and their map, for a large catalogue) live until the
            # next swap: out of the collector's reach, a full collection no longer walks them, which
            # took milliseconds from whichever request it interrupted.
            gc.freeze()
            self.telemetry.model_version.labels(self.name).set(loaded.version)
            self.telemetry.model_loads.labels(self.name, "loaded").inc()
            providers = ",".join(loaded.compute.encoder.providers)
            was = f" (was version {cur.version})" if cur else ""
            log.info("serving %s version %d from %s on %s%s", self.name, loaded.version, path, providers, was)
            self._announce("swap", self.name, announce)
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
