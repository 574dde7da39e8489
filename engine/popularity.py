"""Popularity groups of a catalogue, and how far a list's popularity mix is from a history's.

One owner for what `attnrec evaluate`'s exposure-fairness figures (export/ranking_metrics.py) and
the calibrated re-rank at serving time (engine/rerank.py) both read, so the figure the evaluation
reports is the one the re-rank moves. Popularity is the training interaction count per catalogue
row (a version's item_popularity.npy). Items are ordered most popular first, ties by catalogue row.

- head items (`head_rows`): the ceil(20%) most popular items of the catalogue; every other item is
  long tail (the issue's "outside the top 20% by training popularity").
- popularity groups (`popularity_groups`), for calibration: head H = the most popular items that
  together hold the first 20% of training interactions, tail T = the least popular ones holding the
  last 20% (items never seen in training included), mid M = the rest (the H/M/T groups of
  Abdollahpouri et al., "User-centered evaluation of popularity bias", UMAP 2021). An item belongs to
  the group where its own share of interactions starts.
- a list's mix (`group_mix`): the fraction of its items in H, M and T.
- miscalibration (`js_divergence`): Jensen-Shannon divergence between two mixes, base 2, so in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np

HEAD_ITEM_SHARE = 0.2  # head_rows: this share of the catalogue's items
HEAD_INTERACTION_SHARE = 0.2  # popularity_groups: H holds this share of the interactions, T the same share
HEAD, MID, TAIL = 0, 1, 2
N_GROUPS = 3


def popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Catalogue rows, most popular first, ties by row."""
    return np.argsort(-np.asarray(popularity, dtype=np.float64), kind="stable")


def head_rows(popularity: np.ndarray) -> np.ndarray:
    """(n_items,) bool: True for the ceil(20%) most popular items (ties by row)."""
    n = len(popularity)
    head = np.zeros(n, dtype=bool)
    head[popularity_order(popularity)[: math.ceil(HEAD_ITEM_SHARE * n)]] = True
    return head


def popularity_groups(popularity: np.ndarray) -> np.ndarray:
    """(n_items,) int8 group per row: HEAD, MID or TAIL by where the item's share of interactions starts."""
    pop = np.asarray(popularity, dtype=np.float64)
    groups = np.full(len(pop), TAIL, dtype=np.int8)
    total = pop.sum()
    if total <= 0:  # no interactions at all: nothing is popular
        return groups
    order = popularity_order(pop)
    before = (np.cumsum(pop[order]) - pop[order]) / total  # share held by the items ranked above
    g = np.where(before < HEAD_INTERACTION_SHARE, HEAD, np.where(before < 1 - HEAD_INTERACTION_SHARE, MID, TAIL))
    groups[order] = g
    return groups


def group_mix(rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(B, K) catalogue rows (-1 = empty slot) → (B, 3) fraction of each row's items per group
    (all zeros for a row with no item)."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.int64))
    valid = rows >= 0
    g = groups[np.maximum(rows, 0)]
    counts = np.stack([((g == j) & valid).sum(axis=1) for j in range(N_GROUPS)], axis=1).astype(np.float64)
    return counts / np.maximum(valid.sum(axis=1, keepdims=True), 1)


def history_mix(histories, groups: np.ndarray) -> np.ndarray:
    """Histories (arrays of catalogue rows, any lengths) → (B, 3) mixes."""
    out = np.zeros((len(histories), N_GROUPS))
    for i, h in enumerate(histories):
        if len(h):
            out[i] = np.bincount(groups[np.asarray(h, dtype=np.int64)], minlength=N_GROUPS) / len(h)
    return out


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between distributions along the last axis."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    return np.clip((kl_p + kl_q) / 2, 0.0, 1.0)


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of exposure counts over every catalogue item (0: equal exposure; (n-1)/n: one item only)."""
    e = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(e), e.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * e).sum() / (n * total))
