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


def _dead_pid() -> int:
    """A pid that no process has: a child that has exited and been reaped."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_removes_scratch_of_killed_runs_only(tmp_path):
    import os

    dead = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    legacy = tmp_path / ".out.tmp-89abcdef"  # edgeft 0.1 named them without a pid
    old = tmp_path / f".out.old-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"  # a concurrent run's, still working
    other = tmp_path / f".other.tmp-{_dead_pid()}-0123abcd"
    for d in (dead, legacy, old, live, other):
        d.mkdir()
        (d / "half-written").write_text("x")
    with staged_dir(tmp_path / "out", "s", "k", {}, {}) as (tmp, _):
        (tmp / "v").write_text("new")
    assert not dead.exists() and not legacy.exists() and not old.exists()
    assert live.exists() and other.exists()  # another stage's scratch waits for its own stage (or a build)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_output_checks_refuse_what_edgeft_did_not_write(tmp_path):
    from edgeft.errors import OutputError
    from edgeft.stage import check_output_dir

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "ch1.tex").write_text("mine")
    (tmp_path / "empty").mkdir()
    with staged_dir(tmp_path / "stage", "s", "k", {}, {}) as (tmp, _):
        (tmp / "v").write_text("x")
    for bad, message in (
        ("notes.txt", "existing file"),
        ("thesis", "not written by edgeft"),
        ("notes.txt/x", "is a file"),
    ):
        with pytest.raises(OutputError, match=message):
            check_output_dir(tmp_path / bad)
    for ok in ("new", "empty", "stage"):
        check_output_dir(tmp_path / ok)
    with pytest.raises(OutputError):
        with staged_dir(tmp_path / "thesis", "s", "k", {}, {}):
            pass
    assert (tmp_path / "thesis" / "ch1.tex").read_text() == "mine"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_dir_is_removed_when_a_command_fails_before_any_stage(tmp_path):
    from edgeft.stage import is_edgeft_output, output_dir

    with pytest.raises(ValueError):
        with output_dir(tmp_path / "early", "build", {}):
            raise ValueError("bad input found late")
    assert not (tmp_path / "early").exists()

    with pytest.raises(ValueError):
        with output_dir(tmp_path / "late", "build", {}):
            with staged_dir(tmp_path / "late" / "adapter", "train", "k", {}, {}) as (tmp, _):
                (tmp / "w").write_text("trained")
            raise ValueError("failed after a stage finished")
    assert (tmp_path / "late" / "adapter" / "w").read_text() == "trained"  # the cache survives
    assert is_edgeft_output(tmp_path / "late")
