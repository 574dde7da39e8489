"""The per-request re-rank after the ranker: diversity and popularity calibration, each 0..1.

Greedy over the user's candidate pool (the ranker's order, or stage one's without a ranker): slot
after slot, the candidate i not yet picked that maximises

    (1 - d)(1 - c) · rel(i)  -  d · max_{j in S} cos(v_i, v_j)  -  c · JS(p_u, mix(S + i))

rel = the candidate's score min-max scaled to 0..1 over the pool, S = the items picked so far (the
max is 0 for the first slot), v = the version's item embeddings, p_u = the head/mid/tail mix of the
user's history and mix(S + i) the list's if i were added (engine/popularity.py, the groups and the
divergence `attnrec evaluate` reports as popcal_js@10). d alone is maximal marginal relevance
(Carbonell & Goldstein, SIGIR 1998); c alone is calibrated recommendation (Steck, RecSys 2018) toward
the user's popularity mix (Abdollahpouri et al., UMAP 2021). Ties go to the better-ranked candidate.
A user with d = c = 0 gets the pool's first k unchanged: today's answer. Scores stay the model's
(ranker or inner product), so with a re-rank they need not descend.

numpy only; the pool is (B, N), the work k x B x N x D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .popularity import N_GROUPS, history_mix, js_divergence, popularity_groups


def strengths(value: float | Sequence[float] | np.ndarray | None, n: int, name: str) -> np.ndarray:
    """(n,) float64 strengths from a scalar, one per row, or None (0); ValueError outside 0..1 (NaN too)."""
    if value is None:
        return np.zeros(n)
    x = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
    if not x.any():  # every request's default (0): the check below costs more than the batch's re-rank logic
        return np.zeros(n)
    bad = ~((x >= 0) & (x <= 1))
    if bad.any():
        raise ValueError(f"{name} must be in 0..1, got {x[bad][0]}")
    return np.array(x)


@dataclass(frozen=True)
class RerankOptions:
    """One job's re-rank strengths (`attnrec retrieve --diversity/--popularity-calibration`), each 0..1."""

    diversity: float = 0.0
    popularity_calibration: float = 0.0

    def __post_init__(self) -> None:
        for name in ("diversity", "popularity_calibration"):
            strengths(getattr(self, name), 1, name)

    @property
    def active(self) -> bool:
        return self.diversity > 0 or self.popularity_calibration > 0


class Reranker:
    """What the re-rank reads of a version: its item embeddings (for diversity) and popularity groups."""

    def __init__(self, popularity: np.ndarray, item_vectors: np.ndarray | None = None) -> None:
        self.groups = popularity_groups(popularity)
        self.item_vectors = item_vectors  # (n_items, D); may be a memory map: only pool rows are read

    def rerank(
        self,
        rows: np.ndarray,
        scores: np.ndarray,
        histories: Sequence[np.ndarray],
        k: int,
        diversity: np.ndarray,
        calibration: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """rows/scores (B, N): each user's pool, best first, -1/-inf in empty slots; histories: B arrays
        of rows; diversity/calibration (B,). → (rows, scores) (B, k)."""
        b, n = rows.shape
        diversity = strengths(diversity, b, "diversity")
        calibration = strengths(calibration, b, "popularity_calibration")
        out_r = np.full((b, k), -1, dtype=np.int64)
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        width = min(k, n)
        out_r[:, :width], out_s[:, :width] = rows[:, :width], scores[:, :width]
        todo = np.flatnonzero((diversity > 0) | (calibration > 0))
        if not len(todo) or not n:
            return out_r, out_s
        if (diversity[todo] > 0).any() and self.item_vectors is None:
            raise ValueError("diversity needs the version's item embeddings; this pipeline was built without them")
        picked = self._greedy(
            rows[todo], scores[todo], [histories[i] for i in todo], width, diversity[todo], calibration[todo]
        )
        ok = picked >= 0
        at = np.maximum(picked, 0)
        out_r[todo, :width] = np.where(ok, np.take_along_axis(rows[todo], at, axis=1), -1)
        out_s[todo, :width] = np.where(ok, np.take_along_axis(scores[todo], at, axis=1), -np.inf)
        return out_r, out_s

    def _greedy(self, rows, scores, histories, k, d, c) -> np.ndarray:
        """(B, k) pool positions picked, -1 where the pool ran out."""
        b, n = rows.shape
        valid = rows >= 0
        s = np.where(valid, scores.astype(np.float64), 0.0)
        lo = np.where(valid, s, np.inf).min(axis=1, keepdims=True)
        hi = np.where(valid, s, -np.inf).max(axis=1, keepdims=True)
        spread = hi > lo  # False: one score for the whole pool (or no pool), all equally relevant
        with np.errstate(invalid="ignore"):
            rel = np.where(valid & spread, (s - lo) / np.where(spread, hi - lo, 1.0), np.where(valid, 1.0, 0.0))
        w_rel = ((1 - d) * (1 - c))[:, None]
        use_div = bool((d > 0).any())
        if use_div:
            v = np.asarray(self.item_vectors[np.maximum(rows, 0).ravel()], dtype=np.float64).reshape(b, n, -1)
            v /= np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-12)
        max_sim = np.zeros((b, n))
        use_cal = bool((c > 0).any())
        if use_cal:
            p = history_mix(histories, self.groups)[:, None, :]  # (B, 1, 3)
            onehot = np.eye(N_GROUPS)[self.groups[np.maximum(rows, 0)]]  # (B, N, 3)
            counts = np.zeros((b, N_GROUPS))
            has_history = np.array([len(h) > 0 for h in histories])[:, None]
        taken = ~valid
        picked = np.full((b, k), -1, dtype=np.int64)
        users = np.arange(b)
        for t in range(k):
            obj = w_rel * rel
            if use_div:
                obj = obj - d[:, None] * max_sim
            if use_cal:
                miscal = js_divergence(p, (counts[:, None, :] + onehot) / (t + 1))  # (B, N)
                obj = obj - c[:, None] * np.where(has_history, miscal, 0.0)  # no history, no mix to follow
            obj = np.where(taken, -np.inf, obj)
            j = np.argmax(obj, axis=1)  # the first maximum: ties go to the better-ranked candidate
            ok = np.isfinite(obj[users, j])
            picked[:, t] = np.where(ok, j, -1)
            taken[users[ok], j[ok]] = True
            if use_div:
                sim = np.einsum("bnd,bd->bn", v, v[users, j])
                max_sim = np.where(ok[:, None], np.maximum(max_sim, sim) if t else sim, max_sim)
            if use_cal:
                counts += np.where(ok[:, None], onehot[users, j], 0.0)
        return picked
