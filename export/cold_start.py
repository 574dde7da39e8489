"""Cold start: stage-one vectors for items with text but no training interactions, and measuring them.

SASRec learns an item's vector from the interactions it appears in; an item with none keeps its
random start (pushed down as a softmax negative), so it is never retrieved. A ridge regression from
content embeddings (attnrec.export.content) to the learned vectors of the warm items gives such an
item `content @ W + b` instead. The mapped vector replaces the item's row of the encoder's item table
before export, so the encoder's input (a cold item in a history), item_embeddings.npy and the FAISS
index all hold it, and serving needs no step of its own. The map is stored with the version
(attnrec.engine.content).

`cold_start_eval` measures it: a random share of the items with text is held out of the training
part (attnrec.export.data.sequences.hold_out_items), the model is trained and published as usual,
and the validation and test users whose target is a held-out item are ranked by the published version.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from attnrec.engine.content import ColdStartMap, ItemContent, load_cold_start

from .data.features import FeatureFile
from .data.sequences import EvalSet, LeaveOneOut, hold_out_items

log = logging.getLogger(__name__)

LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MIN_INTERACTIONS = 5  # fewer, and an item's learned vector is mostly its random start
VALID_SHARE = 0.1  # of the warm items, to choose the ridge strength on
MIN_FIT_ITEMS = 10
KS = (10, 50)
_CANONICAL_INT = re.compile(r"^-?(0|[1-9][0-9]*)$")


# ── the map ─────────────────────────────────────────────────────────────────────────────────────
def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """argmin_W,b |x W + 1 b - y|² + lam |W|² (the intercept is not penalised), in float64:
    W = (xcᵀ xc + lam I)⁻¹ xcᵀ yc on centred xc, yc, and b = mean(y) - mean(x) W."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"ridge needs x (n, p) and y (n, d) with n > 0, got {x.shape} and {y.shape}")
    if lam < 0:
        raise ValueError(f"ridge strength must be >= 0, got {lam}")
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - xm, y - ym
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    return w, ym - xm @ w


def _scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cosine of predicted and true rows, and R² (share of y's variance around its mean explained)."""
    cos = np.einsum("ij,ij->i", pred, y) / np.maximum(np.linalg.norm(pred, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    total = ((y - y.mean(axis=0)) ** 2).sum()
    return float(cos.mean()), float(1 - ((pred - y) ** 2).sum() / max(total, 1e-12))


def fit_cold_map(
    content: ItemContent,
    item_vectors: np.ndarray,
    popularity: np.ndarray,
    *,
    min_interactions: int = MIN_INTERACTIONS,
    lambdas: Sequence[float] = LAMBDAS,
    valid_share: float = VALID_SHARE,
    seed: int = 0,
) -> ColdStartMap | None:
    """The ridge map content → item vector, fitted on the warm items (text and at least
    `min_interactions` training interactions), its strength chosen by squared error on a seeded
    `valid_share` of them, then refitted on all; its output scaled so that the median norm of the
    held-out warm items' predictions is that of their learned vectors. Cold rows: text and no training interaction.
    None (logged) when fewer than MIN_FIT_ITEMS items are warm.
    `item_vectors` (n_items, D) and `popularity` (n_items,) are per catalogue row."""
    n = content.rows - 1
    if item_vectors.shape[0] != n or len(popularity) != n:
        raise ValueError(
            f"content has {n} catalogue rows, the item vectors {item_vectors.shape[0]}, "
            f"the popularity {len(popularity)}"
        )
    if not lambdas or min(lambdas) <= 0:
        raise ValueError(f"ridge strengths to choose from must be > 0 (fewer items than dimensions), got {lambdas}")
    has_text, popularity = content.has_text, np.asarray(popularity)
    warm = np.flatnonzero(has_text & (popularity >= min_interactions))
    cold = np.flatnonzero(has_text & (popularity == 0)).astype(np.int64)
    if len(warm) < MIN_FIT_ITEMS:
        log.warning(
            "cold start: only %d items have text and >= %d training interactions; no content map (needs %d)",
            len(warm),
            min_interactions,
            MIN_FIT_ITEMS,
        )
        return None
    x, y = content.vectors[warm + 1], np.asarray(item_vectors, dtype=np.float64)[warm]
    order = np.random.default_rng(seed).permutation(len(warm))
    n_val = min(max(1, round(valid_share * len(warm))), len(warm) - 1)
    val, fit = order[:n_val], order[n_val:]
    # Every strength from one eigendecomposition of the fit part's Gram matrix: W(lam) = V (S + lam)⁻¹ Vᵀ xcᵀ yc.
    xm, ym = x[fit].mean(axis=0), y[fit].mean(axis=0)
    xc = x[fit] - xm
    s, v = np.linalg.eigh(xc.T @ xc)
    proj, xv = v.T @ (xc.T @ (y[fit] - ym)), (x[val] - xm) @ v
    tried = []
    for lam in lambdas:
        pred = xv @ (proj / (np.maximum(s, 0) + lam)[:, None]) + ym
        tried.append((float(((pred - y[val]) ** 2).mean()), lam, *_scores(pred, y[val]), pred))
    _, lam, cosine, r2, pred = min(tried, key=lambda t: t[:2])
    # A ridge prediction is a conditional mean: its norm is a fraction of a learned vector's, and
    # inner-product retrieval would never rank it high (on MovieLens-100K no held-out item reached a
    # top 50). One scalar restores the norms: the held-out warm items' median norm over that of
    # their predictions. Directions, and the relative norms the map gives, stay as fitted.
    scale = float(np.median(np.linalg.norm(y[val], axis=1)) / max(np.median(np.linalg.norm(pred, axis=1)), 1e-12))
    w, b = fit_ridge(x, y, lam)
    cmap = ColdStartMap(
        weights=(scale * w).astype(np.float32),
        bias=(scale * b).astype(np.float32),
        cold_rows=cold,
        ridge_lambda=float(lam),
        norm_scale=scale,
        fit_items=len(warm),
        min_interactions=min_interactions,
        valid_cosine=cosine,
        valid_r2=r2,
    )
    log.info(
        "cold start: ridge map from %d warm items (lambda %g, norms scaled by %.2f; on %d held-out warm items "
        "cosine %.3f, R² %.3f); %d items with text and no training interaction get its vector",
        len(warm),
        lam,
        scale,
        len(val),
        cosine,
        r2,
        len(cold),
    )
    return cmap


def apply_cold_start(model, split: LeaveOneOut, content: ItemContent, *, seed: int = 0):
    """(model, map): a copy of `model` whose cold items' rows of the item table are their mapped
    content (the encoder's input and the item vectors, which share the table), and the map; the
    model itself and None when no map could be fitted."""
    import torch

    if content.rows != split.data.n_items + 1:
        raise ValueError(f"content has {content.rows} rows, this split's catalogue {split.data.n_items} + 1")
    vectors = model.item_vectors().detach().float().cpu().numpy()
    cmap = fit_cold_map(content, vectors, split.train_popularity()[1:], seed=seed)
    if cmap is None or not len(cmap.cold_rows):
        return model, cmap
    mapped = copy.deepcopy(model)
    table = mapped.item_emb.weight
    with torch.no_grad():
        rows = torch.from_numpy(cmap.cold_rows + 1).to(table.device)
        table[rows] = torch.from_numpy(cmap.map(content.vectors[cmap.cold_rows + 1])).to(table.device, table.dtype)
    return mapped, cmap


# ── cold items of an item-feature file ──────────────────────────────────────────────────────────
def cold_item_ids(file: FeatureFile, catalogue: np.ndarray, columns: Sequence[str] | None) -> np.ndarray:
    """Ids of `file` with text in `columns` (None: every text column) that the catalogue (its
    external ids) lacks, in the catalogue's kind of id; ids that cannot be one (a string id for an
    integer catalogue) are left out with a warning."""
    text = [c for c in file.columns if c.role == "text" and (columns is None or c.name in columns)]
    if not text:
        return np.zeros(0, dtype=catalogue.dtype)
    has_text = np.any([c.values != "" for c in text], axis=0)
    known = {str(v) for v in np.asarray(catalogue).tolist()}
    ids = [i for i in file.ids[has_text].tolist() if i not in known]
    if catalogue.dtype.kind not in "iu":
        return np.asarray(ids, dtype=str)
    good = [i for i in ids if _CANONICAL_INT.match(i)]
    if len(good) < len(ids):
        log.warning(
            "%s: %d ids with text are not integers like the interactions' item ids; not added to the catalogue "
            "(first: %r)",
            file.path,
            len(ids) - len(good),
            next(i for i in ids if not _CANONICAL_INT.match(i)),
        )
    return np.asarray([int(i) for i in good], dtype=np.int64)


# ── measuring ───────────────────────────────────────────────────────────────────────────────────
def choose_held_out(split: LeaveOneOut, content: ItemContent, share: float, seed: int) -> np.ndarray:
    """A seeded `share` of the items with text (at least one), among those with training interactions
    (the others are cold already): sorted catalogue rows."""
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must lie in (0, 1), got {share}")
    candidates = np.flatnonzero(content.has_text & (split.train_popularity()[1:] > 0))
    n = min(max(1, round(share * int(content.has_text.sum()))), len(candidates))
    if n == 0:
        raise ValueError("no item has both text and training interactions: nothing to hold out")
    return np.sort(np.random.default_rng(seed).choice(candidates, n, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class ColdStartReport:
    """Cold-start HR of a version trained with `held_out` items out of its training part.

    Each group ("cold": users whose target is held out, "warm": the others) and split has hr@k,
    ndcg@k and users: `served` = the published version's stage one (FAISS over the mapped vectors),
    `ranked` = with its ranker (None without), `unmapped` = the same trained model with the cold
    items' own vectors (no content), exact ranking; `random` = the expected hr@k of a random order."""

    version: str
    held_out: int
    with_text: int
    catalogue: int
    ks: tuple[int, ...]
    served: dict[str, dict[str, dict[str, float]]]  # group → split → metrics
    unmapped: dict[str, dict[str, dict[str, float]]]
    random: dict[str, dict[str, float]]  # split → hr@k over the cold group
    cold_map: dict[str, float]  # ridge lambda, fit items, validation cosine and R²
    ranked: dict[str, dict[str, dict[str, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(es: EvalSet, held: np.ndarray) -> dict[str, EvalSet]:
    cold = np.isin(es.targets - 1, held)
    return {"cold": es.subset(np.flatnonzero(cold)), "warm": es.subset(np.flatnonzero(~cold))}


def _served(pipeline, es: EvalSet, ks: Sequence[int], popularity: np.ndarray, rank: bool) -> dict[str, float]:
    from .ranking_metrics import RankingReport

    report = RankingReport(tuple(ks), pipeline.n_items, popularity)
    for s in range(0, len(es), 256):
        hist = [es.history(j) - 1 for j in range(s, min(s + 256, len(es)))]  # tokens -> rows
        recs = pipeline.recommend(hist, max(ks), exclude=hist, rank=rank)
        report.add(recs.rows, es.targets[s : s + len(hist)] - 1, hist)
    return {**report.result(), "users": len(es)}


def _random_hr(es: EvalSet, n_items: int, ks: Sequence[int]) -> dict[str, float]:
    unseen = np.array([n_items - len(np.unique(es.history(j))) for j in range(len(es))], dtype=np.float64)
    return {f"hr@{k}": float(np.minimum(1.0, k / np.maximum(unseen, 1)).mean()) if len(es) else 0.0 for k in ks}


def cold_start_eval(
    split: LeaveOneOut,
    content: ItemContent,
    train_config,
    repo: Path,
    name: str,
    *,
    data,
    share: float = 0.05,
    seed: int = 0,
    ks: Sequence[int] = KS,
    progress: bool = True,
    **publish_options,
) -> ColdStartReport:
    """Hold a seeded `share` of the items with text out of the training part, train `train_config`
    (export.config.TrainConfig) on the rest, publish the model with `content` as repo/name (the
    held-out items get content-mapped vectors; `publish_options` go to export.publish.publish), and
    rank the validation and test targets with the published version (ColdStartReport). `data`: the
    DataSection of the log."""
    from attnrec.engine.pipeline import Pipeline

    from .publish import publish
    from .ranking_metrics import evaluate_full_ranking
    from .train import query_vectors, train

    held = choose_held_out(split, content, share, seed)
    held_split = hold_out_items(split, held)
    log.info(
        "cold start: %d of %d items with text held out of training (%d interactions)",
        len(held),
        int(content.has_text.sum()),
        int(split.train_lengths().sum() - held_split.train_lengths().sum()),
    )
    result = train(held_split, train_config, progress=progress)
    training = result.section(
        note=f"cold-start measurement: {len(held)} items with text held out of training (seed {seed})",
    )
    version_dir, manifest, _ = publish(
        result.model,
        held_split,
        repo,
        name,
        training=training,
        data=data,
        content=content,
        seed=seed,
        progress=progress,
        **publish_options,
    )
    pipeline = Pipeline.load(version_dir)
    popularity = held_split.train_popularity()[1:].astype(np.float64)
    model = result.model.eval()
    vectors = model.item_vectors().detach().float().cpu().numpy()
    served: dict = {"cold": {}, "warm": {}}
    unmapped: dict = {"cold": {}, "warm": {}}
    ranked: dict | None = {"cold": {}, "warm": {}} if pipeline.ranker is not None else None
    random = {}
    for which, es in (("valid", split.valid), ("test", split.test)):
        for group, part in _groups(es, held).items():
            served[group][which] = _served(pipeline, part, ks, popularity, rank=False)
            if ranked is not None:
                ranked[group][which] = _served(pipeline, part, ks, popularity, rank=True)
            hist = [part.history(j) for j in range(len(part))]
            unmapped[group][which] = {
                **evaluate_full_ranking(
                    lambda h: query_vectors(model, h), vectors, hist, part.targets, popularity, ks=tuple(ks)
                ),
                "users": len(part),
            }
            if group == "cold":
                random[which] = _random_hr(part, split.data.n_items, ks)
    cmap = load_cold_start(version_dir, manifest)
    return ColdStartReport(
        version=str(version_dir),
        held_out=len(held),
        with_text=int(content.has_text.sum()),
        catalogue=split.data.n_items,
        ks=tuple(ks),
        served=served,
        unmapped=unmapped,
        random=random,
        cold_map={}
        if cmap is None
        else {
            "ridge_lambda": cmap.ridge_lambda,
            "norm_scale": cmap.norm_scale,
            "fit_items": cmap.fit_items,
            "valid_cosine": cmap.valid_cosine,
            "valid_r2": cmap.valid_r2,
            "cold_items": len(cmap.cold_rows),
        },
        ranked=ranked,
    )


def print_cold_start(report: ColdStartReport, console=None) -> None:
    """The report as a table: a line per row, target group and split."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"cold start · {report.held_out} of {report.with_text} items with text held out of training · "
        f"full ranking over {report.catalogue} items · seen items excluded"
    )
    for name in ("row", "targets · split", "users", *(f"HR@{k}" for k in report.ks)):
        table.add_column(name, justify="left" if name in ("row", "targets · split") else "right")
    rows = [("served (content-mapped)", report.served)]
    if report.ranked is not None:
        rows.append(("served + ranker", report.ranked))
    rows.append(("no content (own vectors)", report.unmapped))
    for group in ("cold", "warm"):
        for label, res in rows:
            for which in ("test", "valid"):
                m = res[group][which]
                table.add_row(label, f"{group} · {which}", str(m["users"]), *(f"{m[f'hr@{k}']:.4f}" for k in report.ks))
        if group == "cold":
            for which in ("test", "valid"):
                rnd, users = report.random[which], report.served[group][which]["users"]
                table.add_row("random", f"cold · {which}", str(users), *(f"{rnd[f'hr@{k}']:.4f}" for k in report.ks))
        table.add_section()
    console.print(table)
    if report.cold_map:
        m = report.cold_map
        console.print(
            f"ridge map: lambda {m['ridge_lambda']:g}, norms x{m['norm_scale']:.2f}, fitted on {m['fit_items']} "
            f"warm items, {m['cold_items']} cold items mapped; on held-out warm items cosine "
            f"{m['valid_cosine']:.3f}, R² {m['valid_r2']:.3f}; version {report.version}"
        )
