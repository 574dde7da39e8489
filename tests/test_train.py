import numpy as np
import pytest
import torch

from attnrec.export.ranking_metrics import evaluate_full_ranking
from attnrec.export.train import TrainConfig, train, training_windows, validate

FAST = dict(max_len=16, dim=16, n_blocks=1, n_heads=1, ffn_dim=32, batch_size=64, seed=5, threads=2)


def test_training_windows_cover_every_transition_once(small_split):
    starts, ends = training_windows(small_split, max_len=7)
    assert ((ends - starts) <= 8).all() and ((ends - starts) >= 2).all()
    # transitions per window = length - 1; together they are every training transition
    lengths = small_split.train_lengths()
    assert int((ends - starts - 1).sum()) == int(np.clip(lengths - 1, 0, None).sum())


def test_training_beats_popularity_and_is_reproducible(small_split):
    a = train(small_split, TrainConfig(epochs=4, patience=4, **FAST), progress=False)
    b = train(small_split, TrainConfig(epochs=4, patience=4, **FAST), progress=False)
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), k
    pop = small_split.train_popularity()[1:].astype(float)
    users = np.arange(len(small_split.valid))
    model = validate(a.model, small_split, users, pop)

    es = small_split.valid
    base = evaluate_full_ranking(
        lambda h: np.ones((len(h), 1), np.float32),
        pop.astype(np.float32)[:, None],
        [es.history(j) for j in users],
        es.targets,
        pop,
    )
    assert model["ndcg@10"] > 1.5 * base["ndcg@10"]  # 4 epochs of a 16-dim model already clear this
    assert a.best_valid_ndcg10 == pytest.approx(model["ndcg@10"])


def test_resume_continues_from_the_checkpoint(tmp_path, small_split):
    ckpt = tmp_path / "ckpt.pt"
    first = train(small_split, TrainConfig(epochs=2, patience=9, **FAST), checkpoint=ckpt, progress=False)
    assert first.epochs_run == 2
    resumed = train(
        small_split, TrainConfig(epochs=3, patience=9, **FAST), checkpoint=ckpt, resume=True, progress=False
    )
    assert resumed.epochs_run == 3 and len(resumed.history) == 3
    assert resumed.history[:2] == first.history
    straight = train(small_split, TrainConfig(epochs=3, patience=9, **FAST), progress=False)
    assert [h["loss"] for h in straight.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)
    with pytest.raises(ValueError, match="dim"):
        train(
            small_split,
            TrainConfig(epochs=3, patience=9, **{**FAST, "dim": 8}),
            checkpoint=ckpt,
            resume=True,
            progress=False,
        )


def test_sampled_softmax_trains(small_split):
    res = train(small_split, TrainConfig(epochs=2, patience=2, loss="sampled", n_negatives=64, **FAST), progress=False)
    assert res.history[1]["loss"] < res.history[0]["loss"]
    assert res.best_valid_ndcg10 > 0


def _dense_seen(inputs, targets, keep, n_items):
    """(N, I) mask from the (rows, items) pairs that training masks."""
    from attnrec.export.train import seen_positions

    seen = torch.zeros(int(keep.sum()), n_items, dtype=torch.bool)
    rows, cols = seen_positions(inputs, targets, keep)
    seen[rows, cols] = True
    return seen


def _reference_seen(inputs, targets, keep, n_items):
    """The (B, L, I) construction training used before: every item seen up to each position."""
    b, t = inputs.shape
    pos = torch.arange(t).expand(b, t)
    first = torch.full((b, n_items + 1), t, dtype=torch.long)
    first.scatter_reduce_(1, inputs, pos, reduce="amin")
    seen = (first[:, 1:].unsqueeze(1) <= pos.unsqueeze(2))[keep]
    seen[torch.arange(len(targets)), targets - 1] = False
    return seen


def test_seen_mask_hides_earlier_items_of_the_window_but_never_the_target():
    inputs = torch.tensor([[0, 2, 3, 2]])  # tokens; 0 = padding
    targets = torch.tensor([[2, 3, 2, 4]])  # next tokens; position 0 (input pad) is not trained
    keep = (inputs > 0) & (targets > 0)
    seen = _dense_seen(inputs, targets[keep], keep, n_items=4)
    # rows: positions 1..3; columns: catalogue rows (token - 1)
    assert seen.tolist() == [
        [False, True, False, False],  # saw 2; target 3 is new
        [False, False, True, False],  # saw 2, 3 → but target 2 (a repeat) stays a candidate
        [False, True, True, False],  # saw 2, 3; target 4
    ]


def test_seen_mask_matches_the_dense_construction_on_random_windows():
    g = torch.Generator().manual_seed(0)
    for n_items, b, t in ((7, 5, 9), (40, 16, 30), (3, 4, 12)):
        inputs = torch.randint(1, n_items + 1, (b, t), generator=g)
        inputs[:, : t // 3] *= torch.rand(b, t // 3, generator=g) < 0.3  # left padding, some real items
        inputs = torch.where(torch.cumsum(inputs > 0, dim=1) > 0, inputs, 0)  # padding only on the left
        targets = torch.cat([inputs[:, 1:], torch.randint(1, n_items + 1, (b, 1), generator=g)], dim=1)
        keep = (inputs > 0) & (targets > 0)
        want = _reference_seen(inputs, targets[keep], keep, n_items)
        assert torch.equal(_dense_seen(inputs, targets[keep], keep, n_items), want)
        assert want.any()  # the case exercises masking at all


def test_length_batches_cover_every_window_once_and_group_similar_lengths():
    from attnrec.export import train as t

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 200, size=10_000)
    batches = t.length_batches(lengths, 64, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert max(len(b) for b in batches) == 64
    # padding to each batch's longest window: far less than random batches pay
    padded = sum(len(b) * lengths[b].max() for b in batches)
    order = rng.permutation(len(lengths))
    random_padded = sum(64 * lengths[order[i : i + 64]].max() for i in range(0, len(order), 64))
    assert padded < 0.6 * random_padded
    # a new epoch, a new order
    again = t.length_batches(lengths, 64, np.random.default_rng(2))
    assert not np.array_equal(flat, np.concatenate(again))


def test_max_len_loss_and_negatives_are_chosen_from_the_data(small_split, monkeypatch):
    from attnrec.export import train as train_module
    from attnrec.export.train import CE_MAX_ITEMS, choose_max_len, resolve_config

    lengths = small_split.train_lengths()
    p99 = np.percentile(lengths[lengths > 0], 99)
    chosen = choose_max_len(small_split)
    assert chosen == min(200, max(50, int(np.ceil(p99 / 10)) * 10))
    cfg = resolve_config(TrainConfig(), small_split)
    # a small catalogue: the full softmax, at the batch size it was tuned with
    assert cfg.max_len == chosen and cfg.loss == "ce" and cfg.batch_size == 64 and cfg.device == "cpu"
    assert small_split.data.n_items <= CE_MAX_ITEMS
    ss = resolve_config(TrainConfig(loss="ss"), small_split)
    assert ss.n_negatives == 512 and ss.batch_size == 128  # the catalogue fits one (N, I) matmul
    # a catalogue too big for the matmul (more than default x dim items): gathered draws, the benchmark's 256
    monkeypatch.setitem(train_module.DEFAULT_NEGATIVES, "ss", 100)
    assert small_split.data.n_items > 100 * 2
    assert resolve_config(TrainConfig(loss="ss", dim=2), small_split).n_negatives == 256
    assert resolve_config(TrainConfig(loss="ss", dim=4), small_split).n_negatives == 100
    assert resolve_config(TrainConfig(loss="ss", batch_size=32), small_split).batch_size == 32
    assert resolve_config(TrainConfig(max_len=33, loss="sampled"), small_split).max_len == 33
    assert resolve_config(TrainConfig(loss="sampled"), small_split).n_negatives == 2048
    assert resolve_config(TrainConfig(loss="ss", n_negatives=7), small_split).n_negatives == 7
    with pytest.raises(ValueError, match="unknown loss"):
        resolve_config(TrainConfig(loss="bpr"), small_split)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_config(TrainConfig(device="cuda"), small_split)


def test_ema_weights_are_the_ones_returned(small_split):
    plain = train(small_split, TrainConfig(epochs=2, patience=2, **FAST), progress=False)
    averaged = train(small_split, TrainConfig(epochs=2, patience=2, ema_decay=0.9, **FAST), progress=False)
    # same seed and data order: the raw weights match, so any difference comes from averaging
    assert plain.history[0]["loss"] == pytest.approx(averaged.history[0]["loss"])
    w_plain, w_avg = plain.model.item_emb.weight, averaged.model.item_emb.weight
    assert not torch.allclose(w_plain, w_avg)


def test_seen_negatives_match_a_brute_force_membership_test():
    from attnrec.export.train import seen_negatives, seen_positions

    g = torch.Generator().manual_seed(1)
    for n_items, b, t, s in ((9, 4, 8, 6), (50, 8, 20, 32)):
        inputs = torch.randint(1, n_items + 1, (b, t), generator=g)
        inputs[:, :2] = 0  # left padding
        targets = torch.cat([inputs[:, 1:], torch.randint(1, n_items + 1, (b, 1), generator=g)], dim=1)
        keep = (inputs > 0) & (targets > 0)
        tgt = targets[keep]
        negatives = torch.randint(1, n_items + 1, (len(tgt), s), generator=g)
        got = seen_negatives(inputs, tgt, keep, negatives, n_items + 1)
        rows, cols = seen_positions(inputs, tgt, keep)
        pairs = set(zip(rows.tolist(), (cols + 1).tolist()))
        want = torch.tensor([[(n, int(x)) in pairs for x in negatives[n]] for n in range(len(tgt))])
        assert torch.equal(got, want)
        assert want.any() and not want.all()


def test_uniform_sampled_softmax_trains_and_never_scores_seen_negatives(small_split, monkeypatch):
    from attnrec.export import train as t

    res = train(small_split, TrainConfig(epochs=3, patience=3, loss="ss", n_negatives=32, **FAST), progress=False)
    assert res.config.loss == "ss" and res.config.n_negatives == 32
    assert res.history[2]["loss"] < res.history[0]["loss"]
    pop = small_split.train_popularity()[1:].astype(float)
    es = small_split.valid
    base = evaluate_full_ranking(
        lambda h: np.ones((len(h), 1), np.float32),
        pop.astype(np.float32)[:, None],
        [es.history(j) for j in range(len(es))],
        es.targets,
        pop,
    )
    assert res.best_valid_ndcg10 > 1.5 * base["ndcg@10"]

    # the logits the loss sees, with every item drawn as a negative of every position: the seen
    # ones and the target's own column are -inf, every other one finite, the positive always finite
    captured = {}
    real_ce = t.F.cross_entropy

    def spy(logits, labels, *a, **k):
        captured["logits"] = logits.detach()
        return real_ce(logits, labels, *a, **k)

    n_items = small_split.data.n_items
    monkeypatch.setattr(t.F, "cross_entropy", spy)
    monkeypatch.setattr(
        t.torch, "randint", lambda lo, hi, size, device=None: torch.arange(lo, hi).expand(size[0], hi - lo)
    )
    window = torch.tensor([[0, 1, 2, 3, 1, 2, 4]])  # inputs 0 1 2 3 1 2, targets 1 2 3 1 2 4
    t._loss(res.model.train(), window, res.config, None)
    logits = captured["logits"]  # (5 positions, 1 + n_items): column 1 + r is token r + 1
    assert logits.shape == (5, 1 + n_items) and torch.isfinite(logits[:, 0]).all()
    blocked = [{1, 2}, {1, 2, 3}, {1, 2, 3}, {1, 2, 3}, {1, 2, 3, 4}]  # seen so far, and the target
    for row, tokens in enumerate(blocked):
        inf = set((torch.nonzero(logits[row, 1:] == float("-inf")).flatten() + 1).tolist())
        assert inf == tokens, row


def test_a_checkpoint_of_an_earlier_run_is_not_overwritten_without_resume_or_fresh(tmp_path, small_split):
    ckpt = tmp_path / "ckpt.pt"
    cfg = TrainConfig(epochs=1, patience=9, **FAST)
    train(small_split, cfg, checkpoint=ckpt, progress=False)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="checkpoint of an earlier run: pass --resume to continue it, or --fresh"):
        train(small_split, cfg, checkpoint=ckpt, progress=False)
    assert ckpt.read_bytes() == before
    with pytest.raises(ValueError, match="exclude each other"):
        train(small_split, cfg, checkpoint=ckpt, resume=True, fresh=True, progress=False)
    again = train(
        small_split,
        TrainConfig(epochs=1, patience=9, **{**FAST, "seed": 6}),
        checkpoint=ckpt,
        fresh=True,
        progress=False,
    )
    assert again.epochs_run == 1 and ckpt.read_bytes() != before
