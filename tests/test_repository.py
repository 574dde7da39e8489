import json
import os

import pytest

from attnrec.engine.repository import (
    ArtifactError,
    VersionWriter,
    iter_models,
    list_versions,
    newest_valid_version,
    open_version,
    sha256_file,
)

SECTIONS = dict(model={"dim": 4}, encoder={}, index={"factory": "Flat"})


def publish(repo, name="m", payload=b"weights", **extra):
    with VersionWriter(repo, name) as w:
        (w.path / "encoder.onnx").write_bytes(payload)
        (w.path / "item_ids.json").write_text(json.dumps([1, 2, 3]))
        return w.commit(files={"encoder": "encoder.onnx", "item_ids": "item_ids.json"}, **SECTIONS, **extra)


def test_publish_numbers_versions_and_records_checksums(tmp_path):
    v1 = publish(tmp_path)
    v2 = publish(tmp_path, payload=b"other")
    assert (v1.name, v2.name) == ("1", "2")
    assert list_versions(tmp_path, "m") == [1, 2]
    m = open_version(v2)
    assert m.version == 2 and m.name == "m"
    assert m.files["encoder"].sha256 == sha256_file(v2 / "encoder.onnx")
    assert m.files["encoder"].bytes == 5
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
        (w.path / "encoder.onnx").write_bytes(b"a")
        (w.path / "item_ids.json").write_text("[]")
        os.makedirs(tmp_path / "m" / "1" / "occupied")  # another writer got there first
        v = w.commit(files={"encoder": "encoder.onnx", "item_ids": "item_ids.json"}, **SECTIONS)
    assert v.name == "2" and open_version(v).version == 2
