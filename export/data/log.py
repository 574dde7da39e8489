"""The raw interaction log every reader returns: one row per interaction, external ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """A data file is malformed. The message names the file, the line and what was wrong."""


@dataclass(frozen=True)
class InteractionLog:
    """Interactions as read from a source, before any id mapping.

    `user` and `item` hold external ids (int64 or str arrays: whatever the source had);
    `timestamp` is float64 seconds, or the row's position for formats that are in time order
    without timestamps (then `timed` is False: the ranker's time features need real seconds).
    Rows are in file order; sorting happens when sequences are built.
    """

    user: np.ndarray  # (N,)
    item: np.ndarray  # (N,)
    timestamp: np.ndarray  # (N,) float64
    source: str  # a path or a description, for messages
    timed: bool = True  # False: `timestamp` is the row's position, not seconds

    def __post_init__(self) -> None:
        n = len(self.user)
        if len(self.item) != n or len(self.timestamp) != n:
            raise ValueError(
                f"{self.source}: columns differ in length "
                f"(user {n}, item {len(self.item)}, timestamp {len(self.timestamp)})"
            )

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> "InteractionLog":
        return InteractionLog(self.user[mask], self.item[mask], self.timestamp[mask], self.source, self.timed)
