"""Offline retrieval: exact agreement with a numpy reference, atomic output, unknown users reported."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from attnrec.cli import main
from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.pipeline import Pipeline, encode, encode_histories, pad_histories, score
from attnrec.engine.ranker import OnnxRanker
from attnrec.engine.repository import newest_valid_version
from attnrec.export import retrieve as retrieve_mod
from attnrec.export.data.readers import read_interactions
from attnrec.export.data.sequences import build_sequences
from attnrec.export.evaluate import load_item_ids, load_item_vectors


def retrieve_args(repo, data_path, out, *extra: str) -> list[str]:
    """`attnrec retrieve` arguments for the shared test model."""
    return ["-q", "retrieve", "--repo", str(repo), "--name", "seq", "--data", str(data_path), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def version(trained_repo):
    data_path, repo = trained_repo
    version_dir, manifest = newest_valid_version(repo, "seq")
    data = build_sequences(read_interactions(data_path), item_vocab=load_item_ids(version_dir, manifest))
    return data_path, repo, version_dir, manifest, data


def test_output_matches_a_numpy_full_ranking(version, tmp_path):
    data_path, repo, version_dir, manifest, data = version
    out = tmp_path / "cands.parquet"
    assert main(retrieve_args(repo, data_path, out, "--top-n", "25", "--batch-size", "64")) == 0
    table = pq.read_table(out).to_pydict()
    assert pq.ParquetFile(out).num_row_groups == int(np.ceil(data.n_users / 64))  # one row group per batch
    assert len(table["user_id"]) == data.n_users * 25
    assert set(table["model_version"]) == {manifest.version}
    # reference: every user's full history → ONNX query → exact scores over all items, seen removed
    enc = OnnxEncoder(version_dir / "encoder.onnx", manifest.model.max_len)
    items = load_item_vectors(version_dir, manifest)
    ids = load_item_ids(version_dir, manifest)
    for u in (0, 7, data.n_users - 1):
        hist = data.sequence(u)
        scores = encode_histories(enc, [hist])[0] @ items.T
        scores[hist - 1] = -np.inf
        best = np.argsort(-scores, kind="stable")[:25]
        rows = [i for i, x in enumerate(table["user_id"]) if x == data.user_ids[u]]
        assert [table["rank"][i] for i in rows] == list(range(1, 26))
        assert [table["item_id"][i] for i in rows] == ids[best].tolist()
        np.testing.assert_allclose([table["score"][i] for i in rows], scores[best], rtol=1e-5, atol=1e-5)


def test_unknown_users_are_reported_and_strict_mode_fails(version, tmp_path):
    data_path, repo, version_dir, manifest, data = version
    users = tmp_path / "users.txt"
    users.write_text(f"{data.user_ids[3]}\nnobody\n999999\n{data.user_ids[5]}\n")
    out = tmp_path / "some.parquet"
    report = retrieve_mod.retrieve(
        version_dir, manifest, data, out, top_n=5, users=retrieve_mod.read_user_file(users), progress=False
    )
    assert report.unknown_users == ["nobody", "999999"] and report.users == 2
    assert sorted(set(pq.read_table(out).column("user_id").to_pylist())) == sorted([data.user_ids[3], data.user_ids[5]])
    args = retrieve_args(repo, data_path, out, "--top-n", "5", "--users", str(users))
    assert main(args) == 0
    assert main([*args, "--strict-users"]) == 3


def test_a_crash_mid_run_leaves_no_file_that_looks_complete(version, tmp_path, monkeypatch):
    data_path, repo, version_dir, manifest, data = version
    real_recommend, calls = retrieve_mod.Pipeline.recommend, []

    def failing_recommend(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-run")
        return real_recommend(*a, **kw)

    monkeypatch.setattr(retrieve_mod.Pipeline, "recommend", failing_recommend)
    out = tmp_path / "cands.parquet"
    with pytest.raises(RuntimeError, match="killed"):
        retrieve_mod.retrieve(version_dir, manifest, data, out, top_n=10, batch_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its partial file


def test_rank_gives_the_pipelines_ranked_answer(version, tmp_path):
    data_path, repo, version_dir, manifest, data = version
    out = tmp_path / "ranked.parquet"
    assert main(retrieve_args(repo, data_path, out, "--top-n", "10", "--rank")) == 0
    table = pq.read_table(out)
    assert table.schema.metadata[b"ranked"] == b"true"
    clock = int(table.schema.metadata.get(b"as_of", b"0"))  # the job's request-time rule, when its ranker reads time
    table = table.to_pydict()
    ids = load_item_ids(version_dir, manifest)
    # reference: the ranker's scores of the FAISS top-N (whole history excluded), sorted by hand
    enc = OnnxEncoder(version_dir / "encoder.onnx", manifest.model.max_len)
    ranker = OnnxRanker(version_dir / "ranker.onnx")
    items = load_item_vectors(version_dir, manifest)
    n = manifest.ranker.n_candidates
    for u in (0, 11, data.n_users - 1):
        hist = data.sequence(u)
        tokens = pad_histories([hist], manifest.model.max_len)
        outs = encode(enc, tokens)
        exact = outs["query"][0] @ items.T
        exact[hist - 1] = -np.inf
        cands = np.argsort(-exact, kind="stable")[:n]
        feeds = {
            "history": tokens,
            "hidden": outs.get("hidden"),  # read only by a ranker over hidden states
            "candidates": cands[None] + 1,
            "candidate_scores": exact[cands][None].astype(np.float32),
        }
        if ranker.reads_time:  # the times the job fed: the history's seconds, max(its clock, the newest)
            stamps = retrieve_mod.history_seconds(data, u)
            feeds["history_timestamps"] = pad_histories([stamps], manifest.model.max_len)
            feeds["request_time"] = np.array([[retrieve_mod.request_time(stamps, clock)]])
        scores = score(ranker, feeds)[0]
        best = cands[np.argsort(-scores, kind="stable")[:10]]
        rows = [i for i, x in enumerate(table["user_id"]) if x == data.user_ids[u]]
        assert [table["item_id"][i] for i in rows] == ids[best].tolist()
        np.testing.assert_allclose([table["score"][i] for i in rows], np.sort(scores)[::-1][:10], rtol=1e-5, atol=1e-5)


def test_rerank_flags_give_the_pipelines_reranked_answer(version, tmp_path):
    data_path, repo, version_dir, manifest, data = version
    out = tmp_path / "diverse.parquet"
    flags = ("--top-n", "10", "--rank", "--diversity", "0.5", "--popularity-calibration", "0.25")
    assert main(retrieve_args(repo, data_path, out, *flags)) == 0
    table = pq.read_table(out)
    assert table.schema.metadata[b"diversity"] == b"0.5"
    assert table.schema.metadata[b"popularity_calibration"] == b"0.25"
    clock = int(table.schema.metadata.get(b"as_of", b"0"))
    table = table.to_pydict()
    ids = load_item_ids(version_dir, manifest)
    pipe = Pipeline.load(version_dir)
    users = [0, 11, data.n_users - 1]
    times = {}
    if pipe.ranker is not None and pipe.ranker.reads_time:  # the times the job fed the ranker
        stamps = [retrieve_mod.history_seconds(data, u) for u in users]
        times = {"history_times": stamps, "request_times": [retrieve_mod.request_time(t, clock) for t in stamps]}
    hists = [data.sequence(u) - 1 for u in users]
    want = pipe.recommend(hists, 10, diversity=0.5, popularity_calibration=0.25, **times)
    plain = pipe.recommend(hists, 10, **times)
    assert want.rows.tolist() != plain.rows.tolist()
    for u, w in zip(users, want.rows):
        rows = [i for i, x in enumerate(table["user_id"]) if x == data.user_ids[u]]
        assert [table["item_id"][i] for i in rows] == ids[w].tolist()
    assert main(retrieve_args(repo, data_path, tmp_path / "bad.parquet", "--diversity", "1.5")) == 2
    assert not (tmp_path / "bad.parquet").exists()


def test_bad_top_n_is_refused(version, tmp_path):
    _, _, version_dir, manifest, data = version
    with pytest.raises(ValueError, match="top-n"):
        retrieve_mod.retrieve(version_dir, manifest, data, tmp_path / "x.parquet", top_n=0, progress=False)


def test_ray_pipeline_gives_the_single_process_rows(version, tmp_path):
    ray = pytest.importorskip("ray")
    from attnrec.export.retrieve_ray import retrieve_ray

    data_path, repo, version_dir, manifest, data = version
    single = tmp_path / "single.parquet"
    retrieve_mod.retrieve(version_dir, manifest, data, single, top_n=20, batch_size=50, progress=False)
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        report = retrieve_ray(version_dir, manifest, data, tmp_path / "ray", top_n=20, batch_size=50, workers=2)
    finally:
        ray.shutdown()
    keys = [("user_id", "ascending"), ("rank", "ascending")]
    a = pq.read_table(tmp_path / "ray").sort_by(keys)
    b = pq.read_table(single).sort_by(keys)
    assert report.rows == a.num_rows == b.num_rows == data.n_users * 20
    for col in ("user_id", "rank", "item_id", "model_version"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray", "single.parquet"]  # no partial left behind
