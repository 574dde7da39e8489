import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from attnrec.engine.repository import (
    SCHEMA_VERSION,
    ArtifactError,
    DataSection,
    EncoderParity,
    EncoderSection,
    EncoderSpeed,
    EvalProtocol,
    FileEntry,
    Files,
    IndexSection,
    Manifest,
    MetricsSection,
    ModelSection,
    PipelineMetrics,
    RankerParity,
    RankerSection,
    RankerTraining,
    TensorEntry,
    TrainingSection,
    VersionWriter,
    iter_models,
    list_versions,
    newest_valid_version,
    open_version,
    sha256_file,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA1 = Path(__file__).parent / "data" / "manifest-schema1.json"  # written by attnrec before the typed contract

MODEL = ModelSection(type="sasrec", n_items=3, max_len=8, dim=4, n_blocks=1, n_heads=1, ffn_dim=8, dropout=0.2)
ENCODER = EncoderSection(
    inputs={"history": TensorEntry("int64", ("batch", "length"), "tokens")},
    outputs={"query": TensorEntry("float32", ("batch", 4))},
    opset=17,
    parity=EncoderParity(max_abs_diff=1e-7, by_length={"1": 1e-7}, histories=3, tolerance=1e-4),
)
INDEX = IndexSection(
    factory="Flat",
    metric="inner_product",
    params={},
    recall_n=3,
    recall=1.0,
    target_recall=0.98,
    reached_target=True,
    search_ms=0.01,
    exact_search_ms=0.01,
    batch_ms_per_query=0.01,
    tuning_queries=3,
)
SECTIONS = dict(model=MODEL, encoder=ENCODER, index=INDEX)
ROLES = {
    "encoder": "encoder.onnx",
    "item_embeddings": "item_embeddings.npy",
    "index": "items.faiss",
    "item_ids": "item_ids.json",
    "item_popularity": "item_popularity.npy",
}


def publish(repo, name="m", payload=b"weights", **extra):
    with VersionWriter(repo, name) as w:
        _stage(w, payload)
        return w.commit(files=ROLES, **SECTIONS, **extra)


def _stage(w: VersionWriter, payload: bytes) -> None:
    (w.path / "encoder.onnx").write_bytes(payload)
    (w.path / "item_ids.json").write_text(json.dumps([1, 2, 3]))
    for rel in ("item_embeddings.npy", "items.faiss", "item_popularity.npy"):
        (w.path / rel).write_bytes(b"x")


def full_manifest() -> Manifest:
    """A manifest with every section and every optional field set."""
    entry = FileEntry("f", "0" * 64, 1)
    split = {"hr@10": 0.5, "ndcg@10": 0.25, "users": 4}
    return Manifest(
        name="m",
        version=3,
        created_at="2026-12-01T00:00:00+00:00",
        files=Files(entry, entry, entry, entry, entry, ranker=FileEntry("ranker.onnx", "1" * 64, 2)),
        model=MODEL,
        encoder=replace(ENCODER, speed_cpu=EncoderSpeed(1, 8, 0.3, 0.03, 10.0)),
        index=replace(INDEX, params={"nprobe": 16}, tried=({"nprobe": 16, "recall": 1.0},), mips_max_norm2=2.5),
        ranker=RankerSection(
            type="target_attention",
            n_candidates=50,
            inputs={"history": TensorEntry("int64", ("batch", "length"))},
            outputs={"scores": TensorEntry("float32", ("batch", "candidates"))},
            features=("candidate embedding",),
            shape={"n_items": 3, "keys": "items", "dropout": 0.1},
            opset=17,
            parity=RankerParity(0.0, ({"batch": 1, "max_abs_diff": 0.0},), 1e-4),
            speed_cpu=({"batch": 1, "ms": 0.1},),
            training=RankerTraining({"lr": 3e-4}, 1, 2, 0.2, 0.19, 760, 0.8, 0.3, ({"epoch": 1, "loss": 3.8},)),
            note="a note",
        ),
        metrics=MetricsSection(
            test=split,
            valid=split,
            baselines={"popularity": {"test": split, "valid": split}},
            protocol=EvalProtocol("leave-one-out", "by time", "full", True, 3, 4, 4, 0, (10, 20)),
            pipeline=PipelineMetrics(
                exact={"test": split},
                ann={"test": split},
                n_candidates=50,
                stage1_recall={"test": 0.6},
                served="ranked",
                ranked={"test": split},
            ),
        ),
        training=TrainingSection(
            config={"dim": 4},
            best_epoch=2,
            epochs_run=3,
            train_seconds=0.4,
            best_valid_ndcg10=0.19,
            history=({"epoch": 1, "loss": 5.6},),
            checkpoint="c.pt",
            note="n",
            torch="2",
            onnxruntime="1",
            faiss="1",
            python="3.11",
        ),
        data=DataSection("log.parquet", 400, 290, 7562, "auto", 0, True),
    )


def test_every_section_round_trips_through_json():
    m = full_manifest()
    raw = json.loads(m.to_json())
    assert raw["schema_version"] == SCHEMA_VERSION and SCHEMA_VERSION.startswith("2.")
    back = Manifest.from_dict(raw, "mem")
    assert back == m
    for section in ("files", "model", "encoder", "index", "ranker", "metrics", "training", "data"):
        assert getattr(back, section) == getattr(m, section)
        assert raw[section] == getattr(m, section).to_dict()
    # absent optional sections and fields stay absent
    bare = replace(m, files=replace(m.files, ranker=None), ranker=None, metrics=None, training=None, data=None)
    raw = json.loads(bare.to_json())
    assert not {"ranker", "metrics", "training", "data"} & set(raw) and "ranker" not in raw["files"]
    assert Manifest.from_dict(raw, "mem") == bare


def test_a_published_manifest_opens_as_the_typed_sections_it_was_written_with(tmp_path):
    v = publish(tmp_path, training=TrainingSection(note="t"), data=DataSection("log", 3))
    m = open_version(v)
    assert (m.model, m.encoder, m.index) == (MODEL, ENCODER, INDEX)
    assert m.training == TrainingSection(note="t") and m.data == DataSection("log", 3)
    assert m.ranker is None and m.metrics is None and m.files.ranker is None
    assert m.files.item_ids.path == "item_ids.json"


def test_an_unknown_major_version_is_refused_with_what_to_do(tmp_path):
    v = publish(tmp_path)
    raw = json.loads((v / "manifest.json").read_text())
    raw["schema_version"] = "3.0"
    (v / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError) as err:
        open_version(v)
    msg = str(err.value)
    assert str(v / "manifest.json") in msg and "'3.0'" in msg and "reads schema 2.x" in msg and "re-export" in msg


def test_a_newer_minor_version_is_read_and_its_new_keys_ignored():
    m = full_manifest()
    raw = json.loads(m.to_json())
    raw["schema_version"] = "2.7"
    raw["lineage"] = {"parent": 2}
    raw["model"]["activation"] = "gelu"
    raw["index"]["gpu"] = True
    raw["ranker"]["training"]["warmup"] = 3
    raw["files"]["thumbnail"] = {"path": "t.png", "sha256": "2" * 64, "bytes": 9}
    read = Manifest.from_dict(raw, "mem")
    assert read.schema_version == "2.7" and replace(read, schema_version=SCHEMA_VERSION) == m


def test_a_schema_1_manifest_is_upgraded_on_read():
    raw = json.loads(SCHEMA1.read_text())
    assert raw["schema_version"] == 1
    m = Manifest.from_dict(raw, str(SCHEMA1))
    assert m.model.dim == 16 and m.model.max_len == 16 and m.files.ranker.path == "ranker.onnx"
    assert m.index.recall_n == 200 and m.index.recall == 1.0 and m.index.mips_max_norm2 is None
    assert m.training.best_valid_ndcg10 == raw["training"]["best_valid_ndcg@10"] and m.training.torch == "2.13.0+cpu"
    assert m.ranker.n_candidates == 50 and m.ranker.parity.max_abs_diff == 0.0
    assert m.ranker.training.stage1_valid_ndcg10 == raw["ranker"]["training"]["stage1_valid_ndcg@10"]
    assert m.metrics.pipeline.stage1_recall == {"test": 0.6575, "valid": 0.645}
    assert m.metrics.test == raw["metrics"]["test"] and m.metrics.protocol.ks == (10, 20)
    assert m.data.kcore == 0 and m.encoder.speed_cpu.speedup == raw["encoder"]["speed_cpu"]["speedup"]
    # what it reads back after a write is the same manifest, now in schema 2
    again = Manifest.from_dict(json.loads(m.to_json()), "mem")
    assert again == m and again.schema_version == SCHEMA_VERSION


def test_schema_1_without_a_ranker_and_with_the_benchmarks_synthetic_ranker():
    raw = json.loads(SCHEMA1.read_text())
    plain = {**raw, "ranker": {}, "files": {k: v for k, v in raw["files"].items() if k != "ranker"}}
    m = Manifest.from_dict(plain, "mem")
    assert m.ranker is None and m.files.ranker is None
    synthetic = {"inputs": ["history", "candidates", "candidate_scores"], "n_candidates": 200, "synthetic": True}
    m = Manifest.from_dict({**raw, "ranker": synthetic}, "mem")
    assert m.ranker.n_candidates == 200 and m.ranker.inputs == {}
    # schema 1 readers took 200 candidates when the ranker section named none
    assert Manifest.from_dict({**raw, "ranker": {}}, "mem").ranker.n_candidates == 200


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda r: r["model"].update(dim="16"), "model.dim: expected int"),
        (lambda r: r["index"].pop("params"), "index: missing params"),
        (lambda r: r["files"].pop("ranker"), "ranker file"),
        (lambda r: r["ranker"]["inputs"]["history"].update(shape=None), "ranker.inputs.history.shape"),
        (lambda r: r.update(metrics=[1]), "metrics: expected an object"),
    ],
)
def test_a_malformed_section_is_refused_with_its_place(edit, where):
    raw = json.loads(full_manifest().to_json())
    edit(raw)
    with pytest.raises(ArtifactError, match=re.escape(where)):
        Manifest.from_dict(raw, "x/manifest.json")


# Manifest sections are dataclasses: read `manifest.index.params`, never by a string key, directly or
# through a name bound to a section (`idx = manifest.index` then `idx[...]`).
_SECTIONS = "model|index|ranker|metrics|training|data|encoder|files|features"
_STRING_KEY_READ = re.compile(rf"(\w+)\.({_SECTIONS})\s*(\[|\.get\()")
_ALIAS = re.compile(rf"^\s*(\w+)\s*=\s*[\w.]*(?:\([^()]*\))?\.({_SECTIONS})\s*$", re.M)
_NOT_A_MANIFEST = {"section", "server", "s"}  # report sections (benchmarks/report.py), test_download's fake server


def string_key_section_reads(text: str) -> list[str]:
    hits = [m.group(0) for m in _STRING_KEY_READ.finditer(text) if m.group(1) not in _NOT_A_MANIFEST]
    for alias in {m.group(1) for m in _ALIAS.finditer(text)}:
        hits += [m.group(0) for m in re.finditer(rf"\b{alias}\s*(\[|\.get\()", text)]
    return hits


def test_the_check_for_string_key_section_reads_finds_them():
    bad = [
        "manifest.model" + '["dim"]',
        "v.pipeline.manifest.index" + '.get("factory")',
        "m.ranker" + " ['x']",
        "idx = manifest.index\nprint(idx" + '["factory"])',
        'published = open_version(repo / "seq" / "1").metrics\nassert published' + '["test"]',
    ]
    assert all(string_key_section_reads(b) for b in bad)
    good = [
        "manifest.model.dim",
        'm.training.config["dim"]',
        'section.data["points"]',
        "manifest.files.roles()",
        "idx = manifest.index\nprint(idx.factory, idx.params)",
    ]
    assert not any(string_key_section_reads(g) for g in good)


def test_no_manifest_section_is_read_by_string_key_outside_the_repository_module():
    found = []
    for folder in ("attnrec", "engine", "export", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "engine" / "repository.py" or "rpc" in path.relative_to(ROOT).parts:
                continue
            found += [f"{path.relative_to(ROOT)}: {hit}" for hit in string_key_section_reads(path.read_text())]
    assert not found, "read these through the typed sections of attnrec.engine.repository:\n" + "\n".join(found)


def test_publish_numbers_versions_and_records_checksums(tmp_path):
    v1 = publish(tmp_path)
    v2 = publish(tmp_path, payload=b"other")
    assert (v1.name, v2.name) == ("1", "2")
    assert list_versions(tmp_path, "m") == [1, 2]
    m = open_version(v2)
    assert m.version == 2 and m.name == "m"
    assert m.files.encoder.sha256 == sha256_file(v2 / "encoder.onnx")
    assert m.files.encoder.bytes == 5
    assert list(iter_models(tmp_path)) == ["m"]
    # nothing but the published versions is left in the model folder
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]


def test_a_failed_write_leaves_no_version_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with VersionWriter(tmp_path, "m") as w:
            (w.path / "encoder.onnx").write_bytes(b"half")
            raise RuntimeError("export crashed")
    assert list_versions(tmp_path, "m") == []
    assert list((tmp_path / "m").iterdir()) == []


def test_tampered_file_is_refused_and_the_previous_version_is_served(tmp_path):
    publish(tmp_path, payload=b"good")
    v2 = publish(tmp_path, payload=b"newer")
    (v2 / "encoder.onnx").write_bytes(b"newes")  # same size, different bytes
    with pytest.raises(ArtifactError, match="sha256"):
        open_version(v2)
    path, manifest = newest_valid_version(tmp_path, "m")
    assert manifest.version == 1 and path.name == "1"


def test_missing_file_truncated_file_and_bad_manifest_are_refused(tmp_path):
    v = publish(tmp_path)
    (v / "item_ids.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_version(v)
    v = publish(tmp_path)
    with open(v / "encoder.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match="size"):
        open_version(v)
    v = publish(tmp_path)
    (v / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_version(v)
    v = publish(tmp_path)
    raw = json.loads((v / "manifest.json").read_text())
    raw["schema_version"] = 99
    (v / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="schema version"):
        open_version(v)
    with pytest.raises(ArtifactError, match="no valid version"):
        newest_valid_version(tmp_path, "m")


def test_no_versions_and_bad_names(tmp_path):
    with pytest.raises(ArtifactError, match="no versions"):
        newest_valid_version(tmp_path, "absent")
    with pytest.raises(ValueError):
        VersionWriter(tmp_path, "../escape")


def test_version_number_taken_concurrently_moves_to_the_next(tmp_path):
    with VersionWriter(tmp_path, "m") as w:
        _stage(w, b"a")
        os.makedirs(tmp_path / "m" / "1" / "occupied")  # another writer got there first
        v = w.commit(files=ROLES, **SECTIONS)
    assert v.name == "2" and open_version(v).version == 2


def test_a_manifest_path_outside_the_version_folder_is_refused(tmp_path):
    """`"../../../outside_ids.json"` with a matching checksum and size: refused, verified or not."""
    v = publish(tmp_path)
    outside = tmp_path / "outside_ids.json"
    outside.write_text(json.dumps([7, 8, 9]))
    for rel in (os.path.relpath(outside, v), str(outside)):  # relative and absolute
        raw = json.loads((v / "manifest.json").read_text())
        raw["files"]["item_ids"] = {"path": rel, "sha256": sha256_file(outside), "bytes": outside.stat().st_size}
        (v / "manifest.json").write_text(json.dumps(raw))
        for verify in (True, False):
            with pytest.raises(ArtifactError, match="resolves outside the version folder"):
                open_version(v, verify=verify)
    os.symlink(outside, v / "linked_ids.json")  # a link inside that points outside
    raw["files"]["item_ids"]["path"] = "linked_ids.json"
    (v / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="item_ids file 'linked_ids.json' resolves outside"):
        open_version(v)


def test_staging_folders_of_crashed_runs_are_cleaned_but_not_those_being_written(tmp_path):
    import fcntl
    import time

    root = tmp_path / "m"
    crashed, busy, newer = root / ".staging-crashed", root / ".staging-busy", root / ".staging-newer"
    for p in (crashed, busy, newer):
        p.mkdir(parents=True)
        (p / "encoder.onnx").write_bytes(b"half")
    past = time.time() - 3600
    for p in (crashed, busy):
        os.utime(p, (past, past))
    started = time.time() - 60  # this run began a minute ago; `newer` is younger than the run (another run's)
    os.utime(newer, (time.time(), time.time()))
    fd = os.open(busy, os.O_RDONLY)  # a live writer holds its folder's lock (as VersionWriter does)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with VersionWriter(tmp_path, "m", started=started) as w:
            _stage(w, b"a")
            w.commit(files=ROLES, **SECTIONS)
    finally:
        os.close(fd)
    assert sorted(p.name for p in root.iterdir()) == [".staging-busy", ".staging-newer", "1"]
    with VersionWriter(tmp_path, "m") as w:  # the lock released: the next run cleans it (newer too, now older)
        assert sorted(p.name for p in root.iterdir() if p != w.path) == ["1"]
