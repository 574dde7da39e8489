"""Filters over an InteractionLog: iterative k-core."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .log import InteractionLog


@dataclass(frozen=True)
class KCoreReport:
    """What `kcore` removed. `rounds` counts the passes that removed something."""

    k_user: int
    k_item: int
    rounds: int
    users_removed: int
    items_removed: int
    interactions_removed: int
    users_kept: int
    items_kept: int
    interactions_kept: int

    def __str__(self) -> str:
        if self.k_user <= 1 and self.k_item <= 1:
            head = "k-core: no filter"
        else:
            head = (
                f"k-core (users >= {self.k_user}, items >= {self.k_item} interactions): removed "
                f"{self.users_removed} users, {self.items_removed} items, "
                f"{self.interactions_removed} interactions in {self.rounds} round(s)"
            )
        return f"{head}; kept {self.users_kept} users, {self.items_kept} items, {self.interactions_kept} interactions"


def kcore(log: InteractionLog, k_user: int, k_item: int) -> tuple[InteractionLog, KCoreReport]:
    """Keep the largest sub-log where every user has >= k_user and every item >= k_item interactions.

    Repeated interactions count once each (as in RecBole). k=0 (or 1) means no bound on that side.
    Removing a user can push an item under its bound and back, so passes repeat until none removes.
    """
    if k_user < 0 or k_item < 0:
        raise ValueError(f"k must be >= 0, got k_user={k_user}, k_item={k_item}")
    n_codes_u, u = _codes(log.user)  # (N,)
    n_codes_i, i = _codes(log.item)  # (N,)
    keep = np.ones(len(log), dtype=bool)
    rounds = 0
    n_users = n_items = None
    while True:
        user_count = np.bincount(u[keep], minlength=n_codes_u)
        item_count = np.bincount(i[keep], minlength=n_codes_i)
        if n_users is None:  # codes may have gaps: count the ids that occur
            n_users, n_items = int(np.count_nonzero(user_count)), int(np.count_nonzero(item_count))
        drop = keep & ((user_count[u] < k_user) | (item_count[i] < k_item))
        if not drop.any():
            break
        keep &= ~drop
        rounds += 1
    users_kept = int(np.count_nonzero(user_count))
    items_kept = int(np.count_nonzero(item_count))
    kept = int(keep.sum())
    report = KCoreReport(
        k_user=k_user,
        k_item=k_item,
        rounds=rounds,
        users_removed=n_users - users_kept,
        items_removed=n_items - items_kept,
        interactions_removed=len(log) - kept,
        users_kept=users_kept,
        items_kept=items_kept,
        interactions_kept=kept,
    )
    return (log if rounds == 0 else log.take(keep)), report


def _codes(ids: np.ndarray) -> tuple[int, np.ndarray]:
    """Codes 0..n-1 with one code per distinct id (some codes may be unused)."""
    if ids.dtype.kind in "iu" and len(ids):
        low, high = int(ids.min()), int(ids.max())
        if high - low <= 4 * len(ids):  # compact integer ids: offsets are codes, no sort needed
            return high - low + 1, (ids - low).astype(np.int64)
    uniq, codes = np.unique(ids, return_inverse=True)
    return len(uniq), codes.reshape(-1)
