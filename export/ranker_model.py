"""The second-stage ranker: each candidate attends over the user's encoded history (target attention).

The family of DIN (Zhou et al., KDD 2018) and BST (Chen et al., 2019). For candidate i and
history position j, α_ij = softmax_j(k_j · W v_i), with v_i the candidate's embedding and k_j
the SASRec encoder's hidden state at j plus a learned recency embedding (position counted
from the most recent item), over the `attend_last` most recent positions. The attended
history a_i = Σ_j α_ij h_j, the candidate embedding, their interactions and a few scalar
features feed a small MLP whose output is *added* to stage one's score: the ranker learns a
correction to retrieval, and with its last layer at zero it starts as retrieval exactly.

The history is encoded once per user (the encoder's `hidden` output) and all N candidates are
scored in one pass: the cost grows as history × candidates × dim, never as N transformer passes
(and the history term is capped at `attend_last`).

Features the retrieval model cannot use: the item's training popularity (a buffer baked into
the graph), the candidate's stage-one score relative to the best candidate and standardised over
the list, recency-aware attention, and side features when the version has them. Item features
(each coded column's embeddings, a multi-valued column mean-pooled) are baked into the graph as
a token-indexed table, like popularity, and added to the ranker's item representation through a
projection that starts at zero: candidates and the attended history both carry them. User
features arrive as the optional input `user_features` (engine/ranker.py; all zeros = unknown):
projected to the item width, they enter the MLP alone and times the candidate. Training drops
either group per sample (`feature_dropout`), so a request without them scores sensibly.

Time and context (`RankerShape.time`, from the optional inputs `history_timestamps` (B, L) and
`request_time` (B, 1), seconds; ≤ 0 = unknown): each history item's age at the request time,
log-bucketed (`time_codes`), is embedded into the attention keys beside the recency embedding, so
a candidate can attend more to what the user did an hour ago than to what they did a year ago at
the same position; the time since the previous interaction (the newest item's age), the hour of
day and the day of week of the request (UTC) are embedded, projected to the item width and enter
the MLP alone and times the candidate (like user features). Everything is integer arithmetic on
int64 seconds (no float32 rounding of 1.7e9, exact ONNX/torch parity). Training drops the whole
group per sample, and separately only the history's timestamps (`feature_dropout`), so a request
without timestamps, or with the clock only, scores as trained. Not used: the recency of the
candidate in the history (seen items are never candidates: stage one excludes them).

Item-item collaborative score (`RankerShape.cf_neighbours` > 0; export/ease.py): EASE's weights,
each token's strongest `cf_neighbours`, are baked into the graph; the attended history's weights
are scatter-added into a catalogue-wide vector and read at the candidates (O(history × k +
catalogue) per user). The score, standardised over the list, is added to the output with a learned
weight that starts at zero, and it enters the MLP with the other scalars. In training the score
comes precomputed (`cf_scores`) from a B that never saw the sample's target.

Trend (`RankerShape.trend_features` > 0; export/trend.py): each item's training interactions
accumulated per time bucket are baked into the graph; at the request time's bucket the candidate's
recent counts (a day, a week, a month), its count so far, whether it had none yet (a film not yet
released) and its age are read by integer lookups. Unknown request time: all zero.

The wide part: the standardised collaborative score, the trend features and the log popularity
also enter the output through one linear layer that starts at zero (Wide & Deep, Cheng et al.
2016): a handful of weights that a few thousand samples can fit, where the MLP over embeddings
needs many more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_BLOCKED = -1e9  # finite, as in the encoder: a row of padding keys stays NaN-free
TIME_BUCKETS = 32  # age codes 1..31 = 1 + floor(log2(1 + seconds)), capped at 2**30 s (34 years); 0 = unknown
SECONDS_PER_DAY, SECONDS_PER_HOUR = 86_400, 3_600
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def features(shape: "RankerShape") -> list[str]:
    """What the ranker reads, for the manifest."""
    own = shape.keys == "items"
    side = []
    if shape.item_columns:
        side.append(f"item side features ({', '.join(c.name for c in shape.item_columns)}), baked into the graph")
    if shape.user_columns:
        side.append(f"user side features ({', '.join(c.name for c in shape.user_columns)}), optional input")
    if shape.cf_neighbours:
        side.append(
            "item-item collaborative score of the candidate given the attended history (EASE, its "
            f"{shape.cf_neighbours} strongest neighbours per item), baked into the graph"
        )
    if shape.trend_features:
        side.append(
            "the candidate's training interactions before the request time: in the last day, week and month, "
            "in all, none yet, days since the first (baked counts per time bucket)"
        )
    if shape.time:
        side += [
            "age of each history item at the request time (log2 buckets), in the attention keys; optional input",
            "time since the previous interaction, hour of day and day of week (UTC) of the request; optional input",
        ]
    return [
        f"target attention of the candidate over the {shape.attend_last} most recent history items "
        + ("(the ranker's own item embeddings)" if own else "(the encoder's hidden states)")
        + " with a recency embedding",
        "candidate embedding (initialised from the encoder's item embeddings)",
        "candidate × attended history" + ("" if own else ", candidate × query (the last hidden state)"),
        "stage-one score: raw (residual), relative to the best candidate, standardised over the list",
        "log training popularity of the candidate",
        *side,
        *([f"item features x (user features, request context) cross, rank {shape.cross_dim}"] if shape.crossed else []),
    ]


@dataclass(frozen=True)
class FeatureColumn:
    """One coded side-feature column as the ranker embeds it: `n_codes` values (0 = unknown) in
    `width` slots (more than one for a multi-valued column)."""

    name: str
    n_codes: int
    width: int


def coded_columns(table) -> tuple[FeatureColumn, ...]:
    """The coded columns of an engine FeatureTable (text columns are a content encoder's, not ours)."""
    from attnrec.engine.features import CodedColumn

    if table is None:
        return ()
    return tuple(FeatureColumn(c.name, len(c.vocab), c.width) for c in table.columns if isinstance(c, CodedColumn))


class CodedEmbedding(nn.Module):
    """Codes (..., W) of several columns side by side → (..., n_columns * dim): each column's
    embedding, mean-pooled over its filled slots; unknown (0) and out-of-range codes embed to 0."""

    def __init__(self, columns: tuple[FeatureColumn, ...], dim: int) -> None:
        super().__init__()
        widths = [c.width for c in columns]
        # One table for all columns: a column's code c > 0 lives at row offset + c; row 0 is the zero vector.
        offsets = np.cumsum([0] + [c.n_codes - 1 for c in columns])[:-1]
        self.register_buffer("slot_offset", torch.tensor(np.repeat(offsets, widths), dtype=torch.long))
        self.register_buffer("slot_codes", torch.tensor(np.repeat([c.n_codes for c in columns], widths)))
        member = np.zeros((len(columns), sum(widths)), dtype=np.float32)
        for i, (start, w) in enumerate(zip(np.cumsum([0] + widths)[:-1], widths)):
            member[i, start : start + w] = 1.0
        self.register_buffer("member", torch.from_numpy(member))  # (C, W): which slots pool into a column
        self.emb = nn.Embedding(1 + sum(c.n_codes - 1 for c in columns), dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.1)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.out_dim = len(columns) * dim

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        ok = (codes > 0) & (codes < self.slot_codes)  # a code the vocabulary lacks is unknown, not an error
        e = self.emb(torch.where(ok, codes + self.slot_offset, torch.zeros_like(codes)))  # (..., W, dim)
        m = ok.to(e.dtype).unsqueeze(-1)
        pooled = (self.member @ (e * m)) / (self.member @ m).clamp(min=1.0)  # (..., C, dim)
        return pooled.flatten(-2)


def time_codes(seconds: torch.Tensor, known: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Log2 bucket of non-negative int64 `seconds` (1 + floor(log2(1 + s)), capped), 0 where not `known`:
    comparisons with integer edges 2**k - 1, so torch and onnxruntime agree exactly."""
    bucket = 1 + (seconds.unsqueeze(-1) >= edges).long().sum(-1)
    return torch.where(known, bucket, torch.zeros_like(bucket))


class TimeContext(nn.Module):
    """history_timestamps (B, L) and request_time (B, 1), int64 seconds (≤ 0 unknown) → the age
    embedding of each history position (B, L, D), for the attention keys, and the request's context
    (B, 1, D): the previous interaction's age, hour of day, day of week. Unknown parts embed to 0."""

    def __init__(self, dim: int, feature_dim: int) -> None:
        super().__init__()
        self.register_buffer("edges", torch.tensor([2**k - 1 for k in range(1, TIME_BUCKETS - 1)], dtype=torch.long))
        self.age = nn.Embedding(TIME_BUCKETS, dim, padding_idx=0)
        self.gap = nn.Embedding(TIME_BUCKETS, feature_dim, padding_idx=0)
        self.hour = nn.Embedding(25, feature_dim, padding_idx=0)
        self.weekday = nn.Embedding(8, feature_dim, padding_idx=0)
        self.proj = nn.Linear(3 * feature_dim, dim)
        for emb, std in ((self.age, 0.02), (self.gap, 0.1), (self.hour, 0.1), (self.weekday, 0.1)):
            nn.init.normal_(emb.weight, std=std)
            with torch.no_grad():
                emb.weight[0].zero_()

    def codes(self, history_timestamps: torch.Tensor, request_time: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ages (B, L), gap (B, 1), hour (B, 1), weekday (B, 1)) codes, 0 = unknown: each position's age
        bucket, the newest position's (the time since the previous interaction), 1 + the hour of day
        and 1 + the day of week (Monday = 1) of the request, UTC."""
        now = request_time.clamp(min=0)  # (B, 1)
        known = request_time > 0
        ages = time_codes((now - history_timestamps).clamp(min=0), known & (history_timestamps > 0), self.edges)
        day = torch.div(now, SECONDS_PER_DAY, rounding_mode="trunc")
        hour = torch.div(now - day * SECONDS_PER_DAY, SECONDS_PER_HOUR, rounding_mode="trunc")
        weekday = day + EPOCH_WEEKDAY - torch.div(day + EPOCH_WEEKDAY, 7, rounding_mode="trunc") * 7
        zero = torch.zeros_like(now)
        return ages, ages[:, -1:], torch.where(known, hour + 1, zero), torch.where(known, weekday + 1, zero)

    def forward(self, history_timestamps: torch.Tensor, request_time: torch.Tensor):
        ages, gap, hour, weekday = self.codes(history_timestamps, request_time)
        context = torch.cat([self.gap(gap), self.hour(hour), self.weekday(weekday)], dim=-1)  # (B, 1, 3F)
        return self.age(ages), self.proj(context)


@dataclass
class RankerShape:
    n_items: int
    dim: int  # the encoder's hidden size
    attend_last: int = 50  # the most recent history positions the candidates attend over
    keys: str = "items"  # what candidates attend over: "items" (own embeddings) or "hidden" (encoder states)
    mlp_dim: int = 64
    dropout: float = 0.1
    item_columns: tuple[FeatureColumn, ...] = ()  # coded item features (baked, token-indexed)
    user_columns: tuple[FeatureColumn, ...] = ()  # coded user features (the optional input)
    feature_dim: int = 16  # embedding size of each feature column
    feature_dropout: float = 0.0  # training: share of samples scored without item / user / time features
    time: bool = False  # time and context features (history_timestamps, request_time)
    # Rank of the item-features × context cross (0 = none): with item features and user or time features,
    # a factorised term <P f(item features), Q [user; request context]> added to the score.
    cross_dim: int = 0
    cf_neighbours: int = 0  # item-item collaborative score (export/ease.py): neighbours kept per item; 0 = none
    cf_lambda: float = 0.0  # the EASE L2 weight its neighbours were fitted with (a record; the graph holds the weights)
    trend_features: int = 0  # columns of the candidate's popularity at the request time (export/trend.py); 0 = none

    @property
    def crossed(self) -> bool:
        return self.cross_dim > 0 and bool(self.item_columns) and (bool(self.user_columns) or self.time)

    @property
    def reads_clock(self) -> bool:
        """Whether the graph takes history_timestamps and request_time (engine/ranker.py: both or neither)."""
        return self.time or self.trend_features > 0

    @property
    def user_width(self) -> int:
        return sum(c.width for c in self.user_columns)

    def to_dict(self) -> dict:
        """Flat, for the manifest: each feature group as "name:codes x width,..." ("" = none)."""
        out = asdict(self)
        out["time"] = int(self.time)  # the manifest's shape holds numbers and strings
        for group in ("item_columns", "user_columns"):
            out[group] = ",".join(f"{c.name}:{c.n_codes}x{c.width}" for c in getattr(self, group))
        return out


class TargetAttentionRanker(nn.Module):
    def __init__(
        self,
        shape: RankerShape,
        item_vectors: torch.Tensor | None = None,
        popularity=None,
        item_codes: np.ndarray | None = None,
        neighbours=None,
        trend=None,
    ) -> None:
        """item_vectors (n_items, D): the encoder's item embeddings (initial candidate embeddings);
        popularity (n_items,): training interaction counts per catalogue row; item_codes (n_items + 1,
        W): the item feature table's coded columns side by side, token-indexed (row 0 unknown), as
        `shape.item_columns` describes them; neighbours: export/ease.py's `Neighbours` (n_items + 1,
        `shape.cf_neighbours`), the served B; trend: export/trend.py's `TrendTable` of the training part."""
        super().__init__()
        self.shape = shape
        d = shape.dim
        self.item_emb = nn.Embedding(shape.n_items + 1, d, padding_idx=0)
        self.recency = nn.Embedding(shape.attend_last, d)
        self.w_att = nn.Linear(d, d, bias=False)
        self.scale = 1.0 / math.sqrt(d)
        n_in = (4 if shape.keys == "hidden" else 3) * d + 3
        if shape.cf_neighbours:
            want = (shape.n_items + 1, shape.cf_neighbours)
            if neighbours is None or neighbours.items.shape != want or neighbours.weights.shape != want:
                got = None if neighbours is None else neighbours.items.shape
                raise ValueError(f"cf neighbours must be {want}, got {got}")
            self.register_buffer("cf_items", torch.as_tensor(neighbours.items, dtype=torch.long))
            self.register_buffer("cf_weights", torch.as_tensor(neighbours.weights, dtype=torch.float32))
            n_in += 2
        if shape.trend_features:
            if not shape.time:  # engine/ranker.py: a ranker reads both time inputs or neither
                raise ValueError("trend features read request_time: they need the time features (time=True)")
            from .trend import n_features

            if trend is None or n_features(trend) != shape.trend_features or len(trend.first) != shape.n_items + 1:
                raise ValueError(
                    f"a trend table for {shape.n_items + 1} tokens and {shape.trend_features} columns is needed"
                )
            self.register_buffer("trend_cumulative", torch.as_tensor(trend.cumulative, dtype=torch.float32).flatten())
            self.register_buffer("trend_first", torch.as_tensor(trend.first, dtype=torch.long))
            self.trend_windows = tuple(int(w) for w in trend.windows)  # graph constants
            self.trend_start, self.trend_width, self.trend_buckets = int(trend.start), int(trend.width), trend.buckets
            n_in += shape.trend_features
        n_wide = 1 + (1 if shape.cf_neighbours else 0) + shape.trend_features  # log popularity, cf, trend
        self.wide = nn.Linear(n_wide, 1, bias=False)
        nn.init.zeros_(self.wide.weight)  # starts at zero: the ranker still starts as retrieval
        self.item_side = self.user_side = None
        if shape.item_columns:
            width = sum(c.width for c in shape.item_columns)
            if item_codes is None or item_codes.shape != (shape.n_items + 1, width):
                got = None if item_codes is None else item_codes.shape
                raise ValueError(f"item feature codes must be ({shape.n_items + 1}, {width}), got {got}")
            self.register_buffer("item_codes", torch.as_tensor(np.asarray(item_codes), dtype=torch.long))
            self.item_side = CodedEmbedding(shape.item_columns, shape.feature_dim)
            self.item_proj = nn.Linear(self.item_side.out_dim, d, bias=False)
            nn.init.zeros_(self.item_proj.weight)  # the item representation starts as the ids' alone
        if shape.user_columns:
            self.user_side = CodedEmbedding(shape.user_columns, shape.feature_dim)
            self.user_proj = nn.Linear(self.user_side.out_dim, d)
            n_in += 2 * d
        self.time_side = TimeContext(d, shape.feature_dim) if shape.time else None
        if self.time_side is not None:
            n_in += 2 * d
        self.cross_item = self.cross_ctx = None
        if shape.crossed:
            # A factorisation-machine cross of the item's features with who and when (DeepFM's idea): the
            # MLP could learn it from v * u and v * context too, but slowly and over the id embeddings;
            # a low-rank bilinear term on the features alone says "this user/hour likes this category"
            # directly. The context side starts at zero, so the ranker still starts as retrieval.
            self.cross_item = nn.Linear(self.item_side.out_dim, shape.cross_dim, bias=False)
            n_ctx = (d if shape.user_columns else 0) + (d if shape.time else 0)
            self.cross_ctx = nn.Linear(n_ctx, shape.cross_dim, bias=False)
            nn.init.zeros_(self.cross_ctx.weight)
        self.register_buffer("cross_table", None)  # (I + 1, cross_dim) once folded for export (ranker_export.py)
        self.mlp = nn.Sequential(
            nn.Linear(n_in, shape.mlp_dim),
            nn.GELU(),
            nn.Dropout(shape.dropout),
            nn.Linear(shape.mlp_dim, shape.mlp_dim // 2),
            nn.GELU(),
            nn.Dropout(shape.dropout),
            nn.Linear(shape.mlp_dim // 2, 1),
        )
        nn.init.normal_(self.recency.weight, std=0.02)
        nn.init.eye_(self.w_att.weight)
        nn.init.zeros_(self.mlp[-1].weight)  # the ranker starts as stage one's order
        nn.init.zeros_(self.mlp[-1].bias)
        with torch.no_grad():
            self.item_emb.weight.zero_()
            if item_vectors is not None:
                self.item_emb.weight[1:] = torch.as_tensor(item_vectors, dtype=torch.float32)
        pop = np.zeros(shape.n_items + 1, dtype=np.float32)
        if popularity is not None:
            pop[1:] = np.log1p(np.asarray(popularity, dtype=np.float64))
            pop /= max(float(pop.max()), 1.0)
        self.register_buffer("log_pop", torch.from_numpy(pop))  # (I+1,), token-indexed, 0 for padding

    def items(self, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The ranker's representation of tokens (B, T): id embedding plus projected item features
        (left out for the samples where `drop` (B,) is true)."""
        v = self.item_emb(tokens)
        if self.item_side is None:
            return v
        codes = self.item_codes[tokens]
        if drop is not None:
            codes = codes.masked_fill(drop[:, None, None], 0)
        return v + self.item_proj(self.item_side(codes))

    def cf(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The collaborative score (B, N) of candidates given history (B, L) tokens: the history's neighbour
        weights scatter-added over the catalogue, read at the candidates (export/ease.py `scores`)."""
        b = history.shape[0]
        items = self.cf_items[history].reshape(b, -1)
        weights = self.cf_weights[history].reshape(b, -1)
        dense = torch.zeros(b, self.shape.n_items + 1, dtype=weights.dtype, device=history.device)
        dense = dense.scatter_add(1, items, weights)
        dense = dense * (torch.arange(self.shape.n_items + 1, device=history.device) > 0)  # padding reads nothing
        return dense.gather(1, candidates)

    def wide_names(self) -> list[str]:
        """What each column of `wide_inputs` is (the manifest's training history names the weights so)."""
        names = ["log popularity"] + (["cf (standardised)"] if self.shape.cf_neighbours else [])
        if self.shape.trend_features:
            days = [f"{w * self.trend_width / 86_400:g}" for w in self.trend_windows]
            names += [f"interactions in the {d} days before" for d in days]
            names += ["interactions before", "none yet", "days since the first"]
        return names

    def wide_inputs(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        request_time: torch.Tensor | None,
        cf_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The wide part's inputs (B, N, W): log popularity, [the cf score standardised over the list,]
        [the trend features]; and the raw cf score (B, N) (None without cf). history: the attended
        positions (B, ≤ attend_last) tokens."""
        wide = [self.log_pop[candidates].unsqueeze(-1)]
        cf = None
        if self.shape.cf_neighbours:
            valid = candidates > 0
            n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
            cf = self.cf(history, candidates) if cf_scores is None else cf_scores
            cf_mean = torch.where(valid, cf, torch.zeros_like(cf)).sum(dim=1, keepdim=True) / n
            cf_var = torch.where(valid, (cf - cf_mean) ** 2, torch.zeros_like(cf)).sum(dim=1, keepdim=True) / n
            wide.append(
                torch.where(valid, (cf - cf_mean) / torch.sqrt(cf_var + 1e-6), torch.zeros_like(cf)).unsqueeze(-1)
            )
        if self.shape.trend_features:
            wide.append(self.trend(candidates, request_time))
        return torch.cat(wide, dim=-1), cf

    def trend(self, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """(B, N, trend_features): export/trend.py `features`, by int64 bucket arithmetic and lookups."""
        known = request_time > 0  # (B, 1)
        b = torch.div(
            (request_time.clamp(min=0) - self.trend_start).clamp(min=0), self.trend_width, rounding_mode="trunc"
        )
        b = b.clamp(max=self.trend_buckets)  # (B, 1)
        row = candidates * (self.trend_buckets + 1)
        before = self.trend_cumulative[row + b]
        cols = [torch.log1p(before - self.trend_cumulative[row + (b - w).clamp(min=0)]) for w in self.trend_windows]
        age = (b - self.trend_first[candidates]).clamp(min=0).to(before.dtype)
        cols += [torch.log1p(before), (before == 0).to(before.dtype), torch.log1p(age)]
        out = torch.stack(cols, dim=-1)
        keep = known.unsqueeze(-1) & (candidates > 0).unsqueeze(-1)
        return torch.where(keep, out, torch.zeros_like(out))

    def crossed_items(self, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The item side of the cross for tokens (B, T) → (B, T, cross_dim): the folded table when exported,
        else from the feature codes (zero for the samples where `drop` (B,) is true)."""
        if self.cross_table is not None:
            return self.cross_table[tokens]
        codes = self.item_codes[tokens]
        if drop is not None:
            codes = codes.masked_fill(drop[:, None, None], 0)
        return self.cross_item(self.item_side(codes))

    def forward(
        self,
        history: torch.Tensor,
        hidden: torch.Tensor,
        candidates: torch.Tensor,
        candidate_scores: torch.Tensor,
        user_features: torch.Tensor | None = None,
        history_timestamps: torch.Tensor | None = None,
        request_time: torch.Tensor | None = None,
        cf_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """history (B, L) tokens, hidden (B, L, D), candidates (B, N) tokens (0 = empty), candidate_scores (B, N),
        user_features (B, W) codes (None or zeros: unknown), history_timestamps (B, L) and request_time
        (B, 1) seconds (None or ≤ 0: unknown); cf_scores (B, N): training's leak-free collaborative
        scores (None: from the baked neighbours, as served) → scores (B, N)."""
        k = self.shape.attend_last
        p = self.shape.feature_dropout if self.training else 0.0
        b = candidates.shape[0]
        drop_item = torch.rand(b) < p if p > 0 and self.item_side is not None else None
        context = None
        if self.shape.reads_clock:
            if history_timestamps is None:
                history_timestamps = torch.zeros_like(history)
            if request_time is None:
                request_time = torch.zeros(b, 1, dtype=torch.long, device=candidates.device)
            if p > 0:  # the whole group, and separately the history's timestamps only (a request with the clock only)
                request_time = request_time.masked_fill((torch.rand(b) < p)[:, None], 0)
                history_timestamps = history_timestamps.masked_fill((torch.rand(b) < p)[:, None], 0)
        if self.time_side is not None:
            ages, context = self.time_side(history_timestamps[:, -k:], request_time)
        history = history[:, -k:]  # slicing past the start keeps everything
        t = history.shape[1]
        pos = torch.arange(k - t, k, device=history.device)
        values = hidden[:, -k:] if self.shape.keys == "hidden" else self.items(history, drop_item)  # (B, L, D)
        keys = values + self.recency(pos)
        if context is not None:
            keys = keys + ages
        v = self.items(candidates, drop_item)  # (B, N, D)
        att = (self.w_att(v) @ keys.transpose(1, 2)) * self.scale  # (B, N, L)
        att = att.masked_fill((history == 0).unsqueeze(1), _BLOCKED)
        a = F.softmax(att, dim=-1) @ values  # (B, N, D)

        valid = candidates > 0  # (B, N)
        s = candidate_scores
        best = torch.where(valid, s, torch.full_like(s, _BLOCKED)).amax(dim=1, keepdim=True)
        n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(s.dtype)
        mean = torch.where(valid, s, torch.zeros_like(s)).sum(dim=1, keepdim=True) / n
        var = torch.where(valid, (s - mean) ** 2, torch.zeros_like(s)).sum(dim=1, keepdim=True) / n
        wide, cf = self.wide_inputs(history, candidates, request_time, cf_scores)  # request_time: after dropout
        columns = [s - best, (s - mean) / torch.sqrt(var + 1e-6)] + ([cf] if cf is not None else [])
        scalars = torch.cat([torch.stack(columns, dim=-1), wide], dim=-1)
        parts = [v, a, v * a]
        if self.shape.keys == "hidden":
            parts.append(v * hidden[:, -1:])  # the last state is stage one's query
        who_when = []  # (B, 1, D) each: the user's and the request's context, for the cross
        if self.user_side is not None:
            if user_features is None:
                user_features = torch.zeros(b, self.shape.user_width, dtype=torch.long, device=candidates.device)
            if p > 0:
                user_features = user_features.masked_fill((torch.rand(b) < p)[:, None], 0)
            u = self.user_proj(self.user_side(user_features)).unsqueeze(1)  # (B, 1, D)
            parts += [u.expand(-1, v.shape[1], -1), v * u]
            who_when.append(u)
        if context is not None:
            parts += [context.expand(-1, v.shape[1], -1), v * context]
            who_when.append(context)
        x = torch.cat([*parts, scalars], dim=-1)  # (B, N, 3D or 4D (+ 2D per side group), + 3)
        out = s + self.mlp(x).squeeze(-1) + self.wide(wide).squeeze(-1)
        if self.cross_ctx is not None:
            q = self.cross_ctx(torch.cat(who_when, dim=-1))  # (B, 1, R)
            out = out + (self.crossed_items(candidates, drop_item) * q).sum(-1)
        return out
