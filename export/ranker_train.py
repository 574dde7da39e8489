"""Training the ranker on stage one's own output, early-stopped on the two-stage validation NDCG@10.

Samples come from the training part only. For a user whose training sequence is s (the
validation and test targets are not in it), a sample cuts s at a recent position t: the
prefix s[:t] is the history, s[t] the target. Stage one (a frozen encoder and a FAISS index over
its items, seen items excluded as at serving time) gives the prefix's top-N candidates: hard
negatives.

Which encoder gives them matters. The served encoder was trained on every training target, so
on those it is over-confident (on ml-100k 90% of them are in its top 200, against 80% of test
targets) and a ranker trained there learns to trust stage one more than it should. With
`holdout` r > 0 the targets are each user's last r training interactions instead, and their
candidates come from a second encoder trained without them (`hold_out_last`): stage one has never
fit those targets, as at serving time. Validation always uses the served encoder.

Only prefixes whose true item retrieval found are kept, so the true item is always among the
candidates, and a listwise softmax over them teaches the ranker to re-order what retrieval
returns. (Adding a missed target in an extra slot would leak: it would be the one candidate
scored below stage one's cut-off, which the ranker learns to spot and which never occurs when
serving; it measurably hurt validation NDCG on MovieLens.) A target that
already occurs in its prefix is skipped: serving never ranks seen items.

With timestamps in the log, every sample carries its history's timestamps and a request time, the
target's timestamp (the moment the user came back for the next item), for a ranker with time
features; validation does the same with the validation target's timestamp.

Validation runs the pipeline that will be served: the validation users' histories through
stage one's top-N and the ranker, NDCG@10 of the re-ordered list. Epoch 0 (before any step)
is stage one's own order, since the ranker starts as retrieval; epoch 1 fits the wide part alone
(`fit_wide`, L-BFGS), then Adam trains everything; the best epoch is kept.

With the cf feature, each sample also carries its candidates' collaborative scores from an EASE
B that never saw its target (`with_cf`, export/ease.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from attnrec.engine.index import ItemIndex
from attnrec.engine.pipeline import pad_histories, search

from .config import RankerConfig
from .data.sequences import EvalSet, LeaveOneOut
from .model import SASRec
from .ranker_model import RankerShape, TargetAttentionRanker

log = logging.getLogger(__name__)


@dataclass
class CandidateSets:
    """Histories with stage one's candidates, and the frozen encoder's states the ranker reads.

    tokens/hidden: (S, K) / (S, K, D), the most recent K = attend_last positions, left-padded
    (the encoder is frozen, so its states are computed once, not every epoch);
    candidates/scores: (S, W) tokens / inner-product scores, 0 / 0.0 in empty slots;
    target_slot: (S,) the slot of the true item, or -1 when it is not among them;
    users: (S,) the internal user of each set;
    user_features: (S, F) the user's side-feature codes (None without user features);
    times / request_time: (S, K) int64 seconds of the positions of `tokens` (0 at padding) / (S, 1)
    the request's time, the target's timestamp (None when the log has no timestamps);
    cf: (S, W) the candidates' item-item collaborative scores from a B that never saw the target
    (export/ease.py; None without the cf feature).
    """

    tokens: np.ndarray
    hidden: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    target_slot: np.ndarray
    users: np.ndarray | None = None
    user_features: np.ndarray | None = None
    times: np.ndarray | None = None
    request_time: np.ndarray | None = None
    cf: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target_slot)

    def take(self, idx: np.ndarray) -> "CandidateSets":
        parts = (self.tokens, self.hidden, self.candidates, self.scores, self.target_slot)
        rest = (self.users, self.user_features, self.times, self.request_time, self.cf)
        return CandidateSets(*(a[idx] for a in parts), *(None if a is None else a[idx] for a in rest))

    def with_user_features(self, user_codes: np.ndarray) -> "CandidateSets":
        """These sets with their users' feature codes, from `user_codes` (U + 1, F) indexed by user + 1."""
        return dataclasses.replace(self, user_features=np.ascontiguousarray(user_codes[self.users + 1], np.int64))


@dataclass(frozen=True)
class StageOne:
    """A frozen encoder and a FAISS index over its own item vectors: what gives a history its candidates."""

    encode: "Encode"
    max_len: int
    index: ItemIndex
    item_vectors: np.ndarray


def heldout_positions(split: LeaveOneOut, holdout: LeaveOneOut) -> tuple[np.ndarray, np.ndarray]:
    """(user, cut) pairs of the interactions that `split` trains on and `holdout` (hold_out_last) does
    not, t ≥ 1 and whose item is not in the prefix before it (so it can be ranked)."""
    users, cuts = [], []
    full, kept = split.train_lengths(), holdout.train_lengths()
    for u in np.flatnonzero(full > kept):
        s = split.train_sequence(u)
        for t in range(max(int(kept[u]), 1), int(full[u])):
            if s[t] not in s[:t]:
                users.append(u)
                cuts.append(t)
    return np.asarray(users, dtype=np.int64), np.asarray(cuts, dtype=np.int64)


def training_prefixes(split: LeaveOneOut, samples_per_user: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, cut) pairs from the training part: each user's most recent `samples_per_user`
    positions t ≥ 1 whose item is not in the prefix before it (so it can be ranked)."""
    users, cuts = [], []
    for u in range(split.data.n_users):
        s = split.train_sequence(u)
        for t in range(len(s) - 1, max(0, len(s) - 1 - samples_per_user), -1):
            if t >= 1 and s[t] not in s[:t]:
                users.append(u)
                cuts.append(t)
    return np.asarray(users, dtype=np.int64), np.asarray(cuts, dtype=np.int64)


def seconds(timestamps: np.ndarray) -> np.ndarray:
    """The log's float64 timestamps as the ranker's int64 seconds (≤ 0 reads as unknown)."""
    return np.floor(np.asarray(timestamps, dtype=np.float64)).astype(np.int64)


Encode = Callable[[np.ndarray], dict[str, np.ndarray]]  # tokens (B, L) → {"query": (B, D), "hidden": (B, L, D)}


def torch_encode(model: SASRec) -> Encode:
    """The torch encoder as an `Encode` (publish passes the exported ONNX encoder's `run`)."""

    def run(tokens: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            h = model.eval().hidden(torch.from_numpy(tokens)).numpy()
        return {"query": h[:, -1], "hidden": h}

    return run


def stage_one(
    encode: Encode,
    max_len: int,
    index: ItemIndex,
    item_vectors: np.ndarray,
    full_histories: list[np.ndarray],
    targets: np.ndarray,
    n: int,
    attend_last: int,
    *,
    batch_size: int = 256,
    history_times: list[np.ndarray] | None = None,
    request_times: np.ndarray | None = None,
) -> CandidateSets:
    """Top-n candidates of each history (tokens), the whole history excluded, as the pipeline does.

    `encode` is the frozen encoder with its hidden states (the ONNX one at publish time: the
    very numbers the server computes). `history_times` (seconds per history item) and
    `request_times` (per history) give the sets their `times` and `request_time`.
    """
    width = n
    size = len(targets)
    cands = np.zeros((size, width), dtype=np.int64)
    scores = np.zeros((size, width), dtype=np.float32)
    slot = np.full(size, -1, dtype=np.int64)
    tokens = np.zeros((size, attend_last), dtype=np.int64)
    times = None if history_times is None else np.zeros((size, attend_last), dtype=np.int64)
    hidden = None
    for s in range(0, size, batch_size):
        hist = full_histories[s : s + batch_size]
        sl = slice(s, s + len(hist))
        padded = pad_histories(hist, max_len)
        outs = encode(padded)
        q = outs["query"]
        # An encoder without `hidden` (a ranker over its own item embeddings) stores none: (S, K, 0).
        h = outs.get("hidden", np.zeros((len(hist), padded.shape[1], 0), np.float32))
        if hidden is None:
            hidden = np.zeros((size, attend_last, h.shape[2]), dtype=np.float32)
        t = min(attend_last, padded.shape[1])
        tokens[sl, attend_last - t :] = padded[:, -t:]
        if times is not None:
            stamps = pad_histories([seconds(x) for x in history_times[s : s + batch_size]], max_len)
            times[sl, attend_last - t :] = stamps[:, -t:]
        hidden[sl, attend_last - t :] = np.where(padded[:, -t:, None] > 0, h[:, -t:], 0.0)
        sc, rows = search(index, q, n, exclude=[x - 1 for x in hist])
        ok = rows >= 0
        cands[sl, :n] = np.where(ok, rows + 1, 0)
        scores[sl, :n] = np.where(ok, sc, 0.0)
        tgt = targets[sl]
        hit = rows == (tgt - 1)[:, None]
        found = hit.any(axis=1)
        slot[sl] = np.where(found, hit.argmax(axis=1), -1)
    if hidden is None:
        hidden = np.zeros((0, attend_last, item_vectors.shape[1]), dtype=np.float32)
    now = None if request_times is None else seconds(request_times).reshape(-1, 1)
    return CandidateSets(tokens, hidden, cands, scores, slot, times=times, request_time=now)


def training_samples(
    split: LeaveOneOut,
    encode: Encode,
    max_len: int,
    index: ItemIndex,
    item_vectors: np.ndarray,
    cfg: RankerConfig,
    *,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[CandidateSets, int]:
    """The prefixes whose target stage one retrieves, with their candidates; and how many prefixes there were.
    `positions`: (user, cut) pairs (default: `training_prefixes`)."""
    users, cuts = positions if positions is not None else training_prefixes(split, cfg.samples_per_user)
    starts = split.data.offsets[users]
    hist = [split.data.items[a : a + t] for a, t in zip(starts, cuts)]
    targets = split.data.items[starts + cuts]
    n, k = cfg.n_candidates, cfg.attend_last
    times = {}
    if split.data.timed:  # the request time of a sample is its target's timestamp
        ts = split.data.timestamps
        times = {"history_times": [ts[a : a + t] for a, t in zip(starts, cuts)], "request_times": ts[starts + cuts]}
    sets = stage_one(encode, max_len, index, item_vectors, hist, targets, n, k, **times)
    sets = dataclasses.replace(sets, users=users)
    return sets.take(np.flatnonzero(sets.target_slot >= 0)), len(sets)


@dataclass(frozen=True)
class Memorisation:
    """How much more often stage one retrieves its own training targets than validation targets."""

    train_recall: float  # share of sampled users' last training interactions in stage one's top-N
    valid_recall: float  # the same for sampled validation targets
    train_users: int
    valid_users: int

    @property
    def ratio(self) -> float:
        return self.train_recall / max(self.valid_recall, 1e-9)


def memorisation(
    split: LeaveOneOut, s1: StageOne, cfg: RankerConfig, *, users: int = 2000, seed: int = 0
) -> Memorisation:
    """Stage one's recall@cfg.n_candidates of each sampled user's last training interaction (the prefix
    before it as the history) against that of validation targets: far above 1, the ranker's recent-prefix
    samples are targets the encoder memorised (RankerConfig.holdout_auto). Its own random stream: the
    ranker's sampling is the same with the probe as without."""
    rng = np.random.default_rng(seed)
    t_users, cuts = training_prefixes(split, 1)
    pick = np.sort(rng.choice(len(t_users), min(users, len(t_users)), replace=False))
    found, n_train = training_samples(
        split, s1.encode, s1.max_len, s1.index, s1.item_vectors, cfg, positions=(t_users[pick], cuts[pick])
    )
    val = split.valid
    if len(val) > users:
        val = val.subset(np.sort(rng.choice(len(val), users, replace=False)))
    valid = eval_candidates(val, s1.encode, s1.max_len, s1.index, s1.item_vectors, cfg)
    train_recall = len(found) / n_train if n_train else 0.0
    valid_recall = float((valid.target_slot >= 0).mean()) if len(valid) else 0.0
    return Memorisation(train_recall, valid_recall, n_train, len(valid))


def eval_candidates(
    es: EvalSet, encode: Encode, max_len: int, index: ItemIndex, item_vectors: np.ndarray, cfg: RankerConfig
) -> CandidateSets:
    hist = [es.history(j) for j in range(len(es))]
    n, k = cfg.n_candidates, cfg.attend_last
    times = {}
    if es.hist_times is not None:
        times = {"history_times": [es.history_times(j) for j in range(len(es))], "request_times": es.target_times}
    sets = stage_one(encode, max_len, index, item_vectors, hist, es.targets, n, k, **times)
    return dataclasses.replace(sets, users=es.users)


def _batch(sets: CandidateSets, idx: np.ndarray) -> tuple[torch.Tensor | None, ...]:
    parts = (sets.tokens, sets.hidden, sets.candidates, sets.scores, sets.user_features, sets.times, sets.request_time)
    parts += (sets.cf,)
    return tuple(None if a is None else torch.from_numpy(a[idx]) for a in parts)


def ranked_ndcg(ranker: TargetAttentionRanker, sets: CandidateSets, k: int = 10) -> float:
    """NDCG@k of the ranker's order of each set's candidates (a miss when the target is not among them)."""
    gains = ranked_gains(ranker, sets, k)
    return float(gains.mean()) if len(gains) else 0.0


def gain_z(gains: np.ndarray, base: np.ndarray) -> float:
    """The paired z statistic of the mean per-user NDCG gain over `base`: mean / standard error
    (0 without a difference; +inf for the same gain on every user)."""
    d = np.asarray(gains, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(d) < 2 or not d.any():
        return 0.0
    se = d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() / se) if se > 0 else float(np.sign(d.mean()) * np.inf)


@torch.no_grad()
def ranked_gains(ranker: TargetAttentionRanker, sets: CandidateSets, k: int = 10) -> np.ndarray:
    """Per set, the NDCG@k of the ranker's order of its candidates (0 when the target is not among them)."""
    was = ranker.training
    ranker.eval()
    gains = []
    for s in range(0, len(sets), 256):
        idx = np.arange(s, min(s + 256, len(sets)))
        out = ranker(*_batch(sets, idx))
        cands = torch.from_numpy(sets.candidates[idx])
        out = out.masked_fill(cands == 0, float("-inf"))
        order = torch.argsort(out, dim=1, descending=True, stable=True)[:, :k].numpy()
        slot = sets.target_slot[idx]
        pos = np.where((order == slot[:, None]) & (slot[:, None] >= 0))
        g = np.zeros(len(idx))
        g[pos[0]] = 1.0 / np.log2(pos[1] + 2.0)
        gains.append(g)
    ranker.train(was)
    return np.concatenate(gains) if gains else np.zeros(0)


def training_pairs(split: LeaveOneOut) -> tuple[np.ndarray, np.ndarray]:
    """(user, item token) of every interaction in the training part."""
    users, rows = split.train_rows()
    return users, split.data.items[rows]


@torch.no_grad()
def _wide_split(ranker: TargetAttentionRanker, sets: CandidateSets) -> tuple[torch.Tensor, torch.Tensor]:
    """(the wide part's inputs (S, N, W), the scores without the wide part (S, N), -inf at empty slots)."""
    k = ranker.shape.attend_last
    xs, rest = [], []
    for s in range(0, len(sets), 256):
        batch = _batch(sets, np.arange(s, min(s + 256, len(sets))))
        history, candidates, request_time, cf = batch[0], batch[2], batch[6], batch[7]
        x = ranker.wide_inputs(history[:, -k:], candidates, request_time, cf)[0]
        out = ranker(*batch) - ranker.wide(x).squeeze(-1)
        xs.append(x)
        rest.append(out.masked_fill(candidates == 0, float("-inf")))
    return torch.cat(xs), torch.cat(rest)


def fit_wide(ranker: TargetAttentionRanker, sets: CandidateSets, l2: float = 1e-3, max_iter: int = 100) -> np.ndarray:
    """Fit the wide layer alone, the rest as it is (at the start: zero, so scores = stage one + wide), by
    full-batch L-BFGS of the listwise softmax loss on the sets; returns (and sets) its weights."""
    was = ranker.training
    ranker.eval()
    x, base = _wide_split(ranker, sets)
    y = torch.from_numpy(sets.target_slot)
    w = ranker.wide.weight.detach().clone().reshape(-1).requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(base + x @ w, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ranker.wide.weight.copy_(w.detach().reshape(1, -1))
    ranker.train(was)
    return w.detach().numpy()


def trend_table(split: LeaveOneOut):
    """export/trend.py's table of the training part (the counts serving reads too)."""
    from . import trend

    _, rows = split.train_rows()
    return trend.build(split.data.items[rows], seconds(split.data.timestamps[rows]), split.data.n_items + 1)


def with_cf(
    split: LeaveOneOut,
    held: LeaveOneOut | None,
    samples: CandidateSets,
    val_sets: CandidateSets,
    cfg: RankerConfig,
    shape: RankerShape,
):
    """The sets with their candidates' collaborative scores, and the served EASE neighbours (fitted on
    the whole training part, λ chosen on validation). Samples are scored by a B that never saw their
    targets: for hold-out samples the hold-out split's (`held`), else one without the sample's user."""
    from . import ease

    t0 = time.perf_counter()
    n_users, n_tokens = split.data.n_users, split.data.n_items + 1
    users, items = training_pairs(split)
    x = ease.interaction_matrix(users, items, n_users, n_tokens)
    lam, b = ease.choose_lambda(x, split.valid.users, split.valid.targets, cfg.cf_lambda or None)
    served = ease.sparsify(b, shape.cf_neighbours, lam)
    del b
    val_sets = dataclasses.replace(val_sets, cf=ease.scores(served, val_sets.tokens, val_sets.candidates))
    if held is not None:
        hu, hi = training_pairs(held)
        hb = ease.sparsify(ease.fit(ease.interaction_matrix(hu, hi, n_users, n_tokens), lam), shape.cf_neighbours, lam)
        cf, how = ease.scores(hb, samples.tokens, samples.candidates), "the hold-out split's B"
    else:
        cf = ease.cross_fitted(
            users,
            items,
            n_users,
            n_tokens,
            lam,
            shape.cf_neighbours,
            samples.users,
            samples.tokens,
            samples.candidates,
            seed=cfg.seed,
        )
        how = f"B without the sample's user ({ease.FOLDS} user folds)"
    log.info(
        "ranker cf: EASE lambda %g, %d neighbours per item; samples scored by %s; %.0fs",
        lam,
        shape.cf_neighbours,
        how,
        time.perf_counter() - t0,
    )
    return dataclasses.replace(samples, cf=cf), val_sets, served


@dataclass
class RankerResult:
    ranker: TargetAttentionRanker
    best_epoch: int  # 0: the ranker never beat stage one's own order on validation
    best_valid_ndcg10: float
    stage1_valid_ndcg10: float
    epochs_run: int
    seconds: float
    samples: int
    samples_target_retrieved: float  # share of training samples whose target stage one found
    history: list[dict] = field(default_factory=list)
    valid_gain_z: float = 0.0  # the best epoch's paired validation gain over stage one, in standard errors
    rejected_epoch: int = 0  # the best epoch when its gain fell below min_gain_z (then best_epoch is 0)


def train_ranker(
    split: LeaveOneOut,
    encode: Encode,
    max_len: int,
    index: ItemIndex,
    item_vectors: np.ndarray,
    cfg: RankerConfig,
    shape: RankerShape,
    *,
    holdout: tuple[LeaveOneOut, StageOne] | None = None,
    item_codes: np.ndarray | None = None,
    user_codes: np.ndarray | None = None,
    trend=None,
) -> RankerResult:
    """`holdout`: the hold_out_last split and the stage one trained on it, whose candidates for the
    held-out interactions are the samples (None: recent training prefixes, the served stage one's);
    `item_codes` (I + 1, F) / `user_codes` (U + 1, F): the coded feature matrices (engine/ranker.py
    `coded_matrix`) that `shape`'s item and user columns describe; trend: the `trend_table` of the
    training part, when `shape` has trend features."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if holdout is None:
        samples, n_prefixes = training_samples(split, encode, max_len, index, item_vectors, cfg)
        source = "recent training prefixes, the served encoder's candidates"
    else:
        hsplit, s1 = holdout
        samples, n_prefixes = training_samples(
            split,
            s1.encode,
            s1.max_len,
            s1.index,
            s1.item_vectors,
            cfg,
            positions=heldout_positions(split, hsplit),
        )
        source = "held-out interactions, candidates of the encoder trained without them"
    if not len(samples):
        raise ValueError("no training prefixes for the ranker: every user's training part is too short")
    val = split.valid
    if len(val) > cfg.val_users:
        val = val.subset(np.sort(rng.choice(len(val), cfg.val_users, replace=False)))
    val_sets = eval_candidates(val, encode, max_len, index, item_vectors, cfg)
    if shape.user_columns:
        if user_codes is None:
            raise ValueError("a ranker with user columns needs the user feature codes")
        samples, val_sets = samples.with_user_features(user_codes), val_sets.with_user_features(user_codes)
    if shape.reads_clock and (samples.times is None or val_sets.times is None):
        raise ValueError("a ranker with time or trend features needs a log with timestamps")
    if not shape.reads_clock:  # what the ranker does not read stays out of its batches
        samples = dataclasses.replace(samples, times=None, request_time=None)
        val_sets = dataclasses.replace(val_sets, times=None, request_time=None)
    retrieved = len(samples) / max(n_prefixes, 1)
    log.info(
        "ranker: %d training samples (%s; kept: target in stage one's top-%d, %.1f%%), %d validation users; %.0fs",
        len(samples),
        source,
        cfg.n_candidates,
        100 * retrieved,
        len(val),
        time.perf_counter() - t0,
    )

    neighbours = None
    if shape.cf_neighbours:
        samples, val_sets, neighbours = with_cf(
            split, None if holdout is None else holdout[0], samples, val_sets, cfg, shape
        )
        shape = dataclasses.replace(shape, cf_lambda=neighbours.lam)
    if shape.trend_features and trend is None:
        raise ValueError("a ranker with trend features needs the training part's trend table")
    pop = split.train_popularity()[1:]
    ranker = TargetAttentionRanker(shape, torch.from_numpy(item_vectors), pop, item_codes, neighbours, trend)
    # The id embeddings start as the encoder's and are most of the ranker's weights: at the rate of the rest
    # they re-fit the training users' items (validation peaks after a few epochs while the loss keeps
    # falling); `embedding_lr_scale` slows them (0: frozen at the encoder's).
    emb = [ranker.item_emb.weight]
    rest = [q for q in ranker.parameters() if q is not ranker.item_emb.weight]
    groups = [{"params": rest}, {"params": emb, "lr": cfg.lr * cfg.embedding_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base = ranked_gains(ranker, val_sets)
    stage1 = best = float(base.mean()) if len(base) else 0.0
    best_gains = base
    best_epoch, bad, history = 0, 0, [{"epoch": 0, "valid_ndcg@10": best}]
    best_state = {k: v.clone() for k, v in ranker.state_dict().items()}
    initial = best_state  # stage one's order exactly (the MLP's last layer starts at zero)
    log.info("ranker epoch 0 (stage one's order): valid NDCG@10 %.4f", best)
    # Epoch 1 fits the wide part alone, to convergence (full-batch L-BFGS over a few weights): Adam at the
    # MLP's rate moves each weight by ~lr per step, too little in a few epochs for weights of order 1.
    epoch = 0
    if cfg.wide_fit:
        epoch = 1
        weights = fit_wide(ranker, samples)
        gains = ranked_gains(ranker, val_sets)
        ndcg = float(gains.mean()) if len(gains) else 0.0
        named = {f"wide {n}": round(float(w), 4) for n, w in zip(ranker.wide_names(), weights)}
        history.append({"epoch": 1, "valid_ndcg@10": ndcg, **named})
        if ndcg > best:
            best, best_epoch, best_gains = ndcg, 1, gains
            best_state = {k: v.clone() for k, v in ranker.state_dict().items()}
        log.info(
            "ranker epoch 1 (the wide part alone, weights %s): valid NDCG@10 %.4f (stage one %.4f)",
            ", ".join(f"{k[5:]} {v:+.3f}" for k, v in named.items()),
            ndcg,
            stage1,
        )
    n_batches = -(-len(samples) // cfg.batch_size)
    while epoch < cfg.epochs and bad < cfg.patience:
        ranker.train()
        order = rng.permutation(len(samples))
        total = 0.0
        for b in range(n_batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            batch = _batch(samples, idx)
            logits = ranker(*batch).masked_fill(batch[2] == 0, float("-inf"))
            loss = F.cross_entropy(logits, torch.from_numpy(samples.target_slot[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        epoch += 1
        gains = ranked_gains(ranker, val_sets)
        ndcg = float(gains.mean()) if len(gains) else 0.0
        history.append({"epoch": epoch, "loss": total / n_batches, "valid_ndcg@10": ndcg})
        if ndcg > best:
            best, best_epoch, bad, best_gains = ndcg, epoch, 0, gains
            best_state = {k: v.clone() for k, v in ranker.state_dict().items()}
        else:
            bad += 1
        log.info(
            "ranker epoch %d: loss %.4f, valid NDCG@10 %.4f (stage one %.4f; best %.4f at epoch %d)",
            epoch,
            total / n_batches,
            ndcg,
            stage1,
            best,
            best_epoch,
        )
    # The best epoch is the maximum of noisy validation values: on a few thousand users a ranker that
    # learned nothing still "wins" by chance (ml-100k: +0.9% on validation, -2% on test). It ships
    # only when its paired per-user gain clears `min_gain_z` standard errors; else stage one's order.
    z = gain_z(best_gains, base)
    rejected = 0
    if best_epoch and z < cfg.min_gain_z:
        log.info(
            "ranker: epoch %d's validation gain %+.4f is %.2f standard errors (< --ranker-min-gain-z %.2f): "
            "shipping stage one's order",
            best_epoch,
            best - stage1,
            z,
            cfg.min_gain_z,
        )
        rejected, best_epoch, best = best_epoch, 0, stage1
        best_state = {k: v.clone() for k, v in initial.items()}
    ranker.load_state_dict(best_state)
    ranker.eval()
    return RankerResult(
        ranker,
        best_epoch,
        best,
        stage1,
        epoch,
        time.perf_counter() - t0,
        len(samples),
        retrieved,
        history,
        valid_gain_z=z,
        rejected_epoch=rejected,
    )
