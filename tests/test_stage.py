import json

import pytest

from edgeft.stage import cached, content_hash, read_manifest, stage_key, staged_dir


def test_stage_writes_manifest_and_renames(tmp_path):
    final = tmp_path / "out"
    key = stage_key("s", {"a": "1"}, {"p": 2})
    with staged_dir(final, "s", key, {"a": "1"}, {"p": 2}) as (tmp, results):
        assert not final.exists()
        (tmp / "payload.txt").write_text("hello")
        results["n"] = 1
    m = read_manifest(final)
    assert m["key"] == key and m["stage"] == "s" and m["results"] == {"n": 1}
    assert set(m["outputs"]) == {"payload.txt"}
    assert cached(final, key) is not None
    assert cached(final, stage_key("s", {"a": "1"}, {"p": 3})) is None


def test_failed_stage_leaves_nothing_and_keeps_old_output(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final, "s", "k1", {}, {}) as (tmp, _):
        (tmp / "v").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(final, "s", "k2", {}, {}) as (tmp, _):
            (tmp / "v").write_text("half")
            raise RuntimeError("killed")
    assert (final / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_key_changes_with_inputs_and_params():
    base = stage_key("train", {"m": "x"}, {"lr": 1})
    assert base == stage_key("train", {"m": "x"}, {"lr": 1})
    assert base != stage_key("train", {"m": "y"}, {"lr": 1})
    assert base != stage_key("train", {"m": "x"}, {"lr": 2})
    assert base != stage_key("merge", {"m": "x"}, {"lr": 1})


def test_content_hash_of_plain_and_stage_dirs(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("1")
    h1 = content_hash(d)
    (d / "f").write_text("2")
    assert content_hash(d) != h1
    with staged_dir(tmp_path / "s", "s", "k", {}, {}) as (tmp, _):
        (tmp / "f").write_text("2")
    # A stage folder is hashed through its manifest: same files, same hash as the plain folder.
    assert content_hash(tmp_path / "s") == content_hash(d)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["outputs"]["f"]
