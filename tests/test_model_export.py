import numpy as np
import pytest
import torch

from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.pipeline import encode, encode_histories, pad_histories
from attnrec.export.model import SASRec, SASRecConfig
from attnrec.export.onnx_export import ParityError, check_parity, export_encoder


def test_pad_histories_left_pads_to_the_longest_and_truncates():
    out = pad_histories([np.array([1, 2]), np.array([3, 4, 5, 6])], max_len=3)
    assert out.tolist() == [[0, 1, 2], [4, 5, 6]]
    assert pad_histories([np.array([], dtype=np.int64)], 5).tolist() == [[0]]


def test_query_does_not_depend_on_padding_or_batch_neighbours():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=50, max_len=12, dim=16, n_heads=2, ffn_dim=32)).eval()
    h = np.array([5, 9, 2])
    with torch.no_grad():
        alone = model(torch.tensor(np.array([h])))
        padded = model(torch.from_numpy(pad_histories([h, np.arange(1, 13)], 12)))[0]
    assert torch.allclose(alone[0], padded, atol=1e-5)


def test_causality_a_later_item_does_not_change_earlier_states():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=50, max_len=8, dim=16)).eval()
    with torch.no_grad():
        a = model.hidden(torch.tensor([[0, 3, 4, 7]]))
        b = model.hidden(torch.tensor([[0, 3, 4, 9]]))
    assert torch.allclose(a[0, 1:3], b[0, 1:3], atol=1e-6)  # position 0 is padding: no meaning
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_onnx_export_matches_torch(tmp_path, tiny_model, small_split):
    path = export_encoder(tiny_model, tmp_path / "encoder.onnx")
    real = [small_split.valid.history(j) for j in range(16)]
    report = check_parity(tiny_model, path, real)
    assert report.max_abs_diff <= 1e-4
    assert set(report.by_length) >= {1, tiny_model.cfg.max_len}
    # the serving wrapper gives the same vectors as torch for unpadded, different-length histories
    enc = OnnxEncoder(path, tiny_model.cfg.max_len)
    got = encode_histories(enc, real[:4])
    with torch.no_grad():
        want = np.stack(
            [tiny_model(torch.tensor(np.array([h[-tiny_model.cfg.max_len :]])))[0].numpy() for h in real[:4]]
        )
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert enc.providers[-1] == "CPUExecutionProvider"


def test_parity_check_fails_on_a_graph_that_differs(tmp_path, tiny_model):
    path = export_encoder(tiny_model, tmp_path / "encoder.onnx")
    other = SASRec(tiny_model.cfg)
    other.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        other.ln_f.bias += 1e-3  # a small, real difference
    with pytest.raises(ParityError, match="differs from torch"):
        check_parity(other.eval(), path)


def test_last_position_shortcut_equals_the_full_forward():
    torch.manual_seed(1)
    model = SASRec(SASRecConfig(n_items=40, max_len=10, dim=16, n_heads=2, ffn_dim=32, n_blocks=3)).eval()
    tokens = torch.from_numpy(pad_histories([np.array([3, 5, 7]), np.arange(1, 11)], 10))
    with torch.no_grad():
        assert torch.allclose(model(tokens), model.hidden(tokens)[:, -1], atol=1e-5)


def test_export_with_hidden_states(tmp_path, tiny_model):
    path = export_encoder(tiny_model, tmp_path / "encoder.onnx", with_hidden=True)
    report = check_parity(tiny_model, path)
    assert report.max_abs_diff <= 1e-4
    enc = OnnxEncoder(path, tiny_model.cfg.max_len)
    out = encode(enc, pad_histories([np.array([1, 2, 3])], tiny_model.cfg.max_len))
    assert out["hidden"].shape == (1, 3, tiny_model.cfg.dim)
    np.testing.assert_allclose(out["query"], out["hidden"][:, -1], atol=1e-6)
