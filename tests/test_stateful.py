"""Stateful serving (issue 14): stored histories (RecordEvents, Recommend's user_id), business filters
and live availability, on the embedded store and on a real Redis shared by two replicas; the
same filters on the KServe pipeline model and in `attnrec retrieve`."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as tc
from serving import RunningServer, free_port, settings
from tritonclient.utils import InferenceServerException

from attnrec.engine.client import RecommenderClient, events
from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.features import FeatureTables, write_features
from attnrec.engine.history_store import open_history_store
from attnrec.engine.pipeline import encode_histories
from attnrec.engine.repository import VersionWriter, newest_valid_version, open_version
from attnrec.engine.telemetry import Telemetry
from attnrec.export.data.features import encode_features, read_feature_file
from attnrec.export.evaluate import load_item_ids, load_item_vectors
from attnrec.export.ranking_metrics import topk_excluding

CATEGORIES = ("toys", "books", "games", "garden")
K = 10


# ── a real redis-server on a loopback port ────────────────────────────────────────────────────
class RedisServer:
    """redis-server (Debian package) in the foreground on 127.0.0.1:port, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir, self.port = workdir, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed (apt-get install -y redis-server; .ci/run does)"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [*cmd, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # bounded: until it answers PING
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r.url


# ── a version with item attributes ────────────────────────────────────────────────────────────
def attributes_of(item_id: int) -> dict[str, object]:
    """The reference values (what the feature file says), independent of the engine's encoding."""
    return {
        "category": CATEGORIES[item_id % 4],
        "brand": f"b{item_id % 7}",
        "tags": {f"t{item_id % 3}", f"u{item_id % 5}"},
    }


def publish_with_attributes(src: Path, repo: Path, tmp: Path) -> Path:
    """A copy of version `src` (without its ranker: exact Flat retrieval, checkable against numpy)
    with an item feature table: category, brand (categorical), tags (multi), year (numeric)."""
    manifest = open_version(src)
    ids = load_item_ids(src, manifest)
    lines = ["item_id,category,brand,tags,year"]
    for i in ids.tolist():
        a = attributes_of(int(i))
        lines.append(f"{i},{a['category']},{a['brand']},{'|'.join(sorted(a['tags']))},{1950 + int(i) % 60}")
    (tmp / "items.csv").write_text("\n".join(lines) + "\n")
    table = encode_features(read_feature_file(tmp / "items.csv", kind="item"), ids, kind="item")
    with VersionWriter(repo, "seq") as w:
        files = {role: e.path for role, e in manifest.files.roles().items() if role != "ranker"}
        for rel in files.values():
            shutil.copy(src / rel, w.path / rel)
        section = write_features(w.path, FeatureTables(item=table))
        return w.commit(
            files=files,
            model=manifest.model,
            encoder=manifest.encoder,
            index=manifest.index,
            metrics=manifest.metrics,
            training=manifest.training,
            data=manifest.data,
            features=section,
        )


@pytest.fixture(scope="module")
def attr_repo(trained_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attrs")
    publish_with_attributes(newest_valid_version(trained_repo[1], "seq")[0], tmp / "repo", tmp)
    return tmp / "repo"


@pytest.fixture(scope="module")
def reference(attr_repo):
    path, manifest = newest_valid_version(attr_repo, "seq")
    enc = OnnxEncoder(path / "encoder.onnx", manifest.model.max_len)
    return enc, load_item_vectors(path, manifest), load_item_ids(path, manifest).astype(str), manifest.model.max_len


def exact_top_k(reference, history: list[str], k: int, allowed=lambda item: True) -> list[str]:
    """numpy's answer: the encoder's query against every item vector, the history and the items
    `allowed` rejects left out."""
    enc, vectors, ids, max_len = reference
    row_of = {x: i for i, x in enumerate(ids.tolist())}
    rows = np.array([row_of[x] for x in history if x in row_of], dtype=np.int64)
    scores = encode_histories(enc, [rows[-max_len:] + 1]) @ vectors.T
    scores[0, [i for i, x in enumerate(ids.tolist()) if not allowed(x)]] = -np.inf
    top = topk_excluding(scores, [rows], k)[0]
    return [ids[i] for i in top if i >= 0]


@pytest.fixture(scope="module")
def replicas(attr_repo, redis_url):
    """Two `attnrec serve` servers sharing one Redis; the second with a bearer token."""
    with RunningServer(settings(attr_repo, history_store=redis_url)) as a:
        with RunningServer(settings(attr_repo, history_store=redis_url, auth_token="s3cret")) as b:
            yield a, b


def clients(replicas):
    a, b = replicas
    return RecommenderClient(a.target), RecommenderClient(b.target, token="s3cret")


def some_items(reference, n: int, seed: int) -> list[str]:
    ids = reference[2]
    return [str(x) for x in np.random.default_rng(seed).choice(ids, size=n, replace=False)]


# ── replicas over one Redis ───────────────────────────────────────────────────────────────────
def test_events_recorded_through_one_replica_are_used_by_the_other(replicas, reference):
    history = some_items(reference, 6, seed=1)
    a, b = clients(replicas)
    with a, b:
        assert a.record_events("alice", history[:4], timestamps=[10, 11, 12, 13]) == 4
        assert b.record_events("alice", history[4:]) == 6
        got_b, got_a = b.recommend([], K, user_id="alice"), a.recommend([], K, user_id="alice")
        carried = a.recommend(history, K)
        assert got_b.stored_events == got_a.stored_events == 6 and carried.stored_events == 0
        assert got_b.items == got_a.items == carried.items == exact_top_k(reference, history, K)
        np.testing.assert_allclose(got_b.scores, carried.scores, atol=1e-6)
        # stored history first, then the request's own (not yet recorded) events
        extra = some_items(reference, 2, seed=2)
        mixed = b.recommend(extra, K, user_id="alice")
        assert mixed.stored_events == 6 and mixed.items == a.recommend(history + extra, K).items
        # a user nobody recorded, with no history: popularity, as without a store
        with tc.InferenceServerClient(replicas[0].target) as kserve:  # the KServe pipeline model reads it too
            assert kserve_items(kserve, [""], K, user_id="alice") == got_b.items
            assert kserve_items(kserve, extra, K, user_id="alice") == mixed.items
        nobody = b.recommend([], K, user_id="nobody")
        assert nobody.popularity_fallback and nobody.stored_events == 0
        assert nobody.items == a.recommend([], K).items


def test_stored_history_is_bounded_to_the_models_max_length(replicas, reference):
    max_len = reference[3]
    history = some_items(reference, max_len + 5, seed=3)
    a, b = clients(replicas)
    with a, b:
        assert a.record_events("bob", history[:7]) == 7
        assert a.record_events("bob", history[7:]) == max_len  # oldest dropped
        r = b.recommend([], K, user_id="bob")
        assert r.stored_events == max_len
        assert r.items == a.recommend(history[-max_len:], K).items  # the dropped ones are no longer excluded
        n, total = b.record_events_stream(events(f"backfill-{i}", history[i : i + 3]) for i in range(4))
        assert (n, total) == (4, 12)
        for i in range(4):
            assert a.recommend([], K, user_id=f"backfill-{i}").items == b.recommend(history[i : i + 3], K).items


def test_availability_set_through_one_replica_holds_on_both_services_of_both(replicas, reference):
    history = some_items(reference, 5, seed=4)
    a, b = clients(replicas)
    with a, b, tc.InferenceServerClient(replicas[1].target) as kserve:
        before = a.recommend(history, K).items
        gone = before[:3] + ["not-in-the-catalogue"]
        assert b.set_item_availability(gone, available=False) == {
            "changed": 4,
            "unavailable_items": 4,
            "unknown_items": 1,
        }
        want = exact_top_k(reference, history, K, lambda x: x not in gone)
        try:
            for c in (a, b):  # the very next request, on either replica
                r = c.recommend(history, K)
                assert r.items == want and len(r.items) == K and not set(r.items) & set(gone)
            assert not set(b.recommend([], K).items) & set(gone)  # the popularity fallback too
            assert kserve_items(kserve, history, K, metadata={"authorization": "Bearer s3cret"}) == want
        finally:
            assert a.set_item_availability(gone, available=True)["unavailable_items"] == 0
        assert b.recommend(history, K).items == before


def test_data_rpcs_need_the_bearer_token_when_the_server_has_one(replicas):
    with RecommenderClient(replicas[1].target) as anonymous:
        for call in (
            lambda: anonymous.record_events("eve", ["1"]),
            lambda: anonymous.set_item_availability(["1"], False),
        ):
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_events_get_invalid_argument(replicas):
    a = RecommenderClient(replicas[0].target)
    cases = [
        (lambda: a.record_events("", ["1"]), "needs a user_id"),
        (lambda: a.record_events("carol", []), "has no items"),
        (lambda: a.record_events("carol", ["1", ""]), "must not be empty"),
        (lambda: a.record_events("carol", ["1", "2"], timestamps=[5]), "1 timestamps for 2 items"),
        (lambda: a.set_item_availability([], False), "has no items"),
    ]
    with a:
        for call, message in cases:
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in exc.value.details()


# ── filters ───────────────────────────────────────────────────────────────────────────────────
FILTERS = [
    (["category=books"], [], lambda a: a["category"] == "books"),
    (
        ["category=books", "category=games"],
        ["brand=b3"],
        lambda a: a["category"] in ("books", "games") and a["brand"] != "b3",
    ),
    (["tags=t1", "category=toys"], [], lambda a: "t1" in a["tags"] and a["category"] == "toys"),
    ([], ["tags=u0", "tags=u1", "brand=b0"], lambda a: not a["tags"] & {"u0", "u1"} and a["brand"] != "b0"),
]


@pytest.mark.parametrize("include, exclude, keep", FILTERS)
def test_filters_give_the_exact_filtered_top_k_on_both_services(replicas, reference, include, exclude, keep):
    history = some_items(reference, 8, seed=5)
    allowed = lambda x: keep(attributes_of(int(x)))  # noqa: E731
    want = exact_top_k(reference, history, K, allowed)
    assert len(want) == K  # every filter leaves enough items: the answer must still be k long
    with RecommenderClient(replicas[0].target) as a, tc.InferenceServerClient(replicas[0].target) as kserve:
        r = a.recommend(history, K, include_attributes=include, exclude_attributes=exclude)
        assert r.items == want and all(allowed(x) for x in r.items)
        assert kserve_items(kserve, history, K, include, exclude) == want
        # with a stored history as well: the same answer
        user = f"filtered-{include}-{exclude}"  # one per case: their histories must not add up
        a.record_events(user, history)
        assert a.recommend([], K, user_id=user, include_attributes=include, exclude_attributes=exclude).items == want
        popular = a.recommend([], K, include_attributes=include, exclude_attributes=exclude)
        assert popular.popularity_fallback and all(allowed(x) for x in popular.items) and len(popular.items) == K


def test_filters_that_leave_nothing_or_little_return_what_there_is(replicas, reference):
    history = some_items(reference, 3, seed=6)
    with RecommenderClient(replicas[0].target) as a:
        assert a.recommend(history, K, include_attributes=["category=no-such-category"]).items == []
        few = [
            x
            for x in reference[2]
            if attributes_of(int(x))["brand"] == "b2" and attributes_of(int(x))["category"] == "toys"
        ]
        r = a.recommend(history, 50, include_attributes=["brand=b2", "category=toys"])
        assert sorted(r.items) == sorted(set(few) - set(history))


def test_unknown_or_numeric_attribute_is_invalid_argument_on_both_services(replicas):
    with RecommenderClient(replicas[0].target) as a, tc.InferenceServerClient(replicas[0].target) as kserve:
        for include, exclude, message in [
            (["colour=red"], [], "unknown item attribute 'colour' (the version's: category, brand, tags, year)"),
            ([], ["year=1990"], "item attribute 'year' is numeric"),
            (["category"], [], 'expected "name=value"'),
        ]:
            with pytest.raises(grpc.RpcError) as exc:
                a.recommend(["1"], K, include_attributes=include, exclude_attributes=exclude)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in exc.value.details()
            with pytest.raises(InferenceServerException) as exc:
                kserve_items(kserve, ["1"], K, include, exclude)
            assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and message in exc.value.message()


def kserve_items(kserve, history, k, include=(), exclude=(), metadata=None, user_id="") -> list[str]:
    """The KServe pipeline model's answer for one user."""

    def bytes_input(name, values):
        t = tc.InferInput(name, [1, len(values)], "BYTES")
        t.set_data_from_numpy(np.array([[v.encode() for v in values]], dtype=object))
        return t

    inputs = [bytes_input("history", history), tc.InferInput("k", [1, 1], "INT64")]
    inputs[1].set_data_from_numpy(np.array([[k]], dtype=np.int64))
    if include:
        inputs.append(bytes_input("include_attributes", include))
    if exclude:
        inputs.append(bytes_input("exclude_attributes", exclude))
    if user_id:
        inputs.append(bytes_input("user_id", [user_id]))
    result = kserve.infer("pipeline", inputs, headers=metadata)
    return [x.decode() for x in result.as_numpy("items")[0] if x]


# ── the embedded store ────────────────────────────────────────────────────────────────────────
def test_embedded_store_survives_a_restart(attr_repo, reference, tmp_path):
    store = f"file://{tmp_path / 'state' / 'history.sqlite'}"
    history = some_items(reference, 5, seed=7)
    with RunningServer(settings(attr_repo, history_store=store)) as s, RecommenderClient(s.target) as c:
        assert c.record_events("dora", history) == 5
        c.set_item_availability(history[:1] + [c.recommend(history, K).items[0]], available=False)
        want = c.recommend(history, K).items
    with RunningServer(settings(attr_repo, history_store=store)) as s, RecommenderClient(s.target) as c:
        r = c.recommend([], K, user_id="dora")
        assert r.stored_events == 5 and r.items == want


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_stores_expire_histories_after_the_ttl(kind, redis_url, tmp_path):
    url = redis_url if kind == "redis" else f"file://{tmp_path / 'ttl.sqlite'}"

    async def run() -> tuple:
        store = open_history_store(url, namespace=f"ttl-{kind}", ttl_s=1, telemetry=Telemetry())
        try:
            await store.append("u", ["1", "2"], [1, 2], limit=10)
            fresh = (await store.read("u")).items
            await asyncio.sleep(2.1)  # Redis expires keys with a resolution of a second
            return fresh, (await store.read("u")).items, await store.append("u", ["3"], [3], limit=10)
        finally:
            await store.close()

    assert asyncio.run(run()) == (["1", "2"], [], 1)  # expired: the next append starts a new history


def test_bad_store_urls_are_refused_with_a_message(tmp_path):
    for url, message in [
        ("mysql://x/y", "use file://PATH or redis://HOST:PORT/DB"),
        ("file://", "no path"),
        ("redis://:pw@localhost:6379/0?socket_timeout=abc", "redis://:***@localhost:6379/0"),
    ]:
        with pytest.raises(ValueError, match=message.replace("*", r"\*")):
            open_history_store(url, namespace="m", ttl_s=0, telemetry=Telemetry())
    (tmp_path / "taken").write_text("not a database")
    with pytest.raises(ValueError, match="cannot use"):
        open_history_store(f"file://{tmp_path / 'taken'}", namespace="m", ttl_s=0, telemetry=Telemetry())


# ── the store down ────────────────────────────────────────────────────────────────────────────
def test_store_down_unavailable_for_stored_histories_while_carried_ones_work(attr_repo, reference, tmp_path):
    history = some_items(reference, 4, seed=8)
    redis = RedisServer(tmp_path).start()
    try:
        with RunningServer(settings(attr_repo, history_store=redis.url)) as s, RecommenderClient(s.target) as c:
            c.record_events("erin", history)
            gone = c.recommend(history, K).items[:2]
            c.set_item_availability(gone, available=False)
            want = c.recommend(history, K).items
            redis.stop()
            for call in (
                lambda: c.recommend([], K, user_id="erin"),
                lambda: c.record_events("erin", history),
                lambda: c.set_item_availability(gone, True),
            ):
                with pytest.raises(grpc.RpcError) as exc:
                    call()
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"history store {redis.url} is unreachable" in exc.value.details()
            t0 = time.monotonic()
            for _ in range(5):  # requests carrying their own history: answered, last availability kept
                assert c.recommend(history, K).items == want
            assert time.monotonic() - t0 < 5
            registry = s.server.telemetry.registry
            labels = {"store": redis.url, "operation": "read", "outcome": "error"}
            assert registry.get_sample_value("attnrec_store_operations_total", labels) >= 2
            assert registry.get_sample_value("attnrec_store_up", {"store": redis.url}) == 0
            redis.start()  # back (empty: no persistence), and used again
            assert c.record_events("erin", history[:2]) == 2
            assert c.recommend([], K, user_id="erin").stored_events == 2
            assert registry.get_sample_value("attnrec_store_up", {"store": redis.url}) == 1
    finally:
        redis.stop()


# ── attnrec retrieve ──────────────────────────────────────────────────────────────────────────
def test_retrieve_applies_the_filters_in_the_search(attr_repo, trained_repo, small_log, reference, tmp_path):
    from attnrec.cli import main

    data = trained_repo[0]
    out = tmp_path / "filtered.parquet"
    argv = ["-q", "retrieve", "--repo", str(attr_repo), "--name", "seq", "--data", str(data), "--out", str(out)]
    argv += ["--top-n", "5", "--include-attributes", "category=books", "category=toys", "--exclude-attributes"]
    argv += ["brand=b1"]
    assert main(argv) == 0
    table = pq.read_table(out).to_pandas()
    keep = lambda x: attributes_of(int(x))["category"] in ("books", "toys") and attributes_of(int(x))["brand"] != "b1"  # noqa: E731
    assert len(table) == 5 * table.user_id.nunique() and all(keep(x) for x in table.item_id)
    # the same as the server's Recommend with the same filters, for a few users
    from attnrec.export.data.sequences import build_sequences

    seqs = build_sequences(small_log)  # the log trained_repo was written from
    for u in table.user_id.unique()[:3]:
        i = int(np.flatnonzero(seqs.user_ids == u)[0])
        history = [str(x) for x in seqs.item_ids[seqs.sequence(i)]]
        want = exact_top_k(reference, history, 5, keep)
        assert [str(x) for x in table[table.user_id == u].sort_values("rank").item_id] == want
    bad = [*argv[:-3], "--include-attributes", "colour=red"]
    assert main(bad) == 2


def test_query_command_records_filters_and_sets_availability(replicas, reference, capsys):
    import json

    from attnrec.cli import main

    target = replicas[0].target
    items = some_items(reference, 3, seed=9)
    assert main(["query", "--server", target, "--user-id", "quinn", "--record", ",".join(items)]) == 0
    assert json.loads(capsys.readouterr().out) == {"stored_events": 3}
    argv = ["query", "--server", target, "--user-id", "quinn", "--json", "--include-attributes", "category=toys"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stored_events"] == 3 and r["items"] == exact_top_k(
        reference, items, K, lambda x: attributes_of(int(x))["category"] == "toys"
    )
    assert main(["query", "--server", target, "--set-unavailable", r["items"][0]]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] == 1
    assert main(["query", "--server", target, "--set-available", r["items"][0]]) == 0
    assert json.loads(capsys.readouterr().out) == {"changed": 1, "unavailable_items": 0, "unknown_items": 0}
