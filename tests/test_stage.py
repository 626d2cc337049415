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
    legacy = tmp_path / ".out.tmp-89abcdef"  # pid-less: edgeft 0.1 named them so, but so might a user
    old = tmp_path / f".out.old-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"  # a concurrent run's, still working
    other = tmp_path / f".other.tmp-{_dead_pid()}-0123abcd"
    for d in (dead, legacy, old, live, other):
        d.mkdir()
        (d / "half-written").write_text("x")
    with staged_dir(tmp_path / "out", "s", "k", {}, {}) as (tmp, _):
        (tmp / "v").write_text("new")
    assert not dead.exists() and not old.exists()
    assert live.exists() and other.exists()  # another stage's scratch waits for its own stage (or a build)
    assert legacy.exists()  # without a pid it cannot be told from a user's folder: it stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name, legacy.name])


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


def test_only_a_manifest_of_edgefts_makes_a_folder_edgefts(tmp_path):
    from edgeft.stage import is_edgeft_output, output_dir

    report_only = tmp_path / "report-only"
    report_only.mkdir()
    (report_only / "report.json").write_text("{}")
    foreign_manifest = tmp_path / "foreign-manifest"
    foreign_manifest.mkdir()
    (foreign_manifest / "manifest.json").write_text('{"stage": "draft"}')  # no edgeft_version
    with staged_dir(report_only / "adapter", "train", "k", {}, {}) as (tmp, _):
        (tmp / "w").write_text("x")
    with output_dir(tmp_path / "build", "build", {}):
        pass
    assert not is_edgeft_output(report_only) and not is_edgeft_output(foreign_manifest)
    assert is_edgeft_output(report_only / "adapter") and is_edgeft_output(tmp_path / "build")


def test_a_stage_folder_is_replaced_only_while_it_holds_nothing_but_its_outputs(tmp_path):
    from edgeft.errors import OutputError

    final = tmp_path / "out"
    with staged_dir(final, "s", "k1", {}, {}) as (tmp, _):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "v").write_text("1")
    with staged_dir(final, "s", "k2", {}, {}) as (tmp, _):  # its own files only: replaced
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and not (final / "sub").exists()

    (final / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds notes.txt"):
        with staged_dir(final, "s", "k3", {}, {}):
            raise AssertionError("refused before the work")
    (final / "notes.txt").unlink()
    # a file put there while the stage ran stops the replacement at the end
    with pytest.raises(OutputError, match="holds late.txt"):
        with staged_dir(final, "s", "k4", {}, {}) as (tmp, _):
            (tmp / "v").write_text("4")
            (final / "late.txt").write_text("mine")
    assert (final / "v").read_text() == "2" and (final / "late.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_build_folder_is_never_replaced_as_a_whole(tmp_path):
    from edgeft.errors import OutputError
    from edgeft.stage import output_dir

    with output_dir(tmp_path / "build", "build", {}):
        with staged_dir(tmp_path / "build" / "adapter", "train", "k", {}, {}) as (tmp, _):
            (tmp / "w").write_text("x")
    with pytest.raises(OutputError, match="folder of an edgeft build"):
        with staged_dir(tmp_path / "build", "export", "k", {}, {}):
            pass
    with pytest.raises(OutputError, match="train stage"):  # nor is a stage folder made a bench folder
        with output_dir(tmp_path / "build" / "adapter", "bench", {}):
            pass
    assert (tmp_path / "build" / "adapter" / "w").read_text() == "x"


def test_checkpoint_sweep_keeps_folders_it_did_not_name(tmp_path):
    from edgeft import checkpoints

    mine = tmp_path / ".adapter.ckpt-backup"
    stale = tmp_path / checkpoints.folder_name("adapter", "0123456789abcdef" * 4)
    for d in (mine, stale):
        d.mkdir()
        (d / "f").write_text("x")
    assert checkpoints.remove_stale(tmp_path, "adapter") == [stale]
    assert (mine / "f").read_text() == "x" and not (mine / checkpoints.LOCK).exists()
