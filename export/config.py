"""Model and training settings: plain dataclasses, importable without torch (the CLI builds its flags from them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class ModelShape:
    """The encoder's architecture: the one declaration that SASRecConfig and TrainConfig (its flags) share."""

    max_len: int = 0  # 0: chosen from the data when training (export/train.py choose_max_len)
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    ffn_dim: int = 256
    dropout: float = 0.2


@dataclass
class SASRecConfig(ModelShape):
    n_items: int = field(kw_only=True)  # catalogue size; tokens are 1..n_items, 0 is padding

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(
                f"a model reads at least one item (max_len {self.max_len}); train chooses it from the data"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig(ModelShape):
    # "ss": sampled softmax, uniform negatives per position; "ce": full softmax; "sampled": shared
    # popularity negatives with logQ (huge catalogues); "auto": ce up to CE_MAX_ITEMS items, ss up to
    # SS_MAX_ITEMS, else sampled (export/train.py)
    loss: str = "auto"
    mask_seen: bool = True  # ce/ss: items already in the history are no candidates in the softmax
    n_negatives: int = 0  # per position (ss) or per batch (sampled); 0: 256 for ss, 2048 for sampled
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 0  # training windows per batch; 0: 128 for ss, 64 for ce and sampled
    epochs: int = 200
    ema_decay: float = 0.0  # >0: validate and export an exponential moving average of the weights
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    val_users: int = 10000  # validation users sampled for early stopping (all if fewer)
    time_budget_s: float = 0.0  # stop after this much training time (0: no limit)
    threads: int = 0  # torch CPU threads (0: torch's default)
    # Batches of similar-length windows (less padding). Off by default: on MovieLens-100K it
    # changed the per-position weighting enough to cost test NDCG@10 (0.102 vs 0.113, seed 0).
    length_batches: bool = False
    device: str = "auto"  # "cpu", "cuda", or "auto" (cuda when torch sees one); bf16 autocast on cuda
    seed: int = 0

    def model_config(self, n_items: int) -> SASRecConfig:
        """The model's part of these settings, for a catalogue of `n_items`."""
        return SASRecConfig(n_items=n_items, **{f.name: getattr(self, f.name) for f in fields(ModelShape)})


@dataclass
class PrivacyConfig:
    """User-level DP-SGD for the encoder (`attnrec train --dp-*`, export/dp_train.py)."""

    epsilon: float  # target ε for the whole run; inf: the same loop with clipping and no noise (not private)
    delta: float = 0.0  # 0: 1 / the number of users in the data
    max_grad_norm: float = 1.0  # C: each user's per-step gradient is clipped to this L2 norm
    epochs: int = 10  # fixed (no early stopping on validation, which would spend privacy): steps = epochs / q
    batch_users: int = 0  # expected users per step (Poisson rate q = batch_users / users); 0: a quarter of them, <= 512
    accountant: str = "rdp"  # Opacus accountant: rdp or prv
    # AdamW's learning rate under DP: a fixed, short run of noisy steps needs larger ones than ordinary training
    # (MovieLens-100K, epsilon 8, 40 steps, seed 0, test NDCG@10: lr 3e-3 0.0474, 1e-2 0.0525; popularity 0.0446)
    lr: float = 1e-2

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"--dp-epsilon must be > 0 (inf: no noise), got {self.epsilon}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"--dp-delta must be in [0, 1) (0: 1/users), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"--dp-max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.epochs < 1 or self.batch_users < 0:
            raise ValueError(
                f"--dp-epochs must be >= 1 and --dp-batch-users >= 0, got {self.epochs}, {self.batch_users}"
            )
        if not self.lr > 0:
            raise ValueError(f"--dp-lr must be > 0, got {self.lr}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"--dp-accountant must be rdp or prv, got {self.accountant!r}")


# The ranker's feature groups (`RankerConfig.features`, `--ranker-features`); trend needs time.
FEATURE_GROUPS = ("item", "user", "time", "cf", "trend")


@dataclass
class RankerConfig:
    """The second-stage ranker's shape and training (flags `--ranker-*` of train and export)."""

    n_candidates: int = 200  # stage one's top-N: what the ranker re-orders, in training and serving
    attend_last: int = 50  # the most recent history positions each candidate attends over
    keys: str = "items"  # attend over the ranker's own item embeddings ("items") or the encoder's states ("hidden")
    mlp_dim: int = 64  # hidden size of the scoring MLP (two layers: mlp_dim, mlp_dim // 2)
    dropout: float = 0.1
    samples_per_user: int = 10  # training prefixes per user: the most recent positions of the training part
    # 3e-4 learned too slowly to pass the significance gate on synthetic context data (identity; 3e-3: +3.9%
    # validation NDCG@10) and made no difference on ml-100k (identity either way); see
    # benchmarks/results/ranker-synth-oracle-2026-12-01.md
    lr: float = 3e-3
    # The id embeddings' learning rate, as a share of lr (0: frozen at the encoder's). Frozen since 2026-12-02:
    # trained, they re-fit the training users' items and the ranker shipped as the identity on ml-100k; frozen,
    # with the cf and trend features, it gained 13-16% test NDCG@10 (benchmarks/results/ranker-issue13-*.md).
    embedding_lr_scale: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128  # training prefixes per batch (each with its n_candidates candidates)
    epochs: int = 20
    # Epochs without a better two-stage validation NDCG@10 before stopping. 4: with frozen embeddings the MLP
    # passes the wide fit (epoch 1) only after several epochs (ml-100k: its best epochs were 7 and 9).
    patience: int = 4
    # The best epoch ships only when its paired per-user validation gain over stage one is at least
    # this many standard errors (0: any gain ships); else the ranker is stage one's order.
    min_gain_z: float = 2.0
    # Validation users sampled for early stopping and the gate (all if fewer). 20,000 (was 5,000): the gate's
    # power grows with them, and a catalogue-sized check costs seconds per epoch; on Amazon Toys (19,412 users)
    # 5,000 of them put seed 1's +3.9% validation gain at 1.75 standard errors, under the gate.
    val_users: int = 20000
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)
    # Leak-free samples (export/ranker_train.py): each user's last `holdout` training interactions,
    # candidates from an encoder trained without them (0: recent prefixes, the served encoder's, unless
    # holdout_auto decides otherwise).
    holdout: int = 0
    # With holdout 0: hold out each user's last training interaction (as holdout 1) when the served stage one
    # finds its own training targets in its top-N at least this many times as often as validation targets
    # (0: never). The memorised samples teach the ranker only to trust stage one: on Amazon Toys (85% of
    # training targets against 31% of validation targets, 2.7x) the ranker shipped as the identity, with
    # hold-out samples it gained 5-9% test NDCG@10 (3 seeds); on ml-100k (about 1.08x) recent prefixes won
    # (benchmarks/results/ranker-issue13-2026-12-02.md). It costs a second encoder training when it triggers.
    holdout_auto: float = 1.5
    serve_encoder: str = "full"  # with holdout: serve the encoder trained on everything ("full") or that one
    # Feature groups the ranker reads when the version has them: item, user (side-feature files), time
    # (the log's timestamps), cf (EASE's item-item score, export/ease.py), trend (the candidate's popularity at
    # the request time, export/trend.py; needs timestamps) ("" or "none" = none).
    features: str = "item,user,time,cf,trend"
    feature_dim: int = 16
    feature_dropout: float = 0.3  # share of training samples scored without item / user / time features
    cross_dim: int = 0  # rank of the item-features x (user, time) cross; 0 = none
    cf_lambda: float = 0.0  # EASE's L2 weight; 0 = the best of ease.LAMBDA_GRID on validation
    cf_neighbours: int = 64  # EASE weights kept per item in the ranker's graph
    wide_fit: bool = True  # epoch 1 fits the wide part alone (L-BFGS) before the MLP trains
