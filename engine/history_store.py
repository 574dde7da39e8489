"""Users' stored histories and items' availability: one small interface, two stores, chosen by URL.

    file://PATH             embedded SQLite in WAL mode (engine/history_sqlite.py): on disk, no server;
                            a relative PATH is under the working directory (the default,
                            file://attnrec-history.sqlite)
    redis://HOST:PORT/DB    Redis (engine/history_redis.py, redis-py: `pip install 'attnrec[redis]'`),
                            for replicas; rediss:// for TLS, a password as redis://:PASSWORD@HOST...

Every store keeps, per namespace (the repository model's name, so models sharing a Redis stay
apart): each user's most recent events (item id and timestamp in seconds), bounded to the length
the caller asks for and expiring `ttl` seconds after the user's last append; and the set of
unavailable item ids with a generation number that each change of it increments, so a server can
check per request, with one cheap read, whether its cached copy of the set is still current.

`open_history_store` wraps the chosen store in `MeteredStore`: every call is counted and timed in
Prometheus (engine/telemetry.py), and any failure of the backend becomes `StoreUnavailable`,
whose message names the store (never its password). No torch, numpy only where the callers use it.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

from .errors import Unavailable
from .telemetry import Telemetry

DEFAULT_URL = "file://attnrec-history.sqlite"
DEFAULT_TTL_S = 30 * 24 * 3600


class StoreUnavailable(Unavailable):
    """The history store did not answer (UNAVAILABLE to the client)."""


@dataclass(frozen=True)
class Read:
    """What one request reads: the user's stored item ids (oldest first) and the availability generation;
    the stored events' timestamps (seconds, one per item) for the ranker's time features."""

    items: list[str]
    generation: int
    timestamps: list[int] = field(default_factory=list)


class HistoryStore(abc.ABC):
    """The interface both stores implement. Item and user ids are strings; timestamps int seconds."""

    name: str  # the URL without credentials: for messages and the metrics' `store` label
    # The exceptions that mean "the store failed" (unreachable, timed out, locked, disk full), as
    # opposed to a bug here: those become StoreUnavailable, anything else stays an internal error.
    errors: tuple[type[BaseException], ...] = (OSError,)

    @abc.abstractmethod
    async def read(self, user_id: str | None) -> Read:
        """The user's stored items ([] for an unknown or expired user, or `user_id` None) and the
        current availability generation, in one round trip."""

    @abc.abstractmethod
    async def append(self, user_id: str, items: Sequence[str], timestamps: Sequence[int], limit: int) -> int:
        """Append events (oldest first), keep the `limit` most recent, restart the TTL; the length after."""

    @abc.abstractmethod
    async def set_available(self, items: Sequence[str], available: bool) -> int:
        """Mark items available or not and bump the generation; how many changed."""

    @abc.abstractmethod
    async def unavailable(self) -> tuple[int, frozenset[str]]:
        """The generation and the unavailable item ids, consistent with each other."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_history_store(url: str, *, namespace: str, ttl_s: int, telemetry: Telemetry) -> "MeteredStore":
    """The store named by `url` ('' = the default), metered. Raises ValueError for a URL it cannot use."""
    url = url or DEFAULT_URL
    if ttl_s < 0:
        raise ValueError(f"--history-ttl must be >= 0 seconds (0: never expire), got {ttl_s}")
    scheme = urlsplit(url).scheme
    if scheme == "file":
        from .history_sqlite import SqliteHistoryStore

        store: HistoryStore = SqliteHistoryStore(sqlite_path(url), namespace=namespace, ttl_s=ttl_s)
    elif scheme in ("redis", "rediss"):
        from .history_redis import RedisHistoryStore

        store = RedisHistoryStore(url, namespace=namespace, ttl_s=ttl_s)
    else:
        raise ValueError(f"--history-store {redact(url)!r}: use file://PATH or redis://HOST:PORT/DB")
    return MeteredStore(store, telemetry)


def sqlite_path(url: str) -> str:
    """file:///abs/path → /abs/path; file://rel/path → rel/path (under the working directory)."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if not path:
        raise ValueError(f"--history-store {url!r}: no path (e.g. file://attnrec-history.sqlite)")
    return path


class MeteredStore(HistoryStore):
    """A store whose calls are counted, timed and mapped to StoreUnavailable (see the module docstring)."""

    def __init__(self, store: HistoryStore, telemetry: Telemetry) -> None:
        self.store, self.name, self.errors = store, store.name, store.errors
        t = telemetry
        self._ok = {op: t.store_operations.labels(self.name, op, "ok") for op in _OPERATIONS}
        self._error = {op: t.store_operations.labels(self.name, op, "error") for op in _OPERATIONS}
        self._seconds = {op: t.store_seconds.labels(self.name, op) for op in _OPERATIONS}
        self._up = t.store_up.labels(self.name)
        self._up.set(1)
        self.last_error = ""

    def _done(self, op: str, start: float) -> None:
        self._seconds[op].observe(time.perf_counter() - start)
        self._ok[op].inc()
        self._up.set(1)

    def _failed(self, op: str, start: float, exc: Exception) -> StoreUnavailable:
        self._seconds[op].observe(time.perf_counter() - start)
        self._error[op].inc()
        self._up.set(0)
        self.last_error = f"{type(exc).__name__}: {exc}"
        return StoreUnavailable(f"history store {self.name} is unreachable ({self.last_error})")

    # One method per operation, spelled out: this is the request path, where a generic wrapper
    # (functools.wraps, getattr) would cost more than the SQLite read it times.
    async def read(self, user_id: str | None) -> Read:
        start = time.perf_counter()
        try:
            out = await self.store.read(user_id)
        except self.errors as exc:
            raise self._failed("read", start, exc) from exc
        self._done("read", start)
        return out

    async def append(self, user_id: str, items: Sequence[str], timestamps: Sequence[int], limit: int) -> int:
        start = time.perf_counter()
        try:
            out = await self.store.append(user_id, items, timestamps, limit)
        except self.errors as exc:
            raise self._failed("append", start, exc) from exc
        self._done("append", start)
        return out

    async def set_available(self, items: Sequence[str], available: bool) -> int:
        start = time.perf_counter()
        try:
            out = await self.store.set_available(items, available)
        except self.errors as exc:
            raise self._failed("set_available", start, exc) from exc
        self._done("set_available", start)
        return out

    async def unavailable(self) -> tuple[int, frozenset[str]]:
        start = time.perf_counter()
        try:
            out = await self.store.unavailable()
        except self.errors as exc:
            raise self._failed("unavailable", start, exc) from exc
        self._done("unavailable", start)
        return out

    async def close(self) -> None:
        await self.store.close()


_OPERATIONS = ("read", "append", "set_available", "unavailable")
