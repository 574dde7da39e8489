"""The second-stage ranker: training samples without leakage, ONNX parity, and the evaluation's three rows."""

import json

import numpy as np
import pytest
import torch

from attnrec.cli import main
from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.pipeline import Pipeline, encode, pad_histories, score, search
from attnrec.engine.ranker import OnnxRanker
from attnrec.engine.repository import newest_valid_version
from attnrec.export.config import RankerConfig
from attnrec.export.evaluate import load_item_vectors
from attnrec.export.index_build import build_index
from attnrec.export.onnx_export import ParityError
from attnrec.export.ranker_export import check_ranker_parity, export_ranker
from attnrec.export.ranker_model import RankerShape, TargetAttentionRanker
from attnrec.export.ranker_train import (
    eval_candidates,
    gain_z,
    torch_encode,
    train_ranker,
    training_prefixes,
    training_samples,
)
from attnrec.export.ranking_metrics import topk_excluding


@pytest.fixture(scope="module")
def stage_one(tiny_model):
    vectors = np.ascontiguousarray(tiny_model.item_vectors().detach().numpy())
    return vectors, build_index(vectors, "Flat")


def test_training_prefixes_come_from_the_training_part_and_never_target_a_seen_item(small_split):
    users, cuts = training_prefixes(small_split, samples_per_user=4)
    assert len(users) > 3 * small_split.data.n_users  # most users give 4
    lengths = small_split.train_lengths()
    assert (cuts >= 1).all() and (cuts < lengths[users]).all()  # target inside the training part
    for u, t in zip(users, cuts):
        seq = small_split.train_sequence(u)
        assert seq[t] not in seq[:t]
    # a user's samples are its most recent training positions
    u0 = users[0]
    assert cuts[users == u0].max() == lengths[u0] - 1


def test_training_samples_always_hold_the_true_item_and_never_a_seen_one(small_split, tiny_model, stage_one):
    vectors, index = stage_one
    cfg = RankerConfig(n_candidates=20, samples_per_user=3, attend_last=8)
    sets, n_prefixes = training_samples(small_split, torch_encode(tiny_model), 20, index, vectors, cfg)
    users, cuts = training_prefixes(small_split, 3)
    assert n_prefixes == len(users) and 0 < len(sets) < len(users)  # prefixes whose target was missed are dropped
    assert sets.candidates.shape == (len(sets), 20)
    assert (sets.target_slot >= 0).all()
    # rebuild each kept sample's prefix and target; the kept ones are in prefix order
    prefixes = [
        small_split.data.items[small_split.data.offsets[u] : small_split.data.offsets[u] + t]
        for u, t in zip(users, cuts)
    ]
    targets = small_split.data.items[small_split.data.offsets[users] + cuts]
    # reference: stage one for all prefixes at once (padding does not change a query)
    q = torch_encode(tiny_model)(pad_histories(prefixes, 20))["query"]
    _, rows = search(index, q, 20, exclude=[p - 1 for p in prefixes])
    kept = [(p, t, r) for p, t, r in zip(prefixes, targets, rows) if t - 1 in r]
    assert len(kept) == len(sets)
    for j in range(0, len(sets), 23):
        prefix, target, rows = kept[j]
        np.testing.assert_array_equal(sets.candidates[j], rows + 1)  # stage one's top-20, in order
        assert sets.candidates[j, sets.target_slot[j]] == target  # the true item is among them
        assert target not in prefix and not np.isin(sets.candidates[j], prefix).any()  # nothing seen
        assert (sets.tokens[j][-min(8, len(prefix)) :] == prefix[-8:]).all()  # the ranker's view of the history


def test_validation_candidates_never_include_the_answer_by_construction(small_split, tiny_model, stage_one):
    vectors, index = stage_one
    cfg = RankerConfig(n_candidates=20, attend_last=8)
    sets = eval_candidates(small_split.valid, torch_encode(tiny_model), 20, index, vectors, cfg)
    assert sets.candidates.shape == (len(small_split.valid), 20)
    assert (sets.target_slot == -1).any()  # validation keeps every user, found or not
    found = sets.target_slot >= 0
    np.testing.assert_array_equal(sets.candidates[found, sets.target_slot[found]], small_split.valid.targets[found])


def test_gain_z_is_the_paired_mean_over_its_standard_error():
    base = np.array([0.0, 0.5, 0.0, 1.0])
    gains = base + np.array([0.5, 0.0, 0.25, 0.25])
    # reference: mean 0.25, sample std sqrt(0.125 / 3), standard error that / 2
    assert gain_z(gains, base) == pytest.approx(0.25 / (np.sqrt(0.125 / 3) / 2))
    assert gain_z(base, base) == 0.0
    assert gain_z(base + 0.25, base) == np.inf and gain_z(base - 0.25, base) == -np.inf
    assert gain_z(base - np.array([0.5, 0.0, 0.25, 0.25]), base) < 0


def test_a_ranker_whose_validation_gain_is_not_significant_ships_as_stage_one(small_split, tiny_model, stage_one):
    vectors, index = stage_one
    shape = RankerShape(tiny_model.cfg.n_items, tiny_model.cfg.dim, attend_last=8, mlp_dim=32)
    common = dict(n_candidates=20, samples_per_user=3, attend_last=8, mlp_dim=32, epochs=3, patience=3, lr=3e-3)
    args = (small_split, torch_encode(tiny_model), 20, index, vectors)
    free = train_ranker(*args, RankerConfig(**common, min_gain_z=-np.inf), shape)
    assert free.best_epoch >= 1 and free.rejected_epoch == 0  # any improvement ships without the test
    strict = train_ranker(*args, RankerConfig(**common, min_gain_z=np.inf), shape)
    # the same training, so the same best epoch and z, rejected: the shipped ranker is stage one's order
    assert strict.rejected_epoch == free.best_epoch and strict.valid_gain_z == pytest.approx(free.valid_gain_z)
    assert strict.best_epoch == 0 and strict.best_valid_ndcg10 == strict.stage1_valid_ndcg10
    tokens = torch.from_numpy(pad_histories([small_split.valid.history(0)], 20))
    cands, scores = torch.tensor([[3, 9, 1, 0]]), torch.tensor([[2.0, 1.5, -1.0, 0.0]])
    with torch.no_grad():
        torch.testing.assert_close(strict.ranker(tokens, tiny_model.hidden(tokens), cands, scores), scores)
        assert not torch.allclose(free.ranker(tokens, tiny_model.hidden(tokens), cands, scores), scores)


def test_embedding_lr_scale_zero_keeps_the_encoders_item_embeddings(small_split, tiny_model, stage_one):
    vectors, index = stage_one
    shape = RankerShape(tiny_model.cfg.n_items, tiny_model.cfg.dim, attend_last=8, mlp_dim=32)
    # No wide fit: every epoch trains the MLP and the embeddings, so the best one is an Adam epoch.
    common = dict(n_candidates=20, samples_per_user=3, attend_last=8, mlp_dim=32, epochs=2, patience=3, lr=3e-3)
    common["wide_fit"] = False
    args = (small_split, torch_encode(tiny_model), 20, index, vectors)
    frozen = train_ranker(*args, RankerConfig(**common, min_gain_z=-np.inf, embedding_lr_scale=0.0), shape)
    moving = train_ranker(*args, RankerConfig(**common, min_gain_z=-np.inf, embedding_lr_scale=1.0), shape)
    assert frozen.best_epoch >= 1 and moving.best_epoch >= 1  # both shipped a trained epoch
    np.testing.assert_array_equal(frozen.ranker.item_emb.weight[1:].detach().numpy(), vectors)
    assert not np.allclose(moving.ranker.item_emb.weight[1:].detach().numpy(), vectors)
    assert frozen.ranker.mlp[-1].weight.abs().sum() > 0  # the rest did train


def _trained_like_ranker(tiny_model, small_split, keys, attend_last=8):
    shape = RankerShape(tiny_model.cfg.n_items, tiny_model.cfg.dim, attend_last=attend_last, keys=keys, mlp_dim=32)
    pop = small_split.train_popularity()[1:]
    ranker = TargetAttentionRanker(shape, tiny_model.item_vectors().detach(), pop).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # move off the zero-initialised last layer so every input matters
        for p in ranker.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ranker


@pytest.mark.parametrize("keys", ["items", "hidden"])
def test_ranker_starts_as_stage_one(tiny_model, small_split, keys):
    shape = RankerShape(tiny_model.cfg.n_items, tiny_model.cfg.dim, attend_last=8, keys=keys, mlp_dim=32)
    ranker = TargetAttentionRanker(shape, tiny_model.item_vectors().detach()).eval()
    tokens = torch.from_numpy(pad_histories([small_split.valid.history(0)], 20))
    cands = torch.tensor([[3, 9, 1, 0]])
    scores = torch.tensor([[2.0, 1.5, -1.0, 0.0]])
    with torch.no_grad():
        out = ranker(tokens, tiny_model.hidden(tokens), cands, scores)
    torch.testing.assert_close(out, scores)


@pytest.mark.parametrize("keys", ["items", "hidden"])
def test_onnx_ranker_matches_torch_for_any_batch_length_and_candidate_count(tmp_path, tiny_model, small_split, keys):
    ranker = _trained_like_ranker(tiny_model, small_split, keys)
    path = tmp_path / "ranker.onnx"
    names = export_ranker(ranker, path)
    onnx = OnnxRanker(path)
    want = (
        ["history", "hidden", "candidates", "candidate_scores"]
        if keys == "hidden"
        else ["history", "candidates", "candidate_scores"]
    )
    assert onnx.input_names == names == want and onnx.needs_hidden == (keys == "hidden")
    real = [small_split.valid.history(j) for j in range(16)]
    report = check_ranker_parity(ranker, tiny_model, path, real)
    assert report.max_abs_diff <= 1e-4
    assert {c["candidates"] for c in report.cases} >= {1, 37, 200, 500}
    # padding and batch neighbours change nothing: one user alone = the same user in a padded batch
    h = small_split.valid.history(3)
    tokens = pad_histories([h[-5:], h], 20)
    hidden = tiny_model.hidden(torch.from_numpy(tokens)).detach().numpy()
    cands = np.array([[4, 8, 15, 16], [23, 42, 7, 0]])
    feeds = {"history": tokens, "hidden": hidden, "candidates": cands, "candidate_scores": np.ones((2, 4), np.float32)}
    both = score(onnx, feeds)
    alone_tokens = pad_histories([h[-5:]], 20)
    alone = score(
        onnx,
        {
            "history": alone_tokens,
            "hidden": tiny_model.hidden(torch.from_numpy(alone_tokens)).detach().numpy(),
            "candidates": cands[:1],
            "candidate_scores": np.ones((1, 4), np.float32),
        },
    )
    np.testing.assert_allclose(both[0], alone[0], atol=1e-5)
    # a broken graph is caught
    with torch.no_grad():
        ranker.mlp[0].bias.add_(1.0)
    with pytest.raises(ParityError):
        check_ranker_parity(ranker, tiny_model, path, real)


def _reference_rows(version_dir, manifest, es, n):
    """numpy reference of the three rows: exact top-20, FAISS(Flat) top-20, ranker over exact top-n."""
    enc = OnnxEncoder(version_dir / "encoder.onnx", manifest.model.max_len)
    ranker = OnnxRanker(version_dir / "ranker.onnx")
    items = load_item_vectors(version_dir, manifest)
    exact_top, ranked_top, in_top_n = [], [], []
    for j in range(len(es)):
        hist = es.history(j)
        tokens = pad_histories([hist], manifest.model.max_len)
        outs = encode(enc, tokens)
        scores = outs["query"] @ items.T
        top = topk_excluding(scores.copy(), [hist - 1], n)[0]
        exact_top.append(top[:20])
        in_top_n.append(es.targets[j] - 1 in top)
        feeds = {"history": tokens, "hidden": outs.get("hidden"), "candidates": top[None] + 1}
        feeds["candidate_scores"] = scores[0, top][None].astype(np.float32)
        if es.hist_times is not None and "request_time" in ranker.input_names:  # as evaluate passes them
            feeds["history_timestamps"] = pad_histories(
                [np.floor(es.history_times(j)).astype(np.int64)], manifest.model.max_len
            )
            feeds["request_time"] = np.array([[int(np.floor(es.target_times[j]))]])
        ranked_top.append(top[np.argsort(-score(ranker, feeds)[0], kind="stable")][:20])
    return np.array(exact_top), np.array(ranked_top), float(np.mean(in_top_n))


def _ndcg10(top, targets):
    hit = top[:, :10] == (targets - 1)[:, None]
    pos = hit.argmax(axis=1)
    return float(np.where(hit.any(axis=1), 1.0 / np.log2(pos + 2.0), 0.0).mean())


def test_evaluate_reports_three_rows_that_match_a_reference(trained_repo, tmp_path, small_split):
    data, repo = trained_repo
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "--repo", str(repo), "--name", "seq", "--data", str(data), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    pipe = result["pipeline"]
    assert set(pipe) >= {"exact", "ann", "ranked", "stage1_recall@50"} and pipe["served"] == "ranked"
    assert result["test"] == pipe["ranked"]["test"] and result["valid"] == pipe["ranked"]["valid"]
    version_dir, manifest = newest_valid_version(repo, "seq")
    exact_top, ranked_top, recall = _reference_rows(version_dir, manifest, small_split.test, 50)
    targets = small_split.test.targets
    assert pipe["exact"]["test"]["ndcg@10"] == pytest.approx(_ndcg10(exact_top, targets), abs=1e-9)
    assert pipe["ann"]["test"] == pipe["exact"]["test"]  # a Flat index: stage one is exact
    assert pipe["ranked"]["test"]["ndcg@10"] == pytest.approx(_ndcg10(ranked_top, targets), abs=1e-9)
    assert pipe["stage1_recall@50"]["test"] == pytest.approx(recall, abs=1e-12)
    for row in ("exact", "ann", "ranked"):
        assert pipe[row]["test"]["users"] == pipe[row]["valid"]["users"] == 400


def test_known_answers_all_items_as_candidates_and_n_equal_to_k(trained_repo, tmp_path, small_split):
    """N = the catalogue: stage one finds every target it may rank (all but repeats of a seen item).
    N = 20: the ranker only re-orders stage one's top 20, so HR@20 equals stage one's."""
    data, repo = trained_repo
    version_dir, _ = newest_valid_version(repo, "seq")
    pipeline = Pipeline.load(version_dir)
    from attnrec.export.evaluate import evaluate_pipeline

    vectors = load_item_vectors(version_dir, pipeline.manifest)
    full = evaluate_pipeline(pipeline, vectors, small_split, n_candidates=pipeline.n_items, progress=False)
    for which, es in (("test", small_split.test), ("valid", small_split.valid)):
        repeats = np.mean([t in es.history(j) for j, t in enumerate(es.targets)])
        assert full["pipeline"][f"stage1_recall@{pipeline.n_items}"][which] == pytest.approx(1 - repeats)
    twenty = evaluate_pipeline(pipeline, vectors, small_split, n_candidates=20, progress=False)["pipeline"]
    for which in ("test", "valid"):
        assert twenty["ranked"][which]["hr@20"] == twenty["ann"][which]["hr@20"] == twenty["stage1_recall@20"][which]
