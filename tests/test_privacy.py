"""User-level DP-SGD (export/dp_train.py): per-user gradients, the accountant's epsilon, the manifest."""

import math

import numpy as np
import pytest
import torch

from attnrec.export.config import PrivacyConfig, TrainConfig
from attnrec.export.dp_train import _Hidden, _user_loss, seen_mask, train_dp, user_windows
from attnrec.export.model import SASRec
from attnrec.export.train import _batch_tokens, seen_positions, training_windows

TINY = dict(max_len=12, dim=16, n_blocks=1, n_heads=1, ffn_dim=32, dropout=0.0, threads=2, seed=0)


def test_user_windows_cover_each_users_training_windows(small_split):
    starts, ends = training_windows(small_split, 12)
    per_user = user_windows(small_split, 12)
    assert sum(len(s) for s, _ in per_user) == len(starts)
    offsets = small_split.data.offsets
    for s, e in per_user:  # one user's windows only, each inside that user's sequence
        u = np.searchsorted(offsets, s, side="right") - 1
        assert (u == u[0]).all() and (e <= offsets[u[0] + 1]).all()


def test_dense_seen_mask_is_ordinary_trainings_mask(small_split):
    starts, ends = training_windows(small_split, 12)
    window = _batch_tokens(small_split.data.items, starts[:40], ends[:40])
    inputs, targets = window[:, :-1], window[:, 1:]
    n = small_split.data.n_items
    dense = seen_mask(inputs, targets, n)
    keep = (inputs > 0) & (targets > 0)
    rows, cols = seen_positions(inputs, targets[keep], keep)
    want = torch.zeros(int(keep.sum()), n, dtype=torch.bool)
    want[rows, cols] = True
    assert torch.equal(dense[keep], want)


def test_per_user_gradients_are_each_users_own_backward(small_split):
    cfg = TrainConfig(**TINY)
    model = SASRec(cfg.model_config(small_split.data.n_items))
    module = _Hidden(model)
    windows = user_windows(small_split, 12)
    starts = np.array([windows[u][0][0] for u in range(5)])
    ends = np.array([windows[u][1][0] for u in range(5)])
    window = _batch_tokens(small_split.data.items, starts, ends)
    seen = seen_mask(window[:, :-1], window[:, 1:], small_split.data.n_items)
    params = {n: p.detach() for n, p in module.named_parameters()}
    from torch.func import grad, vmap

    got = vmap(grad(lambda p, w, s: _user_loss(module, p, {}, w, s)), in_dims=(None, 0, 0))(params, window, seen)
    for i in range(5):  # reference: that user's window alone (its own padding), ordinary autograd
        model.zero_grad()
        alone = _batch_tokens(small_split.data.items, starts[i : i + 1], ends[i : i + 1])[0]
        s = seen_mask(alone[None, :-1], alone[None, 1:], small_split.data.n_items)[0]
        _user_loss(module, dict(module.named_parameters()), {}, alone, s).backward()
        for name, p in module.named_parameters():
            np.testing.assert_allclose(got[name][i].numpy(), p.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_dp_training_reports_the_accountants_epsilon(small_split):
    from opacus.accountants import RDPAccountant

    cfg = TrainConfig(**TINY)
    result, section = train_dp(small_split, cfg, PrivacyConfig(epsilon=4.0, epochs=2, batch_users=100), progress=False)
    n_users = len(user_windows(small_split, 12))
    assert section.users == n_users and section.sample_rate == pytest.approx(100 / n_users)
    assert section.delta == pytest.approx(1 / small_split.data.n_users)  # the default: 1 / users
    assert section.steps == 2 * round(n_users / 100) and result.epochs_run == 2
    # an independent accountant over the same (sigma, q, steps) gives the reported epsilon, within the target
    acc = RDPAccountant()
    acc.history = [(section.noise_multiplier, section.sample_rate, section.steps)]
    assert section.epsilon == pytest.approx(acc.get_epsilon(section.delta))
    assert 3.9 <= section.epsilon <= 4.0 and section.noise_multiplier > 0
    assert section.target_epsilon == 4.0 and section.max_grad_norm == 1.0 and section.accountant == "rdp"
    assert any("ranker" in x for x in section.not_covered) and any("popularity" in x for x in section.not_covered)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.history[-1]["epsilon"] == pytest.approx(
        section.epsilon
    )
    assert float(result.model.item_emb.weight[0].detach().abs().max()) == 0.0  # padding row kept at zero under noise
    # inf: the same loop, clipping only, no noise and no epsilon
    _, plain = train_dp(small_split, cfg, PrivacyConfig(epsilon=math.inf, epochs=1, batch_users=100), progress=False)
    assert plain.noise_multiplier == 0.0 and plain.epsilon is None and plain.target_epsilon is None


def test_bad_privacy_settings_are_refused(small_split):
    for kw, msg in (
        (dict(epsilon=0.0), "--dp-epsilon"),
        (dict(epsilon=1.0, delta=1.5), "--dp-delta"),
        (dict(epsilon=1.0, max_grad_norm=0), "--dp-max-grad-norm"),
        (dict(epsilon=1.0, accountant="gdp2"), "--dp-accountant"),
    ):
        with pytest.raises(ValueError, match=msg):
            PrivacyConfig(**kw)
    with pytest.raises(ValueError, match="--loss ce"):
        train_dp(small_split, TrainConfig(**TINY, loss="ss"), PrivacyConfig(epsilon=1.0), progress=False)


def test_train_dp_epsilon_publishes_a_version_with_its_privacy_section(tmp_path, small_log):
    from attnrec.cli import main
    from attnrec.engine.repository import open_version
    from attnrec.export.data.synthetic import write

    data = tmp_path / "log.parquet"
    write(small_log, data)
    args = ["-q", "train", "--data", str(data), "--out", str(tmp_path / "repo"), "--name", "dp", "--no-ranker"]
    args += ["--max-len", "12", "--dim", "16", "--n-blocks", "1", "--ffn-dim", "32", "--threads", "2"]
    assert main([*args, "--dp-epsilon", "8", "--dp-epochs", "2", "--dp-max-grad-norm", "0.5"]) == 0
    m = open_version(tmp_path / "repo" / "dp" / "1")
    p = m.training.privacy
    assert p.epsilon <= 8 and p.delta == pytest.approx(1 / len(np.unique(small_log.user)))
    assert p.max_grad_norm == 0.5 and p.noise_multiplier > 0 and p.steps >= 2 and p.opacus
    assert m.training.epochs_run == 2 and "DP-SGD" in m.training.note
    assert m.metrics.test["ndcg@10"] >= 0  # evaluated and published like any version
    assert main([*args, "--dp-epsilon", "8", "--resume"]) == 2  # refused with a clear line
