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
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from .features import load_features
from .item_filter import ItemAttributes, ItemFilters
from .models import LoadedVersion, ModelRegistry
from .pipeline import Pipeline, RuntimeOptions
from .repository import ArtifactError, list_versions, model_dir, open_version

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


@dataclass(frozen=True)
class Refusal:
    """A version a reload would not serve, and why (verification or load failure)."""

    version: int
    reason: str


@dataclass(frozen=True)
class Reload:
    """What one (re)load did: whether it swapped versions, and the versions it refused."""

    swapped: bool
    refused: tuple[Refusal, ...] = ()


class ModelLoader:
    """Loads repository model `models.name` from `repo` into `models` and keeps it current.

    The policy: the newest version on disk that verifies (checksums, sizes, manifest) and loads
    serves. Newer versions that do not are refused (logged, counted in
    attnrec_model_loads_total{outcome="refused"}, and listed in ReloadModel's reply) and older
    ones tried in turn, so a deleted or corrupted serving version gives way to the newest one that
    loads. Only when no version on disk loads does the one in memory keep serving.

    `on_change` (if given) is awaited after every change of what is served: a swap, a load, an unload.
    """

    def __init__(
        self,
        repo: Path | str,
        models: ModelRegistry,
        options: RuntimeOptions = RuntimeOptions(),
        *,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.repo, self.name, self.models, self.options = Path(repo), models.name, models, options
        self.slot = models.slot
        self.telemetry = models.telemetry
        self.on_change = on_change
        self._listing: tuple[int, ...] | None = None  # versions present at the last (re)load attempt
        self._lock = asyncio.Lock()
        # announce(event, model): told of every local "swap", "load" and "unload", so the other workers
        # of a `--workers N` server follow (engine/workers.py); their own follow-ups are not announced.
        self.announce: Callable[[str, str], None] | None = None

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    # ── KServe's repository API ───────────────────────────────────────────────────────────
    async def load(self, name: str, *, announce: bool = True) -> Reload:
        """Load (or reload) the newest valid version of the repository model behind `name`."""
        self.models.get(name)  # NotFound for a model this server does not serve
        self.slot.unloaded.discard(name)
        result = await self.reload(force=True, announce=False)
        self._announce("load", name, announce)
        await self._changed()
        return result

    async def unload(self, name: str, *, announce: bool = True) -> None:
        """Mark `name` unloaded: listed UNAVAILABLE, its requests refused; the others keep serving
        (a model the server needs, `pipeline`, takes readiness and health down with it)."""
        self.models.get(name)
        self.slot.unloaded.add(name)
        self._announce("unload", name, announce)
        await self._changed()

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
        result = await self.reload(force=True, announce=False)
        if self.slot.current is None:
            why = "; ".join(f"version {r.version}: {r.reason}" for r in result.refused) or "no versions"
            raise ArtifactError(f"no loadable version of model {self.name!r} in {self.repo} ({why})")

    async def reload(self, *, force: bool = False, announce: bool = True) -> Reload:
        """Serve the newest version on disk that verifies and loads, if it is not the one serving.
        Without `force`, does nothing while the repository's version folders are unchanged. A swap is
        announced to the other workers of a `--workers N` server unless `announce` is False."""
        loop, executor = asyncio.get_running_loop(), self.models.executor
        async with self._lock:
            listing = tuple(list_versions(self.repo, self.name))
            if not force and listing == self._listing:
                return Reload(False)
            self._listing = listing
            cur = self.slot.current
            refused: list[Refusal] = []
            swapped, settled = False, False
            for version in reversed(listing):
                path = model_dir(self.repo, self.name) / str(version)
                try:
                    await loop.run_in_executor(executor, open_version, path)
                except ArtifactError as exc:
                    refused.append(self._refused(version, str(exc)))
                    continue
                if cur is not None and version == cur.version:
                    settled = True  # the serving version is still the newest valid one
                    break
                try:
                    loaded = await loop.run_in_executor(
                        executor,
                        lambda: load_version(path, self.options, warm_batch=self.models.batching.max_batch_size),
                    )
                except Exception as exc:  # a broken graph or index: refuse it, try the next older one
                    refused.append(self._refused(version, f"{path}: failed to load: {exc}"))
                    continue
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
                swapped = settled = True
                break
            if not settled and cur is not None:
                log.error(
                    "model %s: no version in %s verifies and loads; version %d keeps serving from memory",
                    self.name,
                    self.repo,
                    cur.version,
                )
        if swapped:
            self._announce("swap", self.name, announce)
            await self._changed()
        return Reload(swapped, tuple(refused))

    def _refused(self, version: int, why: str) -> Refusal:
        self.telemetry.model_loads.labels(self.name, "refused").inc()
        log.error("model %s: version %d refused: %s", self.name, version, why)
        return Refusal(version, why)

    async def poll(self, interval: float) -> None:
        """Check the repository every `interval` seconds and swap in new versions (run as a task)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # keep polling whatever happened
                log.exception("model %s: polling the repository failed", self.name)
