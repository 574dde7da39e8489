"""Full-ranking top-k and the metrics of the quality protocol (docs/architecture.md), over numpy arrays.

Every item the user interacted with before the target is excluded from the ranking. If the
target itself is a repeat of an earlier item it is therefore excluded too and counts as a miss:
the protocol ranks new items only (`repeat_targets` counts such users so it never hides).

Beside accuracy, exposure fairness over the users' top-10 lists (groups: engine/popularity.py):
coverage@10 (items recommended to anyone), arp@10 (mean training count of recommended items),
gini@10 (Gini coefficient of how often each catalogue item is recommended), long_tail@10 (share of
the recommended slots that hold an item outside the 20% most popular) and popcal_js@10 (mean over
users of the Jensen-Shannon divergence between the head/mid/tail mix of the user's history and of
their top-10: 0 = the list has the history's popularity mix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from attnrec.engine.popularity import gini, group_mix, head_rows, history_mix, js_divergence, popularity_groups

# Ranking chunks are sized to keep the (rows, n_items) score matrix near this many floats.
_SCORE_BUDGET = 1 << 25


def topk_excluding(scores: np.ndarray, exclude: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Indices of the k best columns per row, best first, never one in that row's `exclude`.

    scores: (B, I) float; exclude: B arrays of column indices. Modifies `scores` in place.
    Slots that only excluded columns could fill (tiny catalogues) are -1.
    """
    b, n = scores.shape
    rows = np.repeat(np.arange(b), [len(e) for e in exclude])
    if len(rows):
        scores[rows, np.concatenate(exclude)] = -np.inf
    k = min(k, n)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top[np.take_along_axis(part_scores, order, axis=1) == -np.inf] = -1
    return top


def hit_positions(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each row's target in its top list, or -1 when absent."""
    match = top == targets[:, None]
    pos = match.argmax(axis=1)
    return np.where(match.any(axis=1), pos, -1)


@dataclass
class RankingReport:
    """Accumulates top-k lists and hit positions over batches of users."""

    ks: tuple[int, ...]
    n_items: int
    popularity: np.ndarray  # (n_items,) training interactions per catalogue row

    def __post_init__(self) -> None:
        self.positions: list[np.ndarray] = []
        self.exposure = np.zeros(self.n_items, dtype=np.int64)  # times each row is in someone's top 10
        self.head = head_rows(self.popularity)
        self.groups = popularity_groups(self.popularity)
        self.rec_pop_sum = 0.0
        self.tail_slots = 0
        self.calibration_sum = 0.0
        self.calibrated_users = 0
        self.n = 0
        self.repeats = 0

    def add(self, top: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray], repeats: int = 0) -> None:
        """top (B, k) catalogue rows (-1 = empty), targets (B,) rows, histories: B arrays of rows."""
        self.positions.append(hit_positions(top, targets))
        top10 = top[:, : min(10, top.shape[1])]
        valid = top10 >= 0
        shown = top10[valid]
        self.exposure += np.bincount(shown, minlength=self.n_items)
        self.tail_slots += int((~self.head[shown]).sum())
        pops = np.where(valid, self.popularity[np.maximum(top10, 0)], 0.0)
        self.rec_pop_sum += float((pops.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)).sum())
        # Calibration needs both mixes: users with an empty history or list are left out of the mean.
        both = valid.any(axis=1) & np.array([len(h) > 0 for h in histories], dtype=bool)
        if both.any():
            js = js_divergence(history_mix(histories, self.groups), group_mix(top10, self.groups))
            self.calibration_sum += float(js[both].sum())
            self.calibrated_users += int(both.sum())
        self.n += len(targets)
        self.repeats += repeats

    def result(self) -> dict[str, float]:
        pos = np.concatenate(self.positions) if self.positions else np.zeros(0, dtype=np.int64)
        out: dict[str, float] = {}
        for k in self.ks:
            hit = (pos >= 0) & (pos < k)
            out[f"hr@{k}"] = float(hit.mean()) if len(pos) else 0.0
            gains = np.zeros(len(pos))
            gains[hit] = 1.0 / np.log2(pos[hit] + 2.0)
            out[f"ndcg@{k}"] = float(gains.mean()) if len(pos) else 0.0
        out["coverage@10"] = float((self.exposure > 0).mean())
        # Average recommendation popularity (ARP): mean training count of the recommended items.
        out["arp@10"] = self.rec_pop_sum / max(self.n, 1)
        out["gini@10"] = gini(self.exposure)
        out["long_tail@10"] = self.tail_slots / max(int(self.exposure.sum()), 1)
        out["popcal_js@10"] = self.calibration_sum / max(self.calibrated_users, 1)
        out["users"] = self.n
        out["repeat_targets"] = self.repeats
        return out


def evaluate_full_ranking(
    query: Callable[[list[np.ndarray]], np.ndarray],
    item_vectors: np.ndarray,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    popularity: np.ndarray,
    *,
    ks: tuple[int, ...] = (10, 20),
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """HR/NDCG@k and the exposure figures with exact scores `query(histories) @ item_vectors.T`.

    histories and targets hold tokens (catalogue row + 1, as the encoder reads them); `query`
    maps a list of histories to (B, D) vectors; item_vectors and popularity are indexed by row.
    The batch shrinks for huge catalogues so memory stays bounded.
    """
    n_items = item_vectors.shape[0]
    report = RankingReport(ks, n_items, popularity)
    step = max(1, min(batch_size, _SCORE_BUDGET // max(n_items, 1)))
    kmax = max(*ks, 10)  # the exposure figures are read from the top 10
    for s in range(0, len(targets), step):
        hist = list(histories[s : s + step])
        tgt = targets[s : s + step]
        q = np.asarray(query(hist), dtype=np.float32)
        scores = q @ item_vectors.T
        repeats = sum(int(np.any(h == t)) for h, t in zip(hist, tgt))
        rows = [h - 1 for h in hist]
        top = topk_excluding(scores, rows, kmax)
        report.add(top, tgt - 1, rows, repeats)
        if progress:
            progress(len(tgt))
    return report.result()
