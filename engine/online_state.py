"""What a server keeps beyond its model: users' stored histories and item availability, in a history
store (engine/history_store.py) that replicas may share.

Every Recommend reads the availability generation (with the user's history when it names a
user: one round trip), so an availability change made through any replica holds from the next
request on; the set itself is fetched again only when the generation moved. When the store is
unreachable, requests that need it (a user_id, RecordEvents, SetItemAvailability) get
UNAVAILABLE; requests carrying their own history keep working on the last availability this
server read, and stop asking the store for RETRY_AFTER_S, so an outage costs them no timeouts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from .errors import InvalidRequest
from .history_store import HistoryStore, StoreUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class Availability:
    generation: int
    unavailable: frozenset[str]


class OnlineState:
    def __init__(self, store: HistoryStore, *, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.store, self.retry_after_s = store, retry_after_s
        self.availability = Availability(0, frozenset())
        self._skip_until = 0.0  # monotonic: no availability reads before this (the store failed)

    async def read(self, user_id: str) -> tuple[list[str], Availability]:
        """A request's stored history ('' = no user: none) and the availability to apply. With a
        user, a store failure raises StoreUnavailable; without, the last availability read is used."""
        items, _, availability = await self.read_events(user_id)
        return items, availability

    async def read_events(self, user_id: str) -> tuple[list[str], list[int], Availability]:
        """`read`, with the stored events' timestamps (seconds, one per item)."""
        if user_id:
            got = await self.store.read(user_id)
        elif time.monotonic() < self._skip_until:
            return [], [], self.availability
        else:
            try:
                got = await self.store.read(None)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                return [], [], self.availability
        if got.generation != self.availability.generation:
            try:
                await self.refresh()
            except StoreUnavailable as exc:
                if user_id:
                    raise
                self._store_failed(exc)
        return got.items, got.timestamps, self.availability

    def _store_failed(self, exc: StoreUnavailable) -> None:
        self._skip_until = time.monotonic() + self.retry_after_s
        log.warning("%s; serving with the availability of generation %d", exc, self.availability.generation)

    async def refresh(self) -> Availability:
        generation, items = await self.store.unavailable()
        self.availability = Availability(generation, items)
        return self.availability

    async def record(self, user_id: str, items: Sequence[str], timestamps: Sequence[int], limit: int) -> int:
        """Append a user's events (oldest first); their stored history length after. Timestamps: one per
        item, or none (the server's clock)."""
        if not user_id:
            raise InvalidRequest("RecordEvents needs a user_id")
        if not items:
            raise InvalidRequest(f"RecordEvents for user {user_id!r} has no items")
        if any(not x for x in items):
            raise InvalidRequest(f"RecordEvents for user {user_id!r}: item ids must not be empty")
        if timestamps and len(timestamps) != len(items):
            raise InvalidRequest(
                f"RecordEvents for user {user_id!r}: {len(timestamps)} timestamps for {len(items)} items "
                "(give one per item, or none)"
            )
        stamps = list(timestamps) if timestamps else [int(time.time())] * len(items)
        return await self.store.append(user_id, list(items)[-limit:], stamps[-limit:], limit)

    async def set_availability(self, items: Sequence[str], available: bool) -> tuple[int, Availability]:
        """Mark items (un)available for every replica; how many changed and the availability now."""
        if not items:
            raise InvalidRequest("SetItemAvailability has no items")
        if any(not x for x in items):
            raise InvalidRequest("SetItemAvailability: item ids must not be empty")
        changed = await self.store.set_available(list(dict.fromkeys(items)), available)
        return changed, await self.refresh()

    async def close(self) -> None:
        await self.store.close()
