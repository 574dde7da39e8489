"""Per-user item sequences with deterministic id maps, and the leave-one-out split.

Internal item ids run 1..n_items; 0 is padding. The id maps are a pure function of the set of
external ids (integers sorted numerically, strings lexicographically), so the same log always
gives the same ids, whatever its row order.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from .log import InteractionLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceData:
    """Every user's interactions in time order, stored CSR-style."""

    user_ids: np.ndarray  # (U,) external user id of internal user u
    item_ids: np.ndarray  # (I+1,) external item id of internal item i; [0] is padding
    offsets: np.ndarray  # (U+1,) int64; user u's items are items[offsets[u]:offsets[u+1]]
    items: np.ndarray  # (N,) int64 internal item ids
    timestamps: np.ndarray  # (N,) float64
    timed: bool = True  # False: the log had no time column and `timestamps` are row positions

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]


def _sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values (sorted) and each row's index into them; numeric order for integer ids."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, inverse.reshape(-1)


def build_sequences(log_: InteractionLog, item_vocab: np.ndarray | None = None) -> SequenceData:
    """Map ids and sort each user's interactions by time (ties keep file order).

    With `item_vocab` (external ids of catalogue rows, e.g. a model version's id map) items
    keep that numbering; interactions with items outside it are removed and counted in a
    warning, since a model cannot rank items it has never seen.
    """
    if len(log_) == 0:
        raise ValueError(f"{log_.source}: no interactions")
    if item_vocab is not None:
        uniq, inv = _sorted_unique(log_.item)
        lookup = {v: i for i, v in enumerate(np.asarray(item_vocab).tolist())}
        uniq_rows = np.array([lookup.get(v, -1) for v in uniq.tolist()], dtype=np.int64)
        rows = uniq_rows[inv]
        known = rows >= 0
        if not known.all():
            log.warning(
                "%s: %d interactions with %d items unknown to the model's catalogue are not used",
                log_.source,
                int((~known).sum()),
                int((uniq_rows < 0).sum()),
            )
            log_, rows = log_.take(known), rows[known]
        user_ids, uidx = _sorted_unique(log_.user)
        iidx = rows + 1
        item_uniq = np.asarray(item_vocab)
    else:
        user_ids, uidx = _sorted_unique(log_.user)
        item_uniq, iidx = _sorted_unique(log_.item)
        iidx = iidx + 1  # 0 is padding
    # Stable lexsort: by user, then timestamp, then original row (stability keeps file order).
    order = np.lexsort((log_.timestamp, uidx))
    counts = np.bincount(uidx, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Index 0 is padding: 0 for integer ids, "" for string ids.
    pad = np.zeros(1, dtype=item_uniq.dtype) if item_uniq.dtype.kind in "iu" else np.array([""], dtype=item_uniq.dtype)
    item_ids = np.concatenate([pad, item_uniq])
    return SequenceData(
        user_ids=user_ids,
        item_ids=item_ids,
        offsets=offsets,
        items=iidx[order].astype(np.int64),
        timestamps=np.asarray(log_.timestamp, dtype=np.float64)[order],
        timed=log_.timed,
    )


@dataclass(frozen=True)
class EvalSet:
    """One evaluation target per user: rank `targets[j]` given `histories[j]`."""

    users: np.ndarray  # (E,) internal user ids
    targets: np.ndarray  # (E,) internal item ids
    hist_offsets: np.ndarray  # (E+1,) CSR offsets into hist_items
    hist_items: np.ndarray  # (H,) the history in time order; also the items excluded from ranking
    # Seconds (the log's timestamps) of each history item and of each target (the request time of
    # the ranker's time features); None when the log had no time column.
    hist_times: np.ndarray | None = None  # (H,) float64
    target_times: np.ndarray | None = None  # (E,) float64

    def __len__(self) -> int:
        return len(self.users)

    def history(self, j: int) -> np.ndarray:
        return self.hist_items[self.hist_offsets[j] : self.hist_offsets[j + 1]]

    def history_times(self, j: int) -> np.ndarray | None:
        """Seconds of history `j`'s items (None without timestamps)."""
        return None if self.hist_times is None else self.hist_times[self.hist_offsets[j] : self.hist_offsets[j + 1]]

    def subset(self, idx: np.ndarray) -> "EvalSet":
        """The targets at positions `idx` (e.g. a sample of users), in that order."""
        hists = [self.history(j) for j in idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in hists], out=offsets[1:])
        items = np.concatenate(hists) if hists else np.zeros(0, dtype=np.int64)
        times = target_times = None
        if self.hist_times is not None:
            parts = [self.history_times(j) for j in idx]
            times = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
            target_times = self.target_times[idx]
        return EvalSet(self.users[idx], self.targets[idx], offsets, items, times, target_times)


@dataclass(frozen=True)
class LeaveOneOut:
    """The quality protocol (docs/architecture.md): per user, the last item is test, the one before validation.

    Training sees each user's sequence without its last two items. Users with fewer than
    three interactions cannot give both targets: all their items go to training and they are
    not evaluated (counted in `n_train_only`).
    """

    data: SequenceData
    train_offsets: np.ndarray  # (U+1,) training prefix of each user within data.items
    valid: EvalSet
    test: EvalSet
    n_train_only: int

    def train_sequence(self, u: int) -> np.ndarray:
        start = self.data.offsets[u]
        return self.data.items[start : start + (self.train_offsets[u + 1] - self.train_offsets[u])]

    def train_lengths(self) -> np.ndarray:
        return np.diff(self.train_offsets)

    def train_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, row in data's arrays) of every training interaction, users in order, each in time order."""
        lengths = self.train_lengths()
        users = np.repeat(np.arange(len(lengths)), lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return users, self.data.offsets[users] + within

    def train_popularity(self) -> np.ndarray:
        """(I+1,) interaction counts in the training part; index 0 (padding) is 0."""
        _, rows = self.train_rows()
        return np.bincount(self.data.items[rows], minlength=self.data.n_items + 1).astype(np.int64)


def _eval_set(data: SequenceData, users: np.ndarray, drop_last: int) -> EvalSet:
    """With `drop_last` items hidden from the end: target = the last visible item, history = the rest."""
    ends = data.offsets[users + 1] - drop_last  # exclusive end of the visible sequence incl. target
    starts = data.offsets[users]
    targets = data.items[ends - 1]
    hist_len = ends - 1 - starts
    hist_offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(hist_len, out=hist_offsets[1:])
    idx = np.repeat(starts, hist_len) + (np.arange(hist_offsets[-1]) - np.repeat(hist_offsets[:-1], hist_len))
    times = (data.timestamps[idx], data.timestamps[ends - 1]) if data.timed else (None, None)
    return EvalSet(users, targets, hist_offsets, data.items[idx], *times)


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    lengths = data.lengths
    eligible = np.flatnonzero(lengths >= 3)
    train_len = np.where(lengths >= 3, lengths - 2, lengths)
    train_offsets = np.zeros(data.n_users + 1, dtype=np.int64)
    np.cumsum(train_len, out=train_offsets[1:])
    n_train_only = int(data.n_users - len(eligible))
    if n_train_only:
        log.info("%d users have fewer than 3 interactions: used for training only", n_train_only)
    return LeaveOneOut(
        data=data,
        train_offsets=train_offsets,
        valid=_eval_set(data, eligible, drop_last=1),
        test=_eval_set(data, eligible, drop_last=0),
        n_train_only=n_train_only,
    )


def hold_out_last(split: LeaveOneOut, r: int) -> LeaveOneOut:
    """`split` with each user's last `r` training interactions taken out of training; data,
    validation and test are the same objects.

    An encoder trained on the result has never fit those interactions, so its candidates for
    them look like the ones it serves (export/ranker_train.py trains the ranker on them). A user
    keeps at least one training interaction: one with r or fewer gives up all but its first.
    """
    if r < 1:
        raise ValueError(f"hold out at least one interaction per user, got r = {r}")
    lengths = split.train_lengths()
    kept = np.where(lengths > r, lengths - r, np.minimum(lengths, 1))
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    return dataclasses.replace(split, train_offsets=offsets)


def extend_catalogue(data: SequenceData, extra_ids: np.ndarray) -> SequenceData:
    """The same sequences over a catalogue that also holds `extra_ids` (items without interactions,
    such as new items of an item-feature file). The id map stays a pure function of the set of ids
    (sorted as build_sequences sorts), so known items may move to other rows; `extra_ids` must have
    the catalogue's kind of id (integers or strings)."""
    current = data.item_ids[1:]
    extra = np.asarray(extra_ids)
    if len(extra) and (extra.dtype.kind in "iu") != (current.dtype.kind in "iu"):
        raise ValueError(f"catalogue ids are {current.dtype}, the extra ids {extra.dtype}: convert them first")
    new = np.setdiff1d(extra, current)
    if not len(new):
        return data
    merged = np.union1d(current, new)
    lookup = np.concatenate([[0], np.searchsorted(merged, current) + 1]).astype(np.int64)  # old id -> new id
    return SequenceData(
        user_ids=data.user_ids,
        item_ids=np.concatenate([data.item_ids[:1].astype(merged.dtype), merged]),
        offsets=data.offsets,
        items=lookup[data.items],
        timestamps=data.timestamps,
        timed=data.timed,
    )


def hold_out_items(split: LeaveOneOut, rows: np.ndarray) -> LeaveOneOut:
    """`split` with catalogue rows `rows` (0-based) taken out of the training part: those items get no
    training interaction (cold), while every validation and test target and history stays as it was
    (a user may still have met a held-out item before the target). For measuring cold start."""
    data = split.data
    held = np.zeros(data.n_items + 1, dtype=bool)
    held[np.asarray(rows, dtype=np.int64) + 1] = True
    lengths, train_len = data.lengths, split.train_lengths()
    user = np.repeat(np.arange(data.n_users), lengths)
    in_train = np.arange(len(data.items)) - data.offsets[user] < train_len[user]
    keep = ~(in_train & held[data.items])
    kept = np.bincount(user[keep], minlength=data.n_users)
    offsets = np.zeros(data.n_users + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    dropped = np.bincount(user[~keep], minlength=data.n_users)
    train_offsets = np.zeros(data.n_users + 1, dtype=np.int64)
    np.cumsum(train_len - dropped, out=train_offsets[1:])
    held_data = SequenceData(
        data.user_ids, data.item_ids, offsets, data.items[keep], data.timestamps[keep], timed=data.timed
    )
    return LeaveOneOut(held_data, train_offsets, split.valid, split.test, split.n_train_only)
