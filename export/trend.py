"""The candidate's popularity as of the request time, for the ranker (the `trend` feature group).

A sequence encoder sees the user's items in order but not the calendar: it cannot know that an
item had no interactions yet at the request time (on MovieLens, a film not yet released) or that
it is in fashion this week. This table holds, per item, its training interactions counted per
time bucket (a day by default) and accumulated, so the ranker's graph reads in a few lookups, at
the request's bucket b: the interactions in the w buckets before b (w: a day, a week, a month),
all before b, whether there were none yet, and the buckets since the first one. Only buckets
strictly before b count, so a training sample's own target (at its request time, in bucket b)
is never in its features, and neither is anything later. A request after the training data reads
the bucket just after it: the newest trend the version knows, not "nothing lately".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAY = 86_400
MAX_BUCKETS = 1024
MAX_CELLS = 20_000_000  # (items + 1) x (buckets + 1) float32 in the graph: at most 80 MB
WINDOW_DAYS = (1, 7, 30)


@dataclass(frozen=True)
class TrendTable:
    """cumulative (I + 1, T + 1) float32: [c, b] = training interactions of token c in buckets < b;
    first (I + 1,) int64: c's first bucket (T + 1 when it has none; padding too); bucket b of a time t
    (int64 seconds) is (t - start) // width clamped to 0..T; windows: in buckets."""

    cumulative: np.ndarray
    first: np.ndarray
    start: int
    width: int
    windows: tuple[int, ...]

    @property
    def buckets(self) -> int:
        return self.cumulative.shape[1] - 1


def build(tokens: np.ndarray, seconds: np.ndarray, n_tokens: int) -> TrendTable:
    """The table of interactions (tokens, int64 seconds): day buckets from the first interaction, wider
    when the log spans more than MAX_BUCKETS days or the catalogue would make the table too large."""
    seconds = np.asarray(seconds, dtype=np.int64)
    if not len(seconds):
        raise ValueError("trend features need at least one timestamped interaction")
    start, span = int(seconds.min()), int(seconds.max() - seconds.min()) + 1
    most = max(1, min(MAX_BUCKETS, MAX_CELLS // n_tokens - 1))
    width = max(DAY, -(-span // most))
    t = -(-span // width)  # buckets 0..t-1 hold interactions; b = t is "after all of them"
    b = (seconds - start) // width
    counts = np.zeros((n_tokens, t + 1), dtype=np.float64)
    np.add.at(counts, (tokens, b + 1), 1.0)  # shifted: column b + 1 accumulates buckets < b + 1
    counts[0] = 0.0
    cumulative = np.cumsum(counts, axis=1).astype(np.float32)
    first = np.full(n_tokens, t + 1, dtype=np.int64)
    np.minimum.at(first, tokens, b)
    first[0] = t + 1
    windows = tuple(sorted({max(1, round(d * DAY / width)) for d in WINDOW_DAYS}))
    return TrendTable(cumulative, first, start, int(width), windows)


def features(table: TrendTable, candidates: np.ndarray, request_time: np.ndarray) -> np.ndarray:
    """(S, N, F) float32, the ranker graph's trend features in numpy (a reference for tests): per window
    w, log1p(interactions in the w buckets before the request's); log1p(all before it); 1 if none yet;
    log1p(buckets since the first). All 0 where the request time is unknown (≤ 0)."""
    now = np.asarray(request_time, dtype=np.int64).reshape(-1, 1)
    known = now > 0
    b = np.clip((np.maximum(now, 0) - table.start) // table.width, 0, table.buckets)
    c = table.cumulative
    before = c[candidates, b]
    cols = [np.log1p(before - c[candidates, np.maximum(b - w, 0)]) for w in table.windows]
    cols += [np.log1p(before), (before == 0).astype(np.float32)]
    cols.append(np.log1p(np.maximum(b - table.first[candidates], 0)).astype(np.float32))
    out = np.stack(cols, axis=-1).astype(np.float32)
    out[~np.broadcast_to(known, candidates.shape)] = 0.0
    out[candidates == 0] = 0.0
    return out


def n_features(table: TrendTable) -> int:
    return len(table.windows) + 3
