"""User-level differentially private training of the SASRec encoder: DP-SGD with Opacus.

The protected record is a user: everything in that user's training part. A user's contribution to
the model is bounded like this: every step samples users, not windows, each user independently with
probability q (Poisson sampling, Opacus' UniformWithReplacementSampler); a sampled user contributes
one training window (up to max_len + 1 of their training items, drawn uniformly among their windows,
so long histories are still used over the run), whose loss is the mean over its positions; that one
per-user gradient is clipped to L2 norm C (Opacus' DPOptimizer), the clipped gradients are summed,
Gaussian noise of std sigma * C is added and the sum is divided by the expected batch q * users.
Adding or removing a user therefore changes each step's sum by at most C, and Opacus' accountant
(RDP by default) turns sigma, q and the number of steps into the run's epsilon at delta. sigma is
calibrated up front for the target epsilon (opacus.accountants.utils.get_noise_multiplier).

Per-user gradients come from torch.func (vmap of grad over the batch): SASRec reads its item table
twice (the input lookup and the tied output layer) and its positions without a batch dimension,
which Opacus' module hooks cannot attribute per sample; the clipping, noise and accounting are
Opacus' own. There is no early stopping: picking the best epoch on validation would read the users'
validation items, so the run has a fixed length and the last weights are exported (validation NDCG
is logged only). The loss is the full softmax (ce), seen items masked as in ordinary training.

Not covered by epsilon (the manifest says so): the catalogue itself (which items exist, their ids,
the min-interaction filter), the popularity counts shipped for the fallback and the re-rank, the FAISS
index tuning on validation users' queries, the ranker (trained non-privately unless --no-ranker),
the evaluation figures in the manifest and its training history (per-epoch loss and validation NDCG).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from attnrec.engine.repository import PrivacySection

from .config import PrivacyConfig, TrainConfig
from .data.sequences import LeaveOneOut
from .model import SASRec
from .train import TrainResult, _batch_tokens, resolve_config, training_windows, validate

log = logging.getLogger(__name__)

MAX_BATCH_USERS = 512  # batch_users=0: a quarter of the users, at most this many
DP_MAX_LEN = 50  # max_len=0 under DP


def user_windows(split: LeaveOneOut, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per user with at least one training transition: the (starts, ends) of their training windows."""
    starts, ends = training_windows(split, max_len)
    user = np.searchsorted(split.data.offsets, starts, side="right") - 1
    cut = np.flatnonzero(np.diff(user)) + 1
    return [(s, e) for s, e in zip(np.split(starts, cut), np.split(ends, cut)) if len(s)]


def seen_mask(inputs: torch.Tensor, targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, L, I) True where catalogue row r was shown in the window at or before position l and is
    not l's target: the logits ordinary training masks (export/train.py seen_positions), dense."""
    b, length = inputs.shape
    onehot = torch.zeros(b, length, n_items + 1, dtype=torch.int32)
    onehot.scatter_(2, inputs.unsqueeze(-1), 1)
    seen = onehot.cumsum(1) > 0
    seen.scatter_(2, targets.unsqueeze(-1), False)
    return seen[..., 1:]


class _Hidden(torch.nn.Module):
    """SASRec's training view (hidden states of every position), for functional_call."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(tokens)


def _user_loss(module, params, buffers, window, seen):
    """One user's loss: the mean full-softmax cross-entropy over their window's positions."""
    inputs, targets = window[:-1], window[1:]
    h = functional_call(module, (params, buffers), (inputs.unsqueeze(0),))[0]  # (L, D)
    logits = h @ params["model.item_emb.weight"][1:].T  # (L, I): the tied output layer
    logits = logits.masked_fill(seen, float("-inf"))
    keep = ((inputs > 0) & (targets > 0)).float()
    ce = F.cross_entropy(logits, (targets - 1).clamp(min=0), reduction="none")
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)


def train_dp(
    split: LeaveOneOut, cfg: TrainConfig, privacy: PrivacyConfig, *, progress: bool = True
) -> tuple[TrainResult, PrivacySection]:
    """Train with DP-SGD; the model (last weights, CPU, eval mode) and the manifest's privacy section."""
    import opacus
    from opacus.accountants.utils import create_accountant, get_noise_multiplier
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if cfg.loss not in ("auto", "ce"):
        raise ValueError(f"--dp-epsilon trains with the full softmax (--loss ce), not --loss {cfg.loss}")
    if cfg.max_len == 0:  # a user's one sample per step costs its length: the published short-history floor
        cfg = dataclasses.replace(cfg, max_len=DP_MAX_LEN)
        log.info("max_len %d under DP (--max-len sets it)", DP_MAX_LEN)
    # what ran: the full softmax on the CPU at the DP learning rate (the config recorded in the manifest)
    cfg = resolve_config(dataclasses.replace(cfg, loss="ce", device="cpu", lr=privacy.lr), split)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    n_items = split.data.n_items
    windows = user_windows(split, cfg.max_len)
    n_users = len(windows)
    if n_users == 0:
        raise ValueError("no user has two or more training interactions: nothing to train on")
    delta = privacy.delta or 1.0 / split.data.n_users
    if not privacy.delta:
        # The contract is delta = 1/n_users by default; DP practice wants delta well below 1/n,
        # since a mechanism that publishes one user's data outright with probability 1/n meets (0, 1/n)-DP.
        log.warning(
            "delta defaults to 1/users = %.3g; the usual choice is delta << 1/users (e.g. %.1g): "
            "pass --dp-delta for a stronger guarantee",
            delta,
            1.0 / split.data.n_users**1.5,
        )
    batch = privacy.batch_users or min(MAX_BATCH_USERS, max(1, n_users // 4))
    q = min(1.0, batch / n_users)
    steps_per_epoch = max(1, round(1 / q))
    steps = privacy.epochs * steps_per_epoch
    private = math.isfinite(privacy.epsilon)
    sigma = (
        get_noise_multiplier(
            target_epsilon=privacy.epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=privacy.accountant,
        )
        if private
        else 0.0
    )
    log.info(
        "DP-SGD: %d users, q = %.4f (%.0f users per step on average), %d steps, clip C = %g, noise sigma = %.4f "
        "for epsilon %s at delta %.3g (%s accountant)",
        n_users,
        q,
        q * n_users,
        steps,
        privacy.max_grad_norm,
        sigma,
        f"{privacy.epsilon:g}" if private else "inf (no noise: not private)",
        delta,
        privacy.accountant,
    )

    model = SASRec(cfg.model_config(n_items))
    module = _Hidden(model)
    base = torch.optim.AdamW(model.parameters(), lr=privacy.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = DPOptimizer(
        base,
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=max(1, round(q * n_users)),
        generator=gen,
    )
    accountant = create_accountant(mechanism=privacy.accountant)
    sampler = UniformWithReplacementSampler(num_samples=n_users, sample_rate=q, steps=steps_per_epoch, generator=gen)
    names = [n for n, _ in module.named_parameters()]
    per_user_grads = vmap(
        grad_and_value(lambda p, b, w, s: _user_loss(module, p, b, w, s)),
        in_dims=(None, None, 0, 0),
        randomness="different",
    )
    popularity = split.train_popularity()[1:].astype(np.float64)
    n_valid = len(split.valid)
    val_users = (
        np.arange(n_valid) if n_valid <= cfg.val_users else np.sort(rng.choice(n_valid, cfg.val_users, replace=False))
    )
    history: list[dict] = []
    t0 = time.perf_counter()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns.append(TextColumn("{task.fields[status]}"))
    epoch = step = 0
    last = {"ndcg@10": float("nan"), "hr@10": float("nan")}
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("DP-SGD steps", total=steps, status="")
        while epoch < privacy.epochs:
            model.train()
            total, counted = 0.0, 0
            for users in sampler:
                users = np.asarray(users, dtype=np.int64)
                params = {n: p.detach() for n, p in module.named_parameters()}
                buffers = {n: b.detach() for n, b in module.named_buffers()}
                if len(users):
                    picks = [rng.integers(len(windows[u][0])) for u in users]
                    starts = np.array([windows[u][0][i] for u, i in zip(users, picks)])
                    ends = np.array([windows[u][1][i] for u, i in zip(users, picks)])
                    window = _batch_tokens(split.data.items, starts, ends)
                    seen = seen_mask(window[:, :-1], window[:, 1:], n_items)
                    if not cfg.mask_seen:
                        seen = torch.zeros_like(seen)
                    grads, losses = per_user_grads(params, buffers, window, seen)
                    total += float(losses.sum())
                    counted += len(users)
                else:  # Poisson sampling may draw nobody: the step is noise alone, as the accountant assumes
                    grads = {n: torch.zeros((0, *p.shape)) for n, p in params.items()}
                for n, p in zip(names, module.parameters()):
                    p.grad_sample = grads[n]
                opt.step()
                opt.zero_grad()
                accountant.step(noise_multiplier=sigma, sample_rate=q)
                with torch.no_grad():
                    model.item_emb.weight[0].zero_()  # the padding row: noise lands there too; keep it zero
                step += 1
                bar.update(task, advance=1, status=f"epoch {epoch + 1}, loss {total / max(counted, 1):.4f}")
            epoch += 1
            last = validate(model, split, val_users, popularity)
            eps_now = accountant.get_epsilon(delta) if private else float("inf")
            history.append(
                {
                    "epoch": epoch,
                    "loss": total / max(counted, 1),
                    "valid_ndcg@10": last["ndcg@10"],
                    "valid_hr@10": last["hr@10"],
                    "epsilon": eps_now if private else None,
                }
            )
            log.info(
                "DP epoch %d: loss %.4f, valid NDCG@10 %.4f (logged only), epsilon so far %s",
                epoch,
                total / max(counted, 1),
                last["ndcg@10"],
                f"{eps_now:.3f}" if private else "inf",
            )
            if cfg.time_budget_s and time.perf_counter() - t0 > cfg.time_budget_s:
                log.info(
                    "time budget of %.0fs reached after epoch %d: epsilon is for the steps run",
                    cfg.time_budget_s,
                    epoch,
                )
                break
    epsilon = accountant.get_epsilon(delta) if private else None
    model.eval()
    section = PrivacySection(
        mechanism="DP-SGD (Opacus DPOptimizer over AdamW): per-user gradient clipping and Gaussian noise, "
        "Poisson sampling of users",
        unit="user: a step samples each user with probability sample_rate; a sampled user contributes one "
        "training window (drawn among their windows), whose per-user gradient is clipped to max_grad_norm",
        delta=delta,
        max_grad_norm=privacy.max_grad_norm,
        noise_multiplier=sigma,
        accountant=privacy.accountant,
        sample_rate=q,
        steps=step,
        target_epsilon=privacy.epsilon if private else None,
        epsilon=epsilon,
        users=n_users,
        covered=("encoder.onnx", "item_embeddings.npy", "items.faiss (built from the private embeddings)"),
        not_covered=(
            "item_ids.json: the catalogue (which items occur, after the min-interaction filter)",
            "item_popularity.npy: exact training counts (popularity fallback, re-rank groups)",
            "items.faiss search parameters, tuned on validation users' query vectors",
            "ranker.onnx when present: trained without differential privacy",
            "metrics: evaluated on the users' validation and test items",
            "training.history: per-epoch training loss and validation NDCG@10 / HR@10, computed without noise",
        ),
        opacus=opacus.__version__,
    )
    result = TrainResult(model, cfg, epoch, last["ndcg@10"], epoch, time.perf_counter() - t0, history)
    return result, section
