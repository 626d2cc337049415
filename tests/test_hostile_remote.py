"""Device runs kept in a build (`BUILD/devices/*.json`) and the free text they bring into report.md.

A build folder may come from elsewhere, and its stored runs from a device: keys must name a file in
the devices folder and nothing else, records are checked before the report reads them, and their
strings are made safe to print and escaped in markdown.
"""

from __future__ import annotations

import json
import re

import pytest

# ------------------------------------------------- 7. device runs stored in a build, and read back


def _tables_keep_their_columns(md: str) -> None:
    table: list[int] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            table.append(len(re.findall(r"(?<!\\)\|", line)))
        elif table:
            assert len(set(table)) == 1, (table, md)
            table = []


def _record(**changes) -> dict:
    record = {
        "source": "edgeft bench --remote pi@device",
        "imported_at": "2026-01-01T00:00:00+00:00",
        "measured_at": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "Cortex-A76", "cores": 4, "ram_bytes": 8 << 30, "runtime_builds": {"x": "y"}},
        "rows": [
            {
                "target": "gguf-q4",
                "model": "art/gguf-q4/model.gguf",
                "threads": 4,
                "prefill": {"tokens": 64, "tok_s": {"median": 10.0, "min": 9.0, "max": 11.0}},
                "decode": {"tokens": 16, "tok_s": {"mean": 5.0, "stddev": 0.5}},
                "peak_rss_bytes": 1e8,
                "kl_divergence_mean": 0.01,
                "task_accuracy": 0.5,
            }
        ],
    }
    record.update(changes)
    return record


def test_device_run_keys_stay_inside_the_devices_folder(tmp_path):
    from edgeft.bench import device_runs

    for key in ("../../victim", "/etc/passwd", "..", ".", "remote-" + "x" * 400, "a\nb\x1b[31m", "~"):
        path = device_runs.save(tmp_path, key, _record())
        assert path.parent == tmp_path / "devices" and path.name.endswith(".json"), path
        assert len(path.name.encode()) <= 255 and path.name.isprintable() and not path.name.startswith(".")
    assert not (tmp_path.parent / "victim.json").exists()
    assert device_runs.load_all(tmp_path)


def test_a_devices_path_that_is_a_file_or_a_link_is_refused(tmp_path):
    from edgeft.bench import device_runs
    from edgeft.errors import EdgeftError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "devices").write_text("not a folder")
    with pytest.raises(EdgeftError, match="devices: is not a folder"):
        device_runs.save(tmp_path / "a", "k", _record())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.json").write_text(json.dumps(_record()))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "devices").symlink_to(elsewhere)
    for call in (
        lambda: device_runs.save(tmp_path / "b", "k", _record()),
        lambda: device_runs.load_all(tmp_path / "b"),
    ):
        with pytest.raises(EdgeftError, match="symbolic link"):
            call()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["x.json"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (_record(rows=[1]), "rows[0]: expected an object, got 1"),
        (_record(rows="x"), "no 'rows' list"),
        (_record(source=None), "source: expected a string"),
        (_record(machine=[1]), "machine: expected an object"),
        (_record(machine={"cpu_model": 5}), "machine.cpu_model: expected a string"),
        (_record(machine={"runtime_builds": {"x": [1]}}), "runtime_builds['x']: expected a string"),
        (_record(rows=[{**_record()["rows"][0], "prefill": {"tok_s": {"median": "x"}}}]), "rows[0].prefill.tok_s"),
        (_record(rows=[{**_record()["rows"][0], "decode": {"tok_s": {"stddev": 1}}}]), "rows[0].decode.tok_s"),
        (_record(rows=[{**_record()["rows"][0], "peak_rss_bytes": "1e8"}]), "rows[0].peak_rss_bytes"),
        (_record(rows=[{**_record()["rows"][0], "target": ["x"]}]), "rows[0].target: expected a string"),
        ("[" * 100_000, "nested too deeply"),
        ({"rows": json.loads("[" * 100 + "]" * 100)}, "nested more than"),
    ],
)
def test_stored_device_runs_are_checked_when_read(tmp_path, content, fragment):
    from edgeft.bench import device_runs
    from edgeft.errors import ConfigError

    (tmp_path / "devices").mkdir()
    path = tmp_path / "devices" / "x.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as e:
        device_runs.load_all(tmp_path)
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


def test_stored_device_run_strings_are_made_safe_when_read(tmp_path):
    from edgeft.bench import device_runs
    from edgeft.report import _device_runs_section

    (tmp_path / "devices").mkdir()
    record = _record(source="llama-bench\n# x", machine={"cpu_model": "A\x1b[31m|B", "runtime_builds": {"a\nb": "c`d"}})
    (tmp_path / "devices" / "x.json").write_text(json.dumps(record))
    (tmp_path / "devices" / "link.json").symlink_to(tmp_path / "devices" / "x.json")
    with pytest.raises(Exception, match="link.json: is a symbolic link"):
        device_runs.load_all(tmp_path)
    (tmp_path / "devices" / "link.json").unlink()
    [run] = device_runs.load_all(tmp_path)
    assert run["machine"]["cpu_model"] == "A\\x1b[31m|B"
    md = "\n".join(_device_runs_section([run]))
    assert "\x1b" not in md and "\n# x" not in md and "A\\\\x1b\\[31m\\|B" in md
    _tables_keep_their_columns(md)
