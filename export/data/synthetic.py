"""A seeded synthetic interaction log with real sequential structure: the default dataset.

How the data is generated
-------------------------
Items are split into latent **topics** (contiguous blocks of internal item indices, sizes
varying like a random partition). Each topic's items have a fixed **order**: think of the
episodes of a series, the chapters of a course, the parts of a product line.

Popularity is Zipf-like at two levels: topics get weights ``(rank + 1) ** -a`` over a
random ranking, and inside a topic position ``p`` gets weight ``~ (p + 1) ** -a`` (the
first items of a topic are its entry points). ``a`` is ``popularity_exponent``.

Topics form a sparse **transition graph**: each topic leads to ``topic_out_degree`` next
topics (drawn by topic popularity, the first one most likely to be followed). Each user
has ``n_home_topics`` preferred topics of their own.

A user's sequence is a walk:

1. Start in the user's first home topic at an entry position drawn from the in-topic Zipf.
2. Each step, with probability ``stay_prob`` stay in the topic and move forward by a small
   geometric jump (mean ``mean_step``): the next item is close after the previous one in
   the topic's order. Otherwise (or when the jump runs off the topic's end) switch topic:
   with probability ``home_rate`` back to one of the user's home topics, else along an
   edge of the transition graph; enter the new topic at a Zipf-drawn position.
3. With probability ``noise_rate`` a step emits a random item drawn from global popularity
   instead, without moving the walk (the user comes back to where they were).

Why sequence models win: the best predictor of the next item is the item just after the
last one in its topic's order (or an entry item of a successor topic), which depends on
the *last items*, not on global popularity. Popularity only captures the Zipf marginal;
even a first-order transition count beats it several times over (leave-last-out, full
ranking, seen items excluded, 2,000 users x 1,000 items: HR@10 0.66 against popularity's
0.11; see tests/test_synthetic.py), and a model that also reads the longer history (home
topics, where the user is in a chain) can do better still.

Every item has nonzero probability (noise samples the full popularity distribution), and
the marginal popularity is long-tailed. External ids: users ``1..n_users``; items are a
seeded permutation of ``1..n_items``, so id order carries no signal. Timestamps are
integer seconds (stored as float64), strictly increasing per user.

Attributes and context (off unless ``n_categories`` > 0; the default output is unchanged)
------------------------------------------------------------------------------------------
Each topic gets a **category** (``n_categories`` of them, at random), which its items share, and
each item a **price** (a per-category base price times log-normal noise, so price says a little
about category). Each user gets a **segment** (``n_segments``, uniform). At a topic switch, with
probability ``context_rate`` the new topic is drawn by category instead of by the home/graph rule:
the category from softmax(``segment_effect`` · S[segment] + ``hour_effect`` · H[hour block]) (S and
H fixed random normal tables; hour blocks of 6 hours, UTC, of the interaction's own timestamp),
then a topic of that category by topic popularity, entered at a Zipf position. So what a user
picks at a switch depends on who they are and when, which neither the item ids of the history
(the segment only shows through a handful of past switches) nor an ids-only model (no time) can
see, and a ranker with user and time features can. `attributes` returns the categories, prices
and segments; `write_attributes` writes them as CSV files that `attnrec train --item-features /
--user-features` read. In this mode timestamps are drawn before the walk (from their own random
stream), since the walk reads their hours.

Generation is vectorised over users: the loop runs over steps (at most the longest
sequence), users sorted by length so the active users at any step are a prefix.
Same config and seed → the same arrays, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnrec.export.data.log import InteractionLog

ITEMS_PER_TOPIC = 25  # default topic size when n_topics is not given
MIN_LENGTH = 5  # every user has at least this many interactions
START_TIME = 1_600_000_000  # 2020-09-13 UTC; users start within START_SPAN_S of it
START_SPAN_S = 365 * 24 * 3600


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; see the module docstring for what each one does."""

    n_users: int = 5000
    n_items: int = 3000
    mean_length: float = 30.0  # mean interactions per user (geometric spread, min 5)
    n_topics: int | None = None  # 0/None: n_items // ITEMS_PER_TOPIC
    seed: int = 0
    stay_prob: float = 0.85  # chance a step stays in the current topic
    mean_step: float = 1.5  # mean forward jump inside a topic's order (>= 1)
    popularity_exponent: float = 0.8  # Zipf exponent, across and inside topics
    noise_rate: float = 0.05  # chance a step is a random popular item
    topic_out_degree: int = 3  # successors per topic in the transition graph
    home_rate: float = 0.2  # chance a topic switch returns to a home topic
    n_home_topics: int = 2  # preferred topics per user
    mean_gap_s: float = 3600.0  # mean seconds between a user's interactions
    # Attributes and context (module docstring); all off with n_categories = 0.
    n_categories: int = 0  # item categories (one per topic); 0: no attributes, the original generator
    n_segments: int = 4  # user segments
    context_rate: float = 0.6  # chance a topic switch picks its topic by category (segment and hour)
    segment_effect: float = 2.0  # weight of the segment's category preferences
    hour_effect: float = 2.0  # weight of the hour block's category preferences

    def topics(self) -> int:
        """The number of topics actually used (never more than n_items)."""
        n = self.n_topics or max(1, self.n_items // ITEMS_PER_TOPIC)
        return min(n, self.n_items)

    def validate(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError("n_users and n_items must be >= 1")
        if self.mean_length < MIN_LENGTH:
            raise ValueError(f"mean_length must be >= {MIN_LENGTH}, got {self.mean_length}")
        for name in ("stay_prob", "noise_rate", "home_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mean_step < 1.0:
            raise ValueError(f"mean_step must be >= 1, got {self.mean_step}")
        if self.popularity_exponent < 0.0:
            raise ValueError("popularity_exponent must be >= 0")
        if self.topic_out_degree < 1 or self.n_home_topics < 1:
            raise ValueError("topic_out_degree and n_home_topics must be >= 1")
        if self.n_categories < 0 or (self.n_categories and self.n_categories > self.topics()):
            raise ValueError(f"n_categories must be in 0..{self.topics()} (the topics), got {self.n_categories}")
        if self.n_categories and self.n_segments < 1:
            raise ValueError(f"n_segments must be >= 1, got {self.n_segments}")
        if not 0.0 <= self.context_rate <= 1.0:
            raise ValueError(f"context_rate must be in [0, 1], got {self.context_rate}")


# ---------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class _World:
    """Topics, their graph and popularity: everything shared by all users."""

    start: np.ndarray  # (T,) first internal item index of each topic
    size: np.ndarray  # (T,) items per topic
    topic_weight: np.ndarray  # (T,) Zipf weight of each topic, sums to 1
    successors: np.ndarray  # (T, D) next topics
    successor_cdf: np.ndarray  # (D,) cumulative probability of following edge j
    item_cdf: np.ndarray  # (n_items,) cumulative global popularity, for noise
    item_ids: np.ndarray  # (n_items,) external id of each internal item index


def _power_cdf(x: np.ndarray, a: float) -> np.ndarray:
    """Antiderivative of x ** -a (up to a constant), for x >= 1."""
    if abs(a - 1.0) < 1e-9:
        return np.log(x)
    return x ** (1.0 - a) / (1.0 - a)


def _entry_positions(size: np.ndarray, a: float, u: np.ndarray) -> np.ndarray:
    """Zipf-like positions in topics of `size` items, by inverse CDF of uniforms `u`.

    The continuous density ~x**-a on [1, size + 1) floored to a bin: position p has mass
    exactly the integral over [p + 1, p + 2), which `_within_topic_weights` also uses.
    """
    lo = _power_cdf(np.ones(1), a)
    hi = _power_cdf(size + 1.0, a)
    g = lo + u * (hi - lo)
    if abs(a - 1.0) < 1e-9:
        x = np.exp(g)
    else:
        x = (g * (1.0 - a)) ** (1.0 / (1.0 - a))
    return np.minimum(np.floor(x).astype(np.int64) - 1, size - 1).clip(0)


def _within_topic_weights(size: np.ndarray, pos: np.ndarray, a: float) -> np.ndarray:
    """Probability of position `pos` in a topic of `size` items under `_entry_positions`."""
    num = _power_cdf(pos + 2.0, a) - _power_cdf(pos + 1.0, a)
    den = _power_cdf(size + 1.0, a) - _power_cdf(np.ones(1), a)
    return num / den


def _topic_sizes(rng: np.random.Generator, n_items: int, n_topics: int) -> np.ndarray:
    """A random partition of n_items into n_topics non-empty blocks (varied sizes)."""
    cuts = np.sort(rng.choice(n_items - 1, size=n_topics - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [n_items]])).astype(np.int64)


def _build_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    n_topics, a = cfg.topics(), cfg.popularity_exponent
    size = _topic_sizes(rng, cfg.n_items, n_topics)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])

    # Zipf over topics, in a random order so topic index carries no signal.
    rank = rng.permutation(n_topics)
    topic_weight = (rank + 1.0) ** -a
    topic_weight /= topic_weight.sum()

    # Sparse graph: successors drawn by popularity, so popular topics also get traffic.
    succ = rng.choice(n_topics, size=(n_topics, cfg.topic_out_degree), p=topic_weight)
    if n_topics > 1:  # a self-loop would make a "switch" a no-op
        own = np.arange(n_topics)[:, None]
        succ = np.where(succ == own, (own + 1) % n_topics, succ)
    edge_weight = 1.0 / np.arange(1, cfg.topic_out_degree + 1)  # first edge dominant
    successor_cdf = np.cumsum(edge_weight / edge_weight.sum())

    # Global popularity = topic weight x within-topic weight; every item > 0.
    topic_of = np.repeat(np.arange(n_topics), size)
    pos = np.arange(cfg.n_items) - start[topic_of]
    item_p = topic_weight[topic_of] * _within_topic_weights(size[topic_of], pos, a)
    item_cdf = np.cumsum(item_p)
    item_cdf /= item_cdf[-1]

    item_ids = rng.permutation(cfg.n_items).astype(np.int64) + 1
    return _World(start, size, topic_weight, succ, successor_cdf, item_cdf, item_ids)


HOUR_BLOCKS = 4  # 6-hour blocks of the day (UTC): night, morning, afternoon, evening


@dataclass(frozen=True)
class _Context:
    """Categories, prices, segments and the category preferences of the attribute mode."""

    topic_category: np.ndarray  # (T,) category of each topic
    item_price: np.ndarray  # (n_items,) price of each internal item index
    segment: np.ndarray  # (n_users,) segment of each user (user-major, like the lengths)
    category_cdf: np.ndarray  # (n_segments, HOUR_BLOCKS, C) cumulative P(category | segment, hour block)
    topic_key: np.ndarray  # (T,) sorted: category + cumulative share of the topic within its category
    topic_order: np.ndarray  # (T,) topics in `topic_key` order


def _build_context(cfg: SyntheticConfig, world: _World, rng: np.random.Generator) -> _Context:
    n_topics, c = len(world.size), cfg.n_categories
    # Every category gets at least one topic; the rest at random.
    topic_category = rng.permutation(np.concatenate([np.arange(c), rng.integers(c, size=n_topics - c)]))
    base = np.exp(rng.normal(3.0, 1.0, size=c))
    topic_of = np.repeat(np.arange(n_topics), world.size)
    item_price = np.round(base[topic_category[topic_of]] * np.exp(rng.normal(0.0, 0.3, size=cfg.n_items)), 2)
    segment = rng.integers(cfg.n_segments, size=cfg.n_users)
    logits = cfg.segment_effect * rng.normal(size=(cfg.n_segments, 1, c)) + cfg.hour_effect * rng.normal(
        size=(1, HOUR_BLOCKS, c)
    )
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    category_cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
    # Topics within a category by popularity: key = category + cumulative share, one sorted array.
    order = np.lexsort((np.arange(n_topics), topic_category))
    w = world.topic_weight[order]
    cats = topic_category[order]
    totals = np.bincount(cats, weights=w, minlength=c)
    within = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)])[cats]
    return _Context(topic_category, item_price, segment, category_cdf, cats + within / totals[cats], order)


def _context_topics(ctx: _Context, rng: np.random.Generator, segment: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Topics drawn by category: the category from P(category | segment, hour block), then a topic of it
    by popularity."""
    cdf = ctx.category_cdf[segment, block]  # (n, C)
    category = np.minimum((cdf < rng.random(len(segment))[:, None]).sum(axis=1), cdf.shape[1] - 1)
    at = np.searchsorted(ctx.topic_key, category + rng.random(len(segment)), side="left")
    at = np.minimum(at, len(ctx.topic_key) - 1)
    # Float rounding at the top of a category can land on the next category's first topic. (Not
    # floor(key) > category: the last topic's key is category + 1 itself, and that test moved its
    # share to the topic before it, another category's when the category had one topic.)
    at = np.where(ctx.topic_category[ctx.topic_order[at]] > category, at - 1, at)
    return ctx.topic_order[at]


# ---------------------------------------------------------------------------- the walks


def _lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Per-user sequence lengths: MIN_LENGTH - 1 + geometric, mean `mean_length`."""
    p = 1.0 / (cfg.mean_length - MIN_LENGTH + 1.0)
    return (MIN_LENGTH - 1 + rng.geometric(p, size=cfg.n_users)).astype(np.int64)


def _sample_popular(world: _World, rng: np.random.Generator, n: int) -> np.ndarray:
    """Internal item indices drawn from global popularity."""
    idx = np.searchsorted(world.item_cdf, rng.random(n), side="right")
    return np.minimum(idx, len(world.item_cdf) - 1)


def _switch_topics(
    cfg: SyntheticConfig,
    world: _World,
    rng: np.random.Generator,
    topic: np.ndarray,
    home: np.ndarray,
) -> np.ndarray:
    """New topics for users leaving `topic`: a home topic or a graph successor."""
    n = len(topic)
    edge = np.searchsorted(world.successor_cdf, rng.random(n), side="right")
    edge = np.minimum(edge, cfg.topic_out_degree - 1)
    nxt = world.successors[topic, edge]
    go_home = rng.random(n) < cfg.home_rate
    which_home = rng.integers(cfg.n_home_topics, size=n)
    return np.where(go_home, home[np.arange(n), which_home], nxt)


def _walk(
    cfg: SyntheticConfig,
    world: _World,
    rng: np.random.Generator,
    lengths: np.ndarray,
    progress: bool,
    context: tuple[_Context, np.ndarray, np.random.Generator] | None = None,
    trace: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Internal item indices of all interactions, user-major, in time order. `context`: the attribute
    mode's context, the hour block of every interaction (user-major) and its own random stream.
    `trace` (a dict to fill): the walk's hidden state, user-major: "topic" and "pos" after each step
    (before noise), "home" (n_users, n_home_topics); recording it draws nothing."""
    a = cfg.popularity_exponent
    order = np.argsort(-lengths, kind="stable")  # longest first: active users are a prefix
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])[order]
    # Users with length > s; lengths sorted descending, so -sorted_len is ascending.
    sorted_len = lengths[order]
    n_active_at = np.searchsorted(-sorted_len, -np.arange(sorted_len[0]), side="left")

    home = rng.choice(len(world.size), size=(cfg.n_users, cfg.n_home_topics), p=world.topic_weight)[order]
    topic = home[:, 0].copy()
    pos = _entry_positions(world.size[topic], a, rng.random(cfg.n_users))
    items = np.empty(int(lengths.sum()), dtype=np.int64)
    p_step = 1.0 / cfg.mean_step
    if trace is not None:
        trace["topic"], trace["pos"] = np.empty_like(items), np.empty_like(items)
        trace["home"] = np.empty_like(home)
        trace["home"][order] = home

    steps = range(len(n_active_at))
    for s in _maybe_progress(steps, progress, int(lengths.sum())):
        n = int(n_active_at[s])
        topic, pos, home = topic[:n], pos[:n], home[:n]
        if s > 0:
            new_pos = pos + rng.geometric(p_step, size=n)
            leave = (rng.random(n) >= cfg.stay_prob) | (new_pos >= world.size[topic])
            idx = np.flatnonzero(leave)  # only the leavers need a new topic (~20%)
            topic[idx] = _switch_topics(cfg, world, rng, topic[idx], home[idx])
            if context is not None:
                ctx, blocks, crng = context
                by_context = idx[crng.random(len(idx)) < cfg.context_rate]
                users = order[by_context]
                topic[by_context] = _context_topics(ctx, crng, ctx.segment[users], blocks[offsets[by_context] + s])
            new_pos[idx] = _entry_positions(world.size[topic[idx]], a, rng.random(len(idx)))
            pos = new_pos
        if trace is not None:
            trace["topic"][offsets[:n] + s], trace["pos"][offsets[:n] + s] = topic, pos
        emitted = world.start[topic] + pos
        noise = rng.random(n) < cfg.noise_rate
        emitted[noise] = _sample_popular(world, rng, int(noise.sum()))
        items[offsets[:n] + s] = emitted
    return items


def _maybe_progress(steps, progress: bool, total: int):
    """Iterate `steps`, with a rich progress bar when asked."""
    if not progress:
        yield from steps
        return
    from rich.progress import track  # imported lazily: only the CLI wants a bar

    yield from track(steps, description=f"generating {total:,} interactions")


def _timestamps(cfg: SyntheticConfig, rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """Integer seconds, strictly increasing per user (gaps >= 1 s), as float64."""
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps = 1 + np.floor(rng.exponential(cfg.mean_gap_s, size=total)).astype(np.int64)
    gaps[offsets] = 0  # each user's first interaction is at their start time
    cum = np.cumsum(gaps)
    start = START_TIME + rng.integers(START_SPAN_S, size=cfg.n_users)
    ts = cum - np.repeat(cum[offsets], lengths) + np.repeat(start, lengths)
    return ts.astype(np.float64)


# ---------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class SyntheticAttributes:
    """The attribute mode's side features, by external id."""

    item_ids: np.ndarray  # (n_items,) external ids
    category: np.ndarray  # (n_items,) str, e.g. "c03"
    price: np.ndarray  # (n_items,) float64
    user_ids: np.ndarray  # (n_users,) external ids
    segment: np.ndarray  # (n_users,) str, e.g. "s1"


def generate(config: SyntheticConfig, *, progress: bool = False) -> InteractionLog:
    """The synthetic log for `config`: rows user-major, each user's rows in time order."""
    return _generate(config, progress)[0]


def attributes(config: SyntheticConfig) -> SyntheticAttributes:
    """The item categories and prices and the user segments that `generate(config)` used
    (`config.n_categories` > 0)."""
    if not config.n_categories:
        raise ValueError("the generator has attributes only with n_categories > 0")
    config.validate()
    rng = np.random.default_rng(config.seed)
    world = _build_world(config, rng)
    return _attributes(config, world, _build_context(config, world, np.random.default_rng([config.seed, 1])))


def _attributes(config: SyntheticConfig, world: _World, ctx: _Context) -> SyntheticAttributes:
    topic_of = np.repeat(np.arange(len(world.size)), world.size)
    width = len(str(config.n_categories - 1))
    names = np.array([f"c{c:0{width}d}" for c in range(config.n_categories)])
    return SyntheticAttributes(
        item_ids=world.item_ids,
        category=names[ctx.topic_category[topic_of]],
        price=ctx.item_price,
        user_ids=np.arange(1, config.n_users + 1, dtype=np.int64),
        segment=np.array([f"s{g}" for g in ctx.segment]),
    )


def _generate(
    config: SyntheticConfig, progress: bool, truth: dict | None = None
) -> tuple[InteractionLog, SyntheticAttributes | None]:
    """`truth` (a dict to fill): what `NextItemTruth` needs (world, context, hour blocks, walk trace)."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    world = _build_world(config, rng)
    lengths = _lengths(config, rng)
    attrs = ctx = blocks = None
    trace = None if truth is None else {}
    if not config.n_categories:
        items = _walk(config, world, rng, lengths, progress, trace=trace)
        timestamp = _timestamps(config, rng, lengths)
    else:
        # Own streams (the original draws stay as they were): the context, then the timestamps,
        # drawn before the walk since it reads their hours.
        crng = np.random.default_rng([config.seed, 1])
        ctx = _build_context(config, world, crng)
        timestamp = _timestamps(config, np.random.default_rng([config.seed, 2]), lengths)
        blocks = (timestamp.astype(np.int64) % 86_400) // (86_400 // HOUR_BLOCKS)
        items = _walk(config, world, rng, lengths, progress, (ctx, blocks, crng), trace=trace)
        attrs = _attributes(config, world, ctx)
    user = np.repeat(np.arange(1, config.n_users + 1, dtype=np.int64), lengths)
    source = f"synthetic(n_users={config.n_users}, n_items={config.n_items}, seed={config.seed})"
    log_ = InteractionLog(user, world.item_ids[items], timestamp, source)
    if truth is not None:
        truth.update(world=world, context=ctx, blocks=blocks, lengths=lengths, log=log_, **trace)
    return log_, attrs


# ---------------------------------------------------------------------------- the truth


@dataclass(frozen=True)
class NextItemTruth:
    """The generator's hidden state behind a log: enough to give every step's true next-item
    distribution, P(item | the walk's topic and position before the step, the user's home topics
    and segment, the step's hour block). An oracle ranking by it is the ceiling of any model of
    this log (it sees what a model can only infer: the walk's state under noise, the home topics)."""

    config: SyntheticConfig
    log: InteractionLog  # the very log `generate(config)` returns
    world: _World
    context: _Context | None
    blocks: np.ndarray | None  # (N,) hour block of every interaction, user-major (attribute mode)
    lengths: np.ndarray  # (n_users,)
    topic: np.ndarray  # (N,) the walk's topic after each step (before noise), user-major
    pos: np.ndarray  # (N,) and its position in that topic
    home: np.ndarray  # (n_users, n_home_topics)

    def next_item_probabilities(self, users: np.ndarray, steps: np.ndarray, *, hour_known: bool = True) -> np.ndarray:
        """(E, n_items) float64: row e is the distribution of the item user `users[e]` (0-based, i.e.
        external id - 1) emits at step `steps[e]` (1 ≤ step < its length), given everything before it;
        column j is the item with external id j + 1. Each row sums to 1. `hour_known` False: the
        step's hour block unknown (its category preferences averaged over the blocks, which are
        equally likely: start times spread over a year), what a model without time could know at best."""
        cfg, w = self.config, self.world
        users, steps = np.asarray(users, dtype=np.int64), np.asarray(steps, dtype=np.int64)
        if np.any(steps < 1) or np.any(steps >= self.lengths[users]):
            raise ValueError("steps must be in 1..length - 1 of their users (step 0 has no previous state)")
        offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        prev = offsets[users] + steps - 1
        n_topics, a, p = len(w.size), cfg.popularity_exponent, 1.0 / cfg.mean_step
        topic_of = np.repeat(np.arange(n_topics), w.size)
        entry = _within_topic_weights(w.size[topic_of], np.arange(cfg.n_items) - w.start[topic_of], a)
        popularity = np.diff(np.concatenate([[0.0], w.item_cdf]))
        edge_p = np.diff(np.concatenate([[0.0], w.successor_cdf]))
        out = np.zeros((len(users), cfg.n_items))
        for e, (t, q, u) in enumerate(zip(self.topic[prev], self.pos[prev], users)):
            size, start = int(w.size[t]), int(w.start[t])
            # Stay: a geometric jump j >= 1 that lands inside the topic; else (or not staying) switch.
            jumps = np.arange(1, size - q)
            out[e, start + q + 1 : start + size] = cfg.stay_prob * p * (1.0 - p) ** (jumps - 1)
            leave = 1.0 - cfg.stay_prob * (1.0 - (1.0 - p) ** (size - 1 - q))
            new_topic = np.zeros(n_topics)
            np.add.at(new_topic, w.successors[t], (1.0 - cfg.home_rate) * edge_p)
            np.add.at(new_topic, self.home[u], cfg.home_rate / cfg.n_home_topics)
            if self.context is not None:
                ctx = self.context
                cdf = ctx.category_cdf[ctx.segment[u]]  # (HOUR_BLOCKS, C)
                cat_p = np.diff(np.concatenate([np.zeros((HOUR_BLOCKS, 1)), cdf], axis=1), axis=1)
                cat_p = cat_p[self.blocks[prev[e] + 1]] if hour_known else cat_p.mean(axis=0)
                totals = np.bincount(ctx.topic_category, weights=w.topic_weight, minlength=cfg.n_categories)
                by_cat = cat_p[ctx.topic_category] * w.topic_weight / totals[ctx.topic_category]
                new_topic = (1.0 - cfg.context_rate) * new_topic + cfg.context_rate * by_cat
            out[e] += leave * new_topic[topic_of] * entry
        out = (1.0 - cfg.noise_rate) * out + cfg.noise_rate * popularity
        by_id = np.empty_like(out)
        by_id[:, w.item_ids - 1] = out
        return by_id


def next_item_truth(config: SyntheticConfig) -> NextItemTruth:
    """Regenerate `config`'s log with its hidden state (the same arrays as `generate(config)`)."""
    truth: dict = {}
    _generate(config, False, truth)
    return NextItemTruth(config=config, **truth)


def generate_with_attributes(
    config: SyntheticConfig, *, progress: bool = False
) -> tuple[InteractionLog, SyntheticAttributes]:
    """The log and its attributes in one pass (`config.n_categories` > 0)."""
    if not config.n_categories:
        raise ValueError("the generator has attributes only with n_categories > 0")
    log, attrs = _generate(config, progress)
    return log, attrs


def write_attributes(attrs: SyntheticAttributes, item_path: str | Path, user_path: str | Path) -> None:
    """CSV files for `attnrec train --item-features / --user-features`: item_id,category,price and
    user_id,segment."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    pacsv.write_csv(
        pa.table({"item_id": attrs.item_ids, "category": attrs.category, "price": attrs.price}), str(item_path)
    )
    pacsv.write_csv(pa.table({"user_id": attrs.user_ids, "segment": attrs.segment}), str(user_path))


def write(log: InteractionLog, path: str | Path) -> None:
    """Write `log` as Parquet with columns user_id, item_id, timestamp.

    Timestamps that are all whole seconds are stored as int64, others as float64.
    """
    import pyarrow as pa  # imported lazily: generating needs only numpy
    import pyarrow.parquet as pq

    ts = log.timestamp
    if len(ts) and np.all(np.isfinite(ts)) and np.all(ts == np.floor(ts)):
        ts = ts.astype(np.int64)
    table = pa.table({"user_id": log.user, "item_id": log.item, "timestamp": ts})
    pq.write_table(table, str(path))
