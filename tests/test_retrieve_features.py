"""`attnrec retrieve --rank` with a ranker that reads user and time features: the single-process job,
the Ray actors and the server path give the ranker what serving and `attnrec evaluate` give it (each
user's stored features, the log's timestamps, a request time), checked against `Pipeline.recommend`."""

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from serving import RunningServer, settings
from test_ranker_features import _ranker, export_ranker_file, tables  # noqa: F401 (tables: a fixture)
from test_retrieve import retrieve_args

from attnrec.cli import main
from attnrec.engine.client import RecommenderClient
from attnrec.engine.features import write_features
from attnrec.engine.pipeline import Pipeline
from attnrec.engine.repository import RankerSection, VersionWriter, newest_valid_version, open_version
from attnrec.export import retrieve as retrieve_mod
from attnrec.export.data.readers import read_interactions
from attnrec.export.data.sequences import build_sequences
from attnrec.export.evaluate import load_item_ids
from attnrec.export.retrieve_server import retrieve_from_server

AS_OF = 1_616_000_000  # inside the synthetic log's span: some users' newest timestamp is later
FUTURE = 2_400_000_000  # a shift that puts the 2020 log in the 2090s: later than the clock


def publish_with_features(src: Path, repo: Path, ranker_file: Path, tables) -> Path:  # noqa: F811
    """A copy of version `src` with `ranker_file` as its ranker and `tables` stored as its features."""
    manifest = open_version(src)
    with VersionWriter(repo, "seq") as w:
        files = {role: e.path for role, e in manifest.files.roles().items() if role != "ranker"}
        for rel in files.values():
            shutil.copy(src / rel, w.path / rel)
        shutil.copy(ranker_file, w.path / "ranker.onnx")
        return w.commit(
            files={**files, "ranker": "ranker.onnx"},
            model=manifest.model,
            encoder=manifest.encoder,
            index=manifest.index,
            ranker=RankerSection("target_attention", 30),
            metrics=manifest.metrics,
            training=manifest.training,
            data=manifest.data,
            features=write_features(w.path, tables),
        )


@pytest.fixture(scope="module")
def featured(trained_repo, tables, tmp_path_factory):  # noqa: F811
    """The trained version with a ranker reading user features and time (random weights), the user
    table stored in the version; the log it was trained on, with the version's id map."""
    data_path, src_repo = trained_repo
    root = tmp_path_factory.mktemp("retrieve-features")
    src, manifest = newest_valid_version(src_repo, "seq")
    vectors = torch.from_numpy(np.load(Path(src) / manifest.files.item_embeddings.path))
    ranker = _ranker(tables, manifest.model.n_items, manifest.model.dim, item_vectors=vectors, time=True)
    publish_with_features(src, root / "repo", export_ranker_file(ranker, root), tables)
    version_dir, manifest = newest_valid_version(root / "repo", "seq")
    data = build_sequences(read_interactions(data_path), item_vocab=load_item_ids(version_dir, manifest))
    assert data.timed
    pipe = Pipeline.load(version_dir)
    assert pipe.ranker.reads_user_features and pipe.ranker.reads_time and pipe.features.user is not None
    return data_path, root / "repo", version_dir, manifest, data, pipe


@pytest.fixture(scope="module")
def item_ids(featured):
    return load_item_ids(featured[2], featured[3])


def _inputs(data):
    """Every user's history rows, external id (str) and floored timestamps, and the newest of those."""
    hist = [data.sequence(u) - 1 for u in range(data.n_users)]
    ids = [str(u) for u in data.user_ids.tolist()]
    stamps = [
        np.floor(data.timestamps[data.offsets[u] : data.offsets[u + 1]]).astype(np.int64) for u in range(data.n_users)
    ]
    return hist, ids, stamps, np.array([int(s.max()) for s in stamps])


def _by_user(path: Path) -> dict:
    table = pq.read_table(path).sort_by([("user_id", "ascending"), ("rank", "ascending")]).to_pydict()
    out: dict = {}
    for u, item, s in zip(table["user_id"], table["item_id"], table["score"]):
        out.setdefault(u, ([], []))
        out[u][0].append(item)
        out[u][1].append(s)
    return out


def _assert_rows(got: dict, data, rec, ids_of_rows) -> None:
    assert len(got) == data.n_users
    for u, rows, scores in zip(data.user_ids.tolist(), rec.rows, rec.scores):
        assert got[u][0] == ids_of_rows[rows].tolist(), u
        np.testing.assert_allclose(got[u][1], scores, rtol=1e-5, atol=1e-5)


def _differs(a, b) -> int:
    return sum(x != y for x, y in zip(a.rows.tolist(), b.rows.tolist()))


def test_rank_gives_the_ranker_each_users_features_and_times_as_of_a_fixed_time(featured, item_ids, tmp_path):
    data_path, repo, version_dir, manifest, data, pipe = featured
    out = tmp_path / "ranked.parquet"
    assert main(retrieve_args(repo, data_path, out, "--top-n", "10", "--rank", "--as-of", str(AS_OF))) == 0
    assert pq.read_table(out).schema.metadata[b"as_of"] == str(AS_OF).encode()
    hist, ids, stamps, newest = _inputs(data)
    now = np.maximum(AS_OF, newest)  # the server's rule, the job's time in place of its clock
    assert (newest > AS_OF).any() and (newest < AS_OF).any()  # both sides of the rule are exercised
    want = pipe.recommend(hist, 10, user_ids=ids, history_times=stamps, request_times=now.tolist())
    _assert_rows(_by_user(out), data, want, item_ids)
    # Each feature group changes some user's answer, so dropping either would fail the comparison above.
    no_user = pipe.recommend(hist, 10, history_times=stamps, request_times=now.tolist())
    no_time = pipe.recommend(hist, 10, user_ids=ids)
    assert _differs(want, no_user) > 0 and _differs(want, no_time) > 0
    assert main(retrieve_args(repo, data_path, tmp_path / "bad.parquet", "--rank", "--as-of", "0")) == 2
    server = ["-q", "retrieve", "--server", "localhost:1", "--data", str(data_path), "--out", str(out), "--as-of", "5"]
    assert main(server) == 2  # refused before connecting: the server's clock is its request time


def test_without_as_of_the_request_time_is_the_jobs_clock(featured, item_ids, tmp_path):
    data_path, repo, version_dir, manifest, data, pipe = featured
    out = tmp_path / "now.parquet"
    t0 = int(time.time())
    users = list(range(0, data.n_users, 20))
    report = retrieve_mod.retrieve(
        version_dir, manifest, data, out, top_n=10, rank=True, users=data.user_ids[users], progress=False
    )
    assert report.users == len(users)
    clock = int(pq.read_table(out).schema.metadata[b"as_of"])
    assert t0 <= clock <= time.time()  # later than every timestamp of the 2020 log, so it is every request time
    hist, ids, stamps, _ = _inputs(data)
    want = pipe.recommend(
        [hist[u] for u in users],
        10,
        user_ids=[ids[u] for u in users],
        history_times=[stamps[u] for u in users],
        request_times=[clock] * len(users),
    )
    got = _by_user(out)
    for u, rows in zip(users, want.rows):
        assert got[data.user_ids[u]][0] == item_ids[rows].tolist()


def test_ray_actors_give_the_single_process_rows_with_features_and_times(featured, item_ids, tmp_path):
    ray = pytest.importorskip("ray")
    from attnrec.export.retrieve_ray import retrieve_ray

    data_path, repo, version_dir, manifest, data, pipe = featured
    single = tmp_path / "single.parquet"
    job = dict(top_n=10, batch_size=100, rank=True, as_of=AS_OF)
    retrieve_mod.retrieve(version_dir, manifest, data, single, progress=False, **job)
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        retrieve_ray(version_dir, manifest, data, tmp_path / "ray", workers=2, **job)
    finally:
        ray.shutdown()
    keys = [("user_id", "ascending"), ("rank", "ascending")]
    a, b = pq.read_table(tmp_path / "ray").sort_by(keys), pq.read_table(single).sort_by(keys)
    assert a.num_rows == b.num_rows == data.n_users * 10
    for col in ("user_id", "rank", "item_id"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)
    # and both are the ranker's answer with the features and times (the single-process rows are checked)
    hist, ids, stamps, newest = _inputs(data)
    want = pipe.recommend(
        hist, 10, user_ids=ids, history_times=stamps, request_times=np.maximum(AS_OF, newest).tolist()
    )
    _assert_rows(_by_user(single), data, want, item_ids)


def test_server_path_sends_the_histories_timestamps_and_no_user_id(featured, item_ids, tmp_path):
    _, repo, version_dir, manifest, data, pipe = featured
    # The log moved to the 2090s, so each user's newest timestamp, not the server's clock, is the request time.
    data = dataclasses.replace(data, timestamps=data.timestamps + FUTURE)
    out = tmp_path / "server.parquet"
    with RunningServer(settings(repo)) as s, RecommenderClient(s.target) as client:
        retrieve_from_server(client, data, out, top_n=10, batch_size=100, progress=False)
    hist, _, stamps, newest = _inputs(data)
    # No user_id goes out (it names a stored history there): the ranker sees unknown users.
    want = pipe.recommend(hist, 10, history_times=stamps, request_times=newest.tolist())
    _assert_rows(_by_user(out), data, want, item_ids)
    assert _differs(want, pipe.recommend(hist, 10)) > 0  # the timestamps changed some answer
