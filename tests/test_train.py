import numpy as np
import pytest
import torch

from engine.metrics import evaluate_full_ranking
from export.train import TrainConfig, train, training_windows, validate

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
    from engine.metrics import evaluate_full_ranking

    es = small_split.valid
    base = evaluate_full_ranking(lambda h: np.ones((len(h), 1), np.float32), pop.astype(np.float32)[:, None],
                                 [es.history(j) for j in users], es.targets, pop)
    assert model["ndcg@10"] > 1.5 * base["ndcg@10"]  # 4 epochs of a 16-dim model already clear this
    assert a.best_valid_ndcg10 == pytest.approx(model["ndcg@10"])


def test_resume_continues_from_the_checkpoint(tmp_path, small_split):
    ckpt = tmp_path / "ckpt.pt"
    first = train(small_split, TrainConfig(epochs=2, patience=9, **FAST), checkpoint=ckpt, progress=False)
    assert first.epochs_run == 2
    resumed = train(small_split, TrainConfig(epochs=3, patience=9, **FAST), checkpoint=ckpt, resume=True,
                    progress=False)
    assert resumed.epochs_run == 3 and len(resumed.history) == 3
    assert resumed.history[:2] == first.history
    straight = train(small_split, TrainConfig(epochs=3, patience=9, **FAST), progress=False)
    assert [h["loss"] for h in straight.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)
    with pytest.raises(ValueError, match="dim"):
        train(small_split, TrainConfig(epochs=3, patience=9, **{**FAST, "dim": 8}), checkpoint=ckpt, resume=True,
              progress=False)


def test_sampled_softmax_trains(small_split):
    res = train(small_split, TrainConfig(epochs=2, patience=2, loss="sampled", n_negatives=64, **FAST), progress=False)
    assert res.history[1]["loss"] < res.history[0]["loss"]
    assert res.best_valid_ndcg10 > 0
