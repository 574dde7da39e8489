"""The Redis history store (redis-py's asyncio client), for replicas sharing one store.

Keys, under `attnrec:{namespace}:` (the repository model's name):

    history:{user_id}          a list of "TIMESTAMP:ITEM" entries, oldest first, trimmed to the
                               limit and given the TTL on every append (MULTI: atomic)
    unavailable                the set of unavailable item ids
    availability-generation    an integer incremented with every availability change

A request's read is one round trip (pipelined LRANGE + GET). Failures surface fast: one-second
socket and connect timeouts and a single retry (a pooled connection that Redis closed), unless the
URL sets its own (redis://host:6379/0?socket_timeout=0.25&socket_connect_timeout=0.25).
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .history_store import HistoryStore, Read, redact

TIMEOUT_S = 1.0


class RedisHistoryStore(HistoryStore):
    errors = (RedisError, OSError, asyncio.TimeoutError)

    def __init__(self, url: str, *, namespace: str, ttl_s: int) -> None:
        self.name, self.ttl_s = redact(url), ttl_s
        try:
            self.client = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=TIMEOUT_S,
                socket_connect_timeout=TIMEOUT_S,
                retry=Retry(NoBackoff(), 1),
            )
        except ValueError as exc:
            raise ValueError(f"--history-store {self.name}: {exc}") from None
        prefix = f"attnrec:{namespace}:"
        self._history = prefix + "history:"
        self._unavailable = prefix + "unavailable"
        self._generation = prefix + "availability-generation"

    async def read(self, user_id: str | None) -> Read:
        if user_id is None:
            return Read([], int(await self.client.get(self._generation) or 0))
        async with self.client.pipeline(transaction=False) as pipe:
            entries, gen = await pipe.lrange(self._history + user_id, 0, -1).get(self._generation).execute()
        events = [e.split(":", 1) for e in entries]
        return Read([item for _, item in events], int(gen or 0), [int(t) for t, _ in events])

    async def append(self, user_id: str, items: Sequence[str], timestamps: Sequence[int], limit: int) -> int:
        key = self._history + user_id
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(f"{int(t)}:{item}" for t, item in zip(timestamps, items)))
            pipe.ltrim(key, -limit, -1)
            pipe.expire(key, self.ttl_s) if self.ttl_s > 0 else pipe.persist(key)
            length, *_ = await pipe.execute()
        return min(length, limit)

    async def set_available(self, items: Sequence[str], available: bool) -> int:
        async with self.client.pipeline(transaction=True) as pipe:
            (pipe.srem if available else pipe.sadd)(self._unavailable, *items)
            changed, _ = await pipe.incr(self._generation).execute()
        return changed

    async def unavailable(self) -> tuple[int, frozenset[str]]:
        async with self.client.pipeline(transaction=True) as pipe:
            gen, items = await pipe.get(self._generation).smembers(self._unavailable).execute()
        return int(gen or 0), frozenset(items)

    async def close(self) -> None:
        await self.client.aclose()
