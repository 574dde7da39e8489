"""Training SASRec with softmax cross-entropy, early stopping on validation NDCG@10.

"ss" scores every position's target against its own 256 uniformly drawn negatives, items its
history already holds excluded: SASRec+SS of the eSASRec benchmark (Tikhonovich et al., RecSys
2025), the best published model on the Amazon S3-Rec files. On Amazon Toys it beat the full softmax
over the catalogue ("ce", SASRec+ of Klenitskiy & Vasilev, RecSys 2023) on validation (NDCG@10
0.0716 vs 0.0679), and ce beat it on MovieLens-100K: loss="auto" picks by catalogue size (see
CE_MAX_ITEMS below). For catalogues too large for
per-position draws to mean much, "sampled" scores targets against shared negatives drawn
∝ popularity^0.75 with the logQ correction, which keeps the full softmax's estimate unbiased.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnrec.engine.repository import TrainingSection

from .config import TrainConfig
from .data.sequences import LeaveOneOut
from .model import SASRec
from .ranking_metrics import evaluate_full_ranking

log = logging.getLogger(__name__)


# loss="auto": the full softmax (ce) up to CE_MAX_ITEMS items, uniform per-position negatives (ss)
# up to SS_MAX_ITEMS; beyond that uniform draws are too easy to teach much, and shared popularity
# negatives with logQ take over. On MovieLens-100K (1,682 items) ce beat ss on validation NDCG@10
# (0.1289 vs 0.1192, seed 0); on Amazon Toys (11,924 items) ss beat ce (0.0716 vs 0.0679). Where
# between the two catalogue sizes the crossing lies was not measured: 4,096 is a guess.
CE_MAX_ITEMS = 4096
SS_MAX_ITEMS = 100_000
# batch_size=0: the batch each loss was tuned with.
DEFAULT_BATCH = {"ss": 128, "ce": 64, "sampled": 64}
# n_negatives=0: per position for ss, shared per batch for sampled. ss draws 512 where the catalogue
# fits the one (N, I) matmul of _loss (no extra cost there) and the eSASRec benchmark's 256 where
# every draw is a gathered embedding row (N x S x D memory). Toys validation NDCG@10, seed 0: 128
# negatives 0.0680, 256 0.0716, 512 0.0722 (test 0.0557 -> 0.0583).
DEFAULT_NEGATIVES = {"ss": 512, "sampled": 2048, "ce": 0}
SS_GATHERED_NEGATIVES = 256
# max_len=0: the 99th percentile of training history lengths, rounded up to a multiple of 10, within
# these. The floor is the 50 positions published Amazon configurations use: short-history data pays
# little for it, since batches are padded to their own longest window.
MAX_LEN_RANGE = (50, 200)
# Batches are cut from pools of this many batches' windows sorted by length: batches of similar
# lengths pad little, and the pools (and the batch order) are shuffled every epoch.
LENGTH_POOL_BATCHES = 50


@dataclass
class TrainResult:
    model: SASRec
    config: TrainConfig  # with what was chosen from the data (max_len, loss, device) filled in
    best_epoch: int
    best_valid_ndcg10: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    def section(self, **extra) -> TrainingSection:
        """The manifest's training section of this run; `extra`: its other fields (checkpoint, note, privacy)."""
        return TrainingSection(
            config=asdict(self.config),  # with what was chosen from the data
            best_epoch=self.best_epoch,
            epochs_run=self.epochs_run,
            train_seconds=self.seconds,
            best_valid_ndcg10=self.best_valid_ndcg10,
            history=tuple(self.history),
            **extra,
        )


def training_windows(split: LeaveOneOut, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) into split.data.items of every training window of up to max_len + 1 items.

    Long sequences are cut into non-overlapping windows from the most recent end backwards,
    so every training transition is used once per epoch, not only the last max_len.
    """
    starts, ends = [], []
    lengths = split.train_lengths()
    base = split.data.offsets[:-1]
    for u in np.flatnonzero(lengths >= 2):
        end = base[u] + lengths[u]
        while end - base[u] >= 2:
            start = max(base[u], end - (max_len + 1))
            starts.append(start)
            ends.append(end)
            end = start + 1  # next window's last item is this window's first (its first target)
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def choose_max_len(split: LeaveOneOut) -> int:
    """A high percentile of the training histories' lengths: long enough for nearly every user,
    without positions that almost no sequence reaches."""
    lengths = split.train_lengths()
    p99 = float(np.percentile(lengths[lengths > 0], 99)) if (lengths > 0).any() else MAX_LEN_RANGE[0]
    return int(np.clip(int(np.ceil(p99 / 10.0)) * 10, *MAX_LEN_RANGE))


def resolve_config(cfg: TrainConfig, split: LeaveOneOut) -> TrainConfig:
    """Fill in the settings left to the data (max_len 0, loss and device "auto") and log the choices."""
    changes = {}
    if cfg.max_len == 0:
        lengths = split.train_lengths()
        changes["max_len"] = choose_max_len(split)
        log.info(
            "max_len %d, from the data: training histories of %.1f items on average, 99th percentile %.0f "
            "(rounded up to a multiple of 10, within %d..%d; --max-len sets it)",
            changes["max_len"],
            lengths[lengths > 0].mean(),
            np.percentile(lengths[lengths > 0], 99),
            *MAX_LEN_RANGE,
        )
    if cfg.loss not in ("auto", "ce", "ss", "sampled"):
        raise ValueError(f"unknown loss {cfg.loss!r} (ss, ce, sampled or auto)")
    loss = cfg.loss
    if loss == "auto":
        n_items = split.data.n_items
        loss = changes["loss"] = "ce" if n_items <= CE_MAX_ITEMS else "ss" if n_items <= SS_MAX_ITEMS else "sampled"
        log.info(
            "loss %s for a catalogue of %d items (full softmax up to %d, uniform sampled softmax up to %d, "
            "else shared popularity negatives; --loss sets it)",
            loss,
            n_items,
            CE_MAX_ITEMS,
            SS_MAX_ITEMS,
        )
    if cfg.batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {cfg.batch_size}")
    if cfg.batch_size == 0:
        changes["batch_size"] = DEFAULT_BATCH[loss]
    if cfg.n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {cfg.n_negatives}")
    if cfg.n_negatives == 0:
        n = DEFAULT_NEGATIVES[loss]
        if loss == "ss" and split.data.n_items > n * cfg.dim:
            n = SS_GATHERED_NEGATIVES
        changes["n_negatives"] = n
    if cfg.device == "auto":
        changes["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    elif cfg.device != "cpu" and cfg.device != "cuda":
        raise ValueError(f"unknown device {cfg.device!r} (cpu, cuda or auto)")
    return dataclasses.replace(cfg, **changes)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of window indices: shuffled, then sorted by length within pools of
    LENGTH_POOL_BATCHES batches, cut into batches, and the batches shuffled again.

    A batch is padded to its longest window, so similar lengths in one batch cost what the data
    holds, not max_len for every window."""
    order = rng.permutation(len(lengths))
    pool = batch_size * LENGTH_POOL_BATCHES
    batches = []
    for s in range(0, len(order), pool):
        chunk = order[s : s + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _batch_tokens(items: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> torch.Tensor:
    """(B, W) left-padded token windows, W = the longest window in the batch."""
    width = int((ends - starts).max())
    out = np.zeros((len(starts), width), dtype=np.int64)
    for i, (s, e) in enumerate(zip(starts, ends)):
        out[i, width - (e - s) :] = items[s:e]
    return torch.from_numpy(out)


def _loss(model: SASRec, window: torch.Tensor, cfg: TrainConfig, neg_logq: tuple | None) -> torch.Tensor:
    inputs, targets = window[:, :-1], window[:, 1:]
    h = model.hidden(inputs)  # (B, L, D)
    keep = (inputs > 0) & (targets > 0)
    h, targets = h[keep], targets[keep]  # (N, D), (N,)
    if cfg.loss == "ce":
        logits = h @ model.item_vectors().T  # (N, I)
        if cfg.mask_seen:
            rows, cols = seen_positions(inputs, targets, keep)
            logits = logits.index_put(
                (rows, cols), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
            )
        return F.cross_entropy(logits.float(), targets - 1)
    if cfg.loss == "ss":
        # Uniform negatives, their own for every position, no correction: SASRec+SS as the
        # eSASRec benchmark trains it. Collisions with the target are dropped from the softmax.
        negatives = torch.randint(1, model.cfg.n_items + 1, (len(targets), cfg.n_negatives), device=targets.device)
        if model.cfg.n_items <= cfg.n_negatives * model.cfg.dim:
            # Small catalogue: every item's logit in one matmul, then the drawn columns; cheaper in
            # time and memory than gathering N × S embedding rows (same numbers).
            every = h @ model.item_vectors().T  # (N, I)
            pos = every.gather(1, (targets - 1).unsqueeze(1))  # (N, 1)
            neg = every.gather(1, negatives - 1)  # (N, S)
        else:
            pos = (h * model.item_emb(targets)).sum(-1, keepdim=True)  # (N, 1)
            neg = torch.einsum("nd,nsd->ns", h, model.item_emb(negatives))  # (N, S)
        drop = negatives == targets.unsqueeze(1)
        if cfg.mask_seen:
            drop |= seen_negatives(inputs, targets, keep, negatives, model.cfg.n_items + 1)
        neg = neg.masked_fill(drop, float("-inf"))
        logits = torch.cat([pos, neg], dim=1).float()
        return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=logits.device))
    negatives, logq = neg_logq  # (S,) rows, (I,) log sampling probability per row
    # Lookups through the embedding module keep the item table's gradient sparse.
    pos = (h * model.item_emb(targets)).sum(-1) - logq[targets - 1]  # (N,)
    neg = h @ model.item_emb(negatives + 1).T - logq[negatives]  # (N, S)
    neg = neg.masked_fill(negatives.unsqueeze(0) == (targets - 1).unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=logits.device))


def seen_positions(
    inputs: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, item rows) of the logits to mask: for each kept position n (row n of the (N, I)
    logits), the items its window has shown up to and including that position, target excepted.

    Evaluation never ranks seen items, so training does not spend the softmax on them either.
    Built from the (N, L) prefixes of real positions only, never a (B, L, I) mask: the cost follows
    the histories' lengths, not the catalogue.
    """
    b_of, p_of = keep.nonzero(as_tuple=True)  # (N,) window and position of each kept position
    prefix = inputs[b_of]  # (N, L) tokens of that position's window
    upto = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0) <= p_of.unsqueeze(1)
    seen = upto & (prefix > 0) & (prefix != targets.unsqueeze(1))
    rows, at = seen.nonzero(as_tuple=True)
    return rows, prefix[rows, at] - 1


def seen_negatives(
    inputs: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, negatives: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """(N, S) True where negative token s of position n is an item that position's window has already shown.

    Membership through (position, token) keys and one sorted search, never an (N, S, L) comparison."""
    rows, cols = seen_positions(inputs, targets, keep)
    if len(rows) == 0:
        return torch.zeros_like(negatives, dtype=torch.bool)
    seen = torch.unique(rows * n_tokens + cols + 1)  # sorted; cols are catalogue rows, tokens are rows + 1
    asked = torch.arange(len(negatives), device=negatives.device).unsqueeze(1) * n_tokens + negatives
    at = torch.searchsorted(seen, asked).clamp(max=len(seen) - 1)
    return seen[at] == asked


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def query_vectors(model: SASRec, histories: list[np.ndarray], batch_size: int = 512) -> np.ndarray:
    """Query vectors for token histories (any lengths), in eval mode."""
    from attnrec.engine.pipeline import pad_histories

    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(histories), batch_size):
        tokens = torch.from_numpy(pad_histories(histories[s : s + batch_size], model.cfg.max_len))
        out.append(model(tokens.to(_device_of(model))).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.cfg.dim), dtype=np.float32)


def validate(
    model: SASRec, split: LeaveOneOut, users: np.ndarray, popularity: np.ndarray, which: str = "valid"
) -> dict:
    es = split.valid if which == "valid" else split.test
    hist = [es.history(j) for j in users]
    items = model.item_vectors().detach().float().cpu().numpy()
    return evaluate_full_ranking(lambda h: query_vectors(model, h), items, hist, es.targets[users], popularity)


class _Optimizer:
    """AdamW; with sparse item gradients, SparseAdam for the item table so a step costs what
    the batch touched, not the whole (possibly million-row) table."""

    def __init__(self, model: SASRec, cfg: TrainConfig, sparse: bool) -> None:
        betas = (0.9, 0.98)
        rest = [p for n, p in model.named_parameters() if not (sparse and n == "item_emb.weight")]
        self.opts = [torch.optim.AdamW(rest, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)]
        if sparse:
            self.opts.append(torch.optim.SparseAdam([model.item_emb.weight], lr=cfg.lr, betas=betas))

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def state_dict(self) -> list:
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states: list) -> None:
        for o, s in zip(self.opts, states):
            o.load_state_dict(s)


def item_ids_digest(item_ids: np.ndarray) -> str:
    """A fingerprint of the id map, so a checkpoint is never exported against other data."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(item_ids[1:].tolist()).encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint


class PopularityNegatives:
    """loss="sampled": each batch's shared negatives, drawn ∝ (popularity + 1)^0.75, with their logQ correction."""

    def __init__(self, popularity: np.ndarray, n_negatives: int, device: torch.device) -> None:
        p = (popularity + 1.0) ** 0.75
        p /= p.sum()
        self.cdf = np.cumsum(p)
        self.logq = torch.from_numpy(np.log(p * n_negatives)).float().to(device)
        self.n_negatives, self.device = n_negatives, device

    def draw(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Inverse-CDF sampling: O(S log I) per batch, where multinomial would be O(I).
        draws = np.searchsorted(self.cdf, rng.random(self.n_negatives) * self.cdf[-1])
        return torch.from_numpy(np.minimum(draws, len(self.cdf) - 1)).to(self.device), self.logq


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of window indices: length-grouped (cfg.length_batches) or a plain shuffle."""
    if cfg.length_batches:
        return length_batches(lengths, cfg.batch_size, rng)
    order = rng.permutation(len(lengths))
    return [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]


def train_epoch(
    model: SASRec,
    opt: _Optimizer,
    items: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    *,
    negatives: PopularityNegatives | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    on_batch=None,
) -> float:
    """One pass over the training windows (starts, ends) into `items`: the training step of every
    trainer (centralised here, each federated client in export/federated.py). Returns the mean batch
    loss; on_batch(b, mean loss so far) after each batch."""
    device = _device_of(model)
    # bf16 autocast on a GPU (the matmuls in bf16, the loss in float32); float32 on the CPU.
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    model.train()
    batches = epoch_batches(ends - starts, cfg, rng)
    total = 0.0
    for b, idx in enumerate(batches):
        window = _batch_tokens(items, starts[idx], ends[idx]).to(device)
        neg = negatives.draw(rng) if negatives is not None else None
        with autocast():
            loss = _loss(model, window, cfg, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.item()
        if on_batch is not None:
            on_batch(b, total / (b + 1))
    return total / max(len(batches), 1)


def train(
    split: LeaveOneOut,
    cfg: TrainConfig,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    fresh: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train, checkpointing every epoch to `checkpoint`. An existing checkpoint is another run's:
    `resume` continues it, `fresh` starts over and overwrites it, and without either it is refused."""
    if resume and fresh:
        raise ValueError("--resume and --fresh exclude each other")
    if checkpoint and checkpoint.exists() and not (resume or fresh):
        raise ValueError(
            f"{checkpoint} holds the checkpoint of an earlier run: pass --resume to continue it, "
            "or --fresh to start over and overwrite it"
        )
    cfg = resolve_config(cfg, split)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    n_items = split.data.n_items
    sparse = cfg.loss == "sampled"
    device = torch.device(cfg.device)
    model = SASRec(cfg.model_config(n_items), sparse_items=sparse).to(device)
    opt = _Optimizer(model, cfg, sparse)
    # The averaged copy (when on) is what is validated, checkpointed as best and exported.
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay)
        )
        if cfg.ema_decay > 0
        else None
    )
    popularity = split.train_popularity()[1:].astype(np.float64)
    starts, ends = training_windows(split, cfg.max_len)
    if len(starts) == 0:
        raise ValueError("no user has two or more training interactions: nothing to train on")
    n_valid = len(split.valid)
    val_users = (
        np.arange(n_valid) if n_valid <= cfg.val_users else np.sort(rng.choice(n_valid, cfg.val_users, replace=False))
    )
    negatives = PopularityNegatives(popularity, cfg.n_negatives, device) if cfg.loss == "sampled" else None

    epoch, best, best_epoch, bad, history = 0, -1.0, 0, 0, []
    best_state = None
    if resume and checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        # Budgets (and where it runs) may change on resume; anything that shapes the model or the data order may not.
        budget = {"epochs", "patience", "time_budget_s", "threads", "device"}
        changed = sorted(k for k, v in asdict(cfg).items() if k not in budget and state["train_config"].get(k) != v)
        if changed:
            raise ValueError(
                f"{checkpoint} was written with other settings ({', '.join(changed)}); "
                "start without --resume or with the same settings"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        epoch, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        bad = epoch - best_epoch
        best_state, history = state["best_state"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at epoch %d (best NDCG@10 %.4f at epoch %d)", checkpoint, epoch, best, best_epoch)

    t0 = time.perf_counter()
    lengths = ends - starts
    n_batches = (
        len(length_batches(lengths, cfg.batch_size, np.random.default_rng(0)))
        if cfg.length_batches
        else -(-len(starts) // cfg.batch_size)
    )
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        ep_task = bar.add_task("epochs", total=cfg.epochs, completed=epoch, status="")
        b_task = bar.add_task("batches", total=n_batches, status="")
        while epoch < cfg.epochs and bad < cfg.patience:
            bar.reset(b_task, total=n_batches)
            last_log = time.perf_counter()

            def on_batch(b: int, mean_loss: float) -> None:
                nonlocal last_log
                bar.update(b_task, advance=1, status=f"loss {mean_loss:.4f}")
                if time.perf_counter() - last_log > 60:  # a heartbeat for logs that have no progress bar
                    last_log = time.perf_counter()
                    log.info("epoch %d: batch %d/%d, loss %.4f", epoch + 1, b + 1, n_batches, mean_loss)

            mean_loss = train_epoch(
                model, opt, split.data.items, starts, ends, cfg, rng, negatives=negatives, ema=ema, on_batch=on_batch
            )
            epoch += 1
            evaluated = ema.module if ema is not None else model
            metrics = validate(evaluated, split, val_users, popularity)
            ndcg = metrics["ndcg@10"]
            history.append({"epoch": epoch, "loss": mean_loss, "valid_ndcg@10": ndcg, "valid_hr@10": metrics["hr@10"]})
            if ndcg > best:
                best, best_epoch, bad = ndcg, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            else:
                bad += 1
            bar.update(ep_task, advance=1, status=f"valid NDCG@10 {ndcg:.4f} (best {best:.4f} @ {best_epoch})")
            log.info(
                "epoch %d: loss %.4f, valid NDCG@10 %.4f (best %.4f at epoch %d)",
                epoch,
                mean_loss,
                ndcg,
                best,
                best_epoch,
            )
            if checkpoint:
                _save_checkpoint(
                    checkpoint,
                    {
                        "train_config": asdict(cfg),
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "best_epoch": best_epoch,
                        "bad": bad,
                        "best_state": best_state,
                        "history": history,
                        "numpy_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                        "n_items": n_items,
                        "item_ids_sha256": item_ids_digest(split.data.item_ids),
                        "ema": ema.state_dict() if ema is not None else None,
                    },
                )
            if cfg.time_budget_s and time.perf_counter() - t0 > cfg.time_budget_s:
                log.info("time budget of %.0fs reached after epoch %d", cfg.time_budget_s, epoch)
                break
    model = model.cpu()  # what export and publishing read
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, cfg, best_epoch, best, epoch, time.perf_counter() - t0, history)
