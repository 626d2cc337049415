"""Hostile inputs to the loaders, the output folders and the exit status, each through the real CLI
in its own process (``tests/hostile.py``).

Every case is made of a few hand-written bytes (no model is trained or loaded): a user's folder that
looks like an edgeft output, nested JSON, safetensors and GGUF headers that lie about their sizes,
llama-bench fields of the wrong type, a model folder whose config names its own Python code. Each
must end with exit 2 (3 for an internal error), one ``edgeft: error:`` line, nothing of the user's
changed, no code from the input run, and a peak RSS near that of the same command refusing a benign
input.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from .cli import Run, run_edgeft
from .hostile import assert_refused, snapshot

NESTED = "[" * 200_000  # past Python's recursion limit in json.loads: RecursionError
RSS_MARGIN = 64 << 20  # over the same command refusing a benign input


# --------------------------------------------------------------------------------------------
# tiny inputs


def llama_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 16,
        "max_position_embeddings": 64,
    }


def safetensors(path: Path, header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def model_folder(root: Path, header: dict | str | bytes = None, data: bytes = b"", **kw) -> Path:
    """A model folder with a valid tiny llama config and the given safetensors header and data."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(llama_config()))
    if header is None:
        header, data = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    safetensors(root / "model.safetensors", header, data, **kw)
    return root


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_file(path: Path, kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, tail=b"") -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors + tail)
    return path


def good_gguf(path: Path) -> Path:
    """Well-formed and tiny: one metadata entry, no tensors (llama.cpp cannot run it)."""
    kv = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
    return gguf_file(path, kv, 1)


def huge_array_gguf(path: Path) -> Path:
    """49 bytes: one metadata array that claims 2^62 uint8 items."""
    return gguf_file(path, gguf_string("a") + struct.pack("<IIQ", 9, 0, 1 << 62), 1)


def manifest(folder: Path, stage: str, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "edgeft_version": "0.1.0", **extra}))
    return folder


def stage_folder(folder: Path, files: dict[str, bytes], stage: str = "export") -> Path:
    import hashlib

    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    outputs = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return manifest(folder, stage, key="k", inputs={}, params={}, results={}, outputs=outputs)


def stored_reference(folder: Path) -> Path:
    """A stored reference that reads back: two scored positions of one sequence."""
    folder.mkdir()
    arrays = {
        "tokens": np.array([1, 2, 3], np.int32),
        "targets": np.array([1, 2], np.int32),
        "topk_ids": np.zeros((2, 2), np.int32),
        "topk_logp": np.zeros((2, 2), np.float32),
        "target_logp": np.zeros(2, np.float32),
    }
    lengths = {f"{k}_lengths": np.array([len(v)], np.int64) for k, v in arrays.items()}
    np.savez(folder / "reference.npz", **arrays, **lengths)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    meta = {"top_k": 2, "examples": [{"messages": messages, "answers": ["a"]}], "task_accuracy": 1.0}
    meta["performance"] = {"latency": {"prompt_tokens": 8, "decode_tokens": 4}}
    (folder / "reference.json").write_text(json.dumps(meta))
    return folder


LLAMA_BENCH_TEST = {"model_filename": "m.gguf", "model_size": 1000, "n_threads": 4, "n_prompt": 0, "n_gen": 16}
LLAMA_BENCH_TEST["avg_ts"] = 12.5


def refuse(args: list[str], cwd: Path, *fragments: str, code: int = 2, **kw) -> Run:
    run = run_edgeft(args, cwd, **kw)
    assert_refused(run, *fragments, code=code)
    return run


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


# --------------------------------------------------------------------------------------------
# 1. a user's folder is never taken for edgeft's output, and never replaced while it holds their files

STAGE_COMMANDS = {
    "export": ["export", "--model", "m", "--out", "out"],
    "quantize": ["quantize", "--gguf", "g", "--out", "out"],
    "merge": ["merge", "--model", "m", "--adapter", "a", "--out", "out"],
    "train": ["train", "--data", "d.jsonl", "--out", "out"],
    "bench": ["bench", "--artifact", "x.gguf", "--reference", "r", "--out", "out"],
}


@pytest.mark.parametrize("command", sorted(STAGE_COMMANDS))
def test_a_folder_holding_a_report_json_is_not_edgefts(work, command):
    out = work / "out"
    out.mkdir()
    (out / "report.json").write_text('{"my": "results"}')
    (out / "notes.txt").write_text("years of work")
    (out / "manifest.json").write_text('{"files": ["notes.txt"]}')  # the user's own, no edgeft marker
    before = snapshot(work)
    refuse(STAGE_COMMANDS[command], work, "--out out", "not written by edgeft")
    assert snapshot(work) == before


def test_a_stage_folder_copied_into_a_users_folder_does_not_make_it_edgefts(work):
    (work / "project").mkdir()
    (work / "project" / "thesis.tex").write_text("years of work")
    stage_folder(work / "project" / "adapter", {"adapter_model.safetensors": b"x"}, "train")
    before = snapshot(work)
    refuse(["export", "--model", "m", "--out", "project"], work, "--out project", "not written by edgeft")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("extra", "named"),
    [("notes.txt", "notes.txt"), ("sub/notes.txt", "sub"), ("a_link", "a_link")],
)
def test_a_stage_folder_holding_a_users_file_is_not_replaced(work, extra, named):
    out = stage_folder(work / "out", {"model.gguf": b"GGUF"})
    if extra == "a_link":
        (out / extra).symlink_to(work)
    else:
        (out / extra).parent.mkdir(exist_ok=True)
        (out / extra).write_text("mine")
    before = snapshot(work)
    for args in (["export", "--model", "m", "--out", "out"], ["quantize", "--gguf", "g", "--out", "out"]):
        refuse(args, work, "--out out", f"holds {named}", "will not delete it")
    assert snapshot(work) == before


def test_a_build_folder_is_never_replaced_by_a_stage(work):
    build = manifest(work / "build", "build", params={})
    (build / "report.json").write_text("{}")
    stage_folder(build / "adapter", {"adapter_model.safetensors": b"x"}, "train")
    before = snapshot(work)
    refuse(["export", "--model", "m", "--out", "build"], work, "--out build", "folder of an edgeft build")
    refuse(["train", "--data", "d.jsonl", "--out", "build"], work, "--out build", "folder of an edgeft build")
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------------
# 2. the stale-scratch sweep removes only what edgeft names with a pid


def test_the_scratch_sweep_keeps_pid_less_names(work):
    """A bench into an edgeft bench folder sweeps it twice (the folder, then its stage's scratch);
    names of the scratch shape without a pid are the user's."""
    out = manifest(work / "out", "bench", params={})
    mine = [out / ".z.old-20240101", out / ".bench-m.old-20240101", out / ".bench-m.tmp-deadbeef"]
    for d in mine:
        d.mkdir()
        (d / "keep.txt").write_text("mine")
    good_gguf(work / "m.gguf")
    stored_reference(work / "ref")
    before = snapshot(*mine)
    refuse(["bench", "--artifact", "m.gguf", "--reference", "ref", "--out", "out"], work, "m.gguf", "cannot load")
    assert snapshot(*mine) == before


def test_bench_does_not_write_into_a_stage_folder(work):
    out = stage_folder(work / "out", {"model.gguf": b"GGUF"})
    good_gguf(work / "m.gguf")
    stored_reference(work / "ref")
    before = snapshot(out)
    refuse(["bench", "--artifact", "m.gguf", "--reference", "ref", "--out", "out"], work, "export stage")
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------
# 3. an unexpected exception is an internal error: exit 3, one line, never 1 (a failed gate)


def test_a_failing_stdout_is_an_internal_error_not_a_failed_gate(work):
    """A real failure edgeft does not expect: stdout on a full disk (/dev/full) under `edgeft targets`."""
    with open("/dev/full", "w") as full, tempfile.TemporaryFile() as err:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeft.cli", "targets"],
            cwd=work,
            stdout=full,
            stderr=err,
            env={**os.environ, "EDGEFT_RAISE_ERRORS": ""},
            timeout=120,
        )
        err.seek(0)
        stderr = err.read().decode()
    line = assert_refused(Run(proc.returncode, "", stderr, 0), "internal error (OSError", code=3)
    assert "No space left on device" in line and "EDGEFT_RAISE_ERRORS=1" in line and "bug in edgeft" in line


def _command_raising(exc: Exception):
    import click

    from edgeft.cli import _user_errors

    @click.command()
    def broken() -> None:
        with _user_errors():
            if isinstance(exc, RecursionError):
                recurse = lambda n: recurse(n + 1)  # noqa: E731
                recurse(0)
            raise exc

    return broken


@pytest.mark.parametrize("exc", [RecursionError(), MemoryError(), KeyError("x"), TypeError("unhashable")])
def test_every_exception_is_one_line_and_exit_3(exc, capsys, monkeypatch):
    monkeypatch.delenv("EDGEFT_RAISE_ERRORS", raising=False)
    with pytest.raises(SystemExit) as stop:
        _command_raising(exc).main([], standalone_mode=False)
    assert stop.value.code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeft: error: internal error ({type(exc).__name__}"), lines
    monkeypatch.setenv("EDGEFT_RAISE_ERRORS", "1")  # the traceback, for the bug report
    with pytest.raises(type(exc)):
        _command_raising(exc).main([], standalone_mode=False)


def test_ctrl_c_is_not_an_internal_error(capsys, monkeypatch):
    import click

    monkeypatch.delenv("EDGEFT_RAISE_ERRORS", raising=False)
    with pytest.raises(click.Abort):  # main() prints "edgeft: aborted" and exits 130
        _command_raising(KeyboardInterrupt()).main([], standalone_mode=False)  # type: ignore[arg-type]
    assert "internal error" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 4. malformed JSON and headers: exit 2 with a clear line, in bounded memory


def _json_case(name: str, work: Path, text: str) -> tuple[list[str], list[str]]:
    """(argv, fragments) of a command that reads ``text`` as the JSON file of case ``name``."""
    if name == "manifest":
        (work / "out").mkdir()
        (work / "out" / "manifest.json").write_text(text)
        return ["export", "--model", "m", "--out", "out"], ["--out out", "not written by edgeft"]
    if name == "config.json":
        (work / "m").mkdir()
        (work / "m" / "config.json").write_text(text)
        return ["export", "--model", "m", "--out", "out"], ["m/config.json", "not valid JSON"]
    if name == "safetensors-header":
        model_folder(work / "m", text)
        return ["export", "--model", "m", "--out", "out"], ["model.safetensors", "header is not JSON"]
    if name == "adapter_config.json":
        (work / "a").mkdir()
        (work / "a" / "adapter_config.json").write_text(text)
        return ["merge", "--adapter", "a", "--out", "out"], ["adapter_config.json", "not valid JSON"]
    if name == "reference.json":
        stored_reference(work / "ref")
        (work / "ref" / "reference.json").write_text(text)
        good_gguf(work / "m.gguf")
        return ["bench", "--artifact", "m.gguf", "--reference", "ref", "--out", "out"], ["reference.json"]
    if name == "llama-bench":
        (work / "lb.json").write_text(text)
        return ["bench", "--build", "b", "--llama-bench", "lb.json"], ["lb.json:1:", "not llama-bench JSON"]
    if name == "dataset-line":
        (work / "d.jsonl").write_text(text + "\n")
        return ["train", "--data", "d.jsonl", "--out", "out"], ["d.jsonl:1:", "invalid JSON"]
    if name == "tokenizer.json":
        model_folder(work / "m")
        (work / "m" / "tokenizer.json").write_text(text)
        return ["export", "--model", "m", "--out", "out"], ["m/tokenizer.json", "cannot read"]
    if name == "compare-to":
        (work / "old.json").write_text(text)
        good_gguf(work / "m.gguf")
        args = ["bench", "--artifact", "m.gguf", "--reference", "r", "--compare-to", "old.json", "--out", "out"]
        return args, ["--compare-to old.json", "not a readable report.json"]
    if name == "recommend-manifest":
        manifest(work / "b", "build", params={})
        (work / "b" / "bench-x").mkdir()
        (work / "b" / "bench-x" / "manifest.json").write_text(text)
        return ["recommend", "--build", "b", "--device", "rpi5"], ["no benchmarked targets"]
    raise AssertionError(name)


JSON_CASES = [
    "manifest",
    "config.json",
    "safetensors-header",
    "adapter_config.json",
    "reference.json",
    "llama-bench",
    "dataset-line",
    "recommend-manifest",
    "tokenizer.json",
    "compare-to",
]


@pytest.mark.parametrize("name", JSON_CASES)
def test_json_nested_200000_deep_is_refused_like_any_bad_json(tmp_path, name):
    runs = {}
    for variant, text in (("benign", "{"), ("nested", NESTED)):
        work = tmp_path / variant
        work.mkdir()
        args, fragments = _json_case(name, work, text)
        before = snapshot(work)
        runs[variant] = refuse(args, work, *fragments)
        assert snapshot(work) == before
    assert runs["nested"].peak_rss_bytes < runs["benign"].peak_rss_bytes + RSS_MARGIN


def test_json_integer_of_5000_digits_is_bad_json_not_a_crash(work):
    (work / "m").mkdir()
    (work / "m" / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}")
    refuse(["export", "--model", "m", "--out", "out"], work, "config.json", "not valid JSON", "4300 digits")


def test_a_config_json_of_gigabytes_is_not_read(work):
    (work / "m").mkdir()
    with open(work / "m" / "config.json", "wb") as f:  # sparse: 5 GB that take no disk
        f.truncate(5 << 30)
    run = refuse(["export", "--model", "m", "--out", "out"], work, "config.json", "larger than the", "MiB edgeft reads")
    assert run.peak_rss_bytes < 400 << 20


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "length", "fragments"),
    [
        ({"w": {**F32_2, "data_offsets": ["0", "8"]}}, b"\0" * 8, None, ["tensor w", "data_offsets", "[begin, end]"]),
        ({"w": {**F32_2, "data_offsets": [-8, 0]}}, b"\0" * 8, None, ["tensor w", "data_offsets", "[begin, end]"]),
        ({"w": {**F32_2, "data_offsets": [8, 0]}}, b"\0" * 8, None, ["tensor w", "-8 bytes"]),
        ({"w": {**F32_2, "shape": [1 << 64]}}, b"\0" * 8, None, ["tensor w", "(expected 73786976294838206464)"]),
        ({"w": {**F32_2, "shape": [[2]]}}, b"\0" * 8, None, ["tensor w", "shape", "integers >= 0"]),
        ({"w": {**F32_2, "data_offsets": [0, 1 << 40]}}, b"\0" * 8, None, ["truncated", "tensor w ends at byte"]),
        ({"w": {**F32_2, "dtype": "Q4"}}, b"\0" * 8, None, ["tensor w", "dtype 'Q4'", "F32"]),
        ({"w": {**F32_2, "dtype": ["F32"]}}, b"\0" * 8, None, ["tensor w", "dtype"]),
        ({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12, None, ["tensor b", "overlap"]),
        ({"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}}, b"\0" * 20, None, ["tensor b", "belong to no tensor"]),
        ({"w": F32_2}, b"\0" * 16, None, ["8 bytes after the last tensor"]),
        ({"w": "F32"}, b"\0" * 8, None, ["tensor w", "malformed header entry"]),
        ({"w": F32_2}, b"\0" * 8, 1 << 40, ["not a safetensors file, or truncated", "header of 1099511627776 bytes"]),
    ],
    ids=[
        "string-offsets",
        "negative-offsets",
        "end-before-begin",
        "dimension-2^64",
        "nested-shape",
        "past-the-end",
        "unknown-dtype",
        "dtype-not-a-string",
        "overlapping",
        "gap",
        "trailing-bytes",
        "entry-not-an-object",
        "header-longer-than-file",
    ],
)
def test_lying_safetensors_headers_are_refused(work, header, data, length, fragments):
    model_folder(work / "m", header, data, length=length)
    before = snapshot(work)
    refuse(["export", "--model", "m", "--out", "out"], work, "model.safetensors", *fragments)
    assert snapshot(work) == before


def test_a_shard_index_pointing_outside_the_folder_is_refused(work):
    m = model_folder(work / "m")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/x.safetensors"}}))
    refuse(["export", "--model", "m", "--out", "out"], work, "index.json", "shard '../../etc/x.safetensors'")


@pytest.mark.parametrize(
    ("field", "value", "fragments"),
    [
        ("model_filename", [1], ["model_filename: expected a string, got [1]"]),
        ("model_size", "1000", ["model_size: expected a byte count"]),
        ("n_threads", -1, ["n_threads: expected a thread count", "-1"]),
        ("stddev_ts", {"x": 1}, ["stddev_ts: expected a number"]),
        ("build_number", [1] * 10_000, ["build_number: expected a build number", "…"]),
        ("n_depth", True, ["n_depth: expected a token count"]),
    ],
)
def test_llama_bench_fields_of_the_wrong_type_name_the_test_and_field(work, field, value, fragments):
    (work / "lb.json").write_text(json.dumps([LLAMA_BENCH_TEST, {**LLAMA_BENCH_TEST, field: value}]))
    refuse(["bench", "--build", "b", "--llama-bench", "lb.json"], work, "lb.json: test 2", *fragments)


# --------------------------------------------------------------------------------------------
# 5. a GGUF header that claims more than the file holds is refused before gguf-py or llama.cpp read it


@pytest.fixture
def baseline_rss(tmp_path: Path) -> int:
    """Peak RSS of a command that imports gguf-py, checks a GGUF file and stops (a missing reference)."""
    work = tmp_path / "baseline"
    work.mkdir()
    good_gguf(work / "m.gguf")
    run = refuse(["bench", "--artifact", "m.gguf", "--reference", "none", "--out", "out"], work, "none")
    return run.peak_rss_bytes


def _gguf_build(work: Path, artifact: Path) -> Path:
    """A build folder with one quantized target whose model.gguf is ``artifact``, and its bench results."""
    build = manifest(work / "b", "build", params={})
    target = stage_folder(build / "gguf-q4", {"model.gguf": artifact.read_bytes()}, "quantize")
    results = {
        "artifact": {"format": "gguf", "path": str(target / "model.gguf"), "file_type": "Q4_K_M", "size_bytes": 49},
        "performance": {
            "peak_rss_bytes": 50_000_000,
            "latency": {"decode_tok_s": {"median": 10.0}, "prompt_tokens": 8, "decode_tokens": 4},
        },
        "roofline": {"bytes_per_token": 1_000_000},
        "fidelity": {"kl_divergence_mean": 0.01, "task_accuracy_artifact": 0.5},
    }
    stage_folder(build / "bench-gguf-q4", {}, "bench")
    m = json.loads((build / "bench-gguf-q4" / "manifest.json").read_text())
    (build / "bench-gguf-q4" / "manifest.json").write_text(json.dumps({**m, "results": results}))
    return build


@pytest.mark.slow
def test_a_49_byte_gguf_claiming_2_62_items_is_refused_in_bounded_memory(work, baseline_rss):
    evil = huge_array_gguf(work / "evil.gguf")
    assert evil.stat().st_size == 49
    _gguf_build(work, evil)
    (work / "lb.json").write_text(json.dumps([LLAMA_BENCH_TEST]))
    (work / "exported").mkdir()
    (work / "exported" / "model.gguf").write_bytes(evil.read_bytes())
    claim = ["not a valid GGUF file", "metadata 'a'", "array of 4611686018427387904 uint8 items", "49-byte file"]
    before = snapshot(work, skip=work / "out")
    runs = [
        refuse(["bench", "--build", "b", "--llama-bench", "lb.json"], work, "b/gguf-q4/model.gguf", *claim),
        refuse(["bench", "--artifact", "evil.gguf", "--reference", "r", "--out", "out"], work, "evil.gguf", *claim),
        refuse(["quantize", "--gguf", "exported", "--out", "out"], work, "exported/model.gguf", *claim),
    ]
    # `recommend` reads each target's KV-cache size from its header; an unreadable one counts as unknown
    rec = run_edgeft(["recommend", "--build", "b", "--device", "rpi5"], work)
    assert rec.returncode in (0, 1) and "Traceback" not in rec.stderr, rec.stderr
    assert "gguf-q4" in rec.stdout
    for run in [*runs, rec]:
        assert run.peak_rss_bytes < baseline_rss + RSS_MARGIN, (run.peak_rss_bytes, baseline_rss)
    assert snapshot(work, skip=work / "out") == before
    assert not (work / "out").exists()


def _tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


ARCH = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"n_kv": 1 << 40}, ["metadata count 1099511627776"]),
        ({"n_tensors": 1 << 40}, ["tensor count 1099511627776"]),
        ({"kv": gguf_string("k") + struct.pack("<IQ", 8, 1 << 40), "n_kv": 1}, ["metadata 'k'", "1099511627776-byte"]),
        ({"kv": struct.pack("<Q", 1 << 50) + bytes(8), "n_kv": 1}, ["metadata key 0", "1125899906842624-byte"]),
        ({"kv": gguf_string("k") + struct.pack("<I", 13), "n_kv": 1}, ["metadata 'k'", "unknown value type 13"]),
        ({"kv": gguf_string(b"\xff\xfe") + struct.pack("<IB", 0, 1), "n_kv": 1}, ["metadata key 0 is not UTF-8"]),
        ({"kv": ARCH + ARCH, "n_kv": 2}, ["'general.architecture' appears twice"]),
        (
            {
                "kv": gguf_string("k") + struct.pack("<IIQ", 9, 8, 2) + gguf_string("a") + struct.pack("<Q", 1 << 40),
                "n_kv": 1,
            },
            ["metadata 'k'", "string 1 (1099511627776-byte string)"],
        ),
        (
            {"kv": gguf_string("general.alignment") + struct.pack("<II", 4, 0), "n_kv": 1},
            ["general.alignment", "power of two"],
        ),
        ({"tensors": _tensor_info("t", [4] * 9), "n_tensors": 1}, ["tensor 't'", "9 dimensions"]),
        ({"tensors": _tensor_info("t", [1 << 63]), "n_tensors": 1}, ["tensor 't'", "at most 2^63 - 1"]),
        ({"tensors": _tensor_info("t", [4], 99), "n_tensors": 1}, ["tensor 't'", "unknown ggml type 99"]),
        ({"tensors": _tensor_info("t", [30], 2), "n_tensors": 1}, ["tensor 't'", "block of 32"]),
        ({"tensors": _tensor_info("t", [1 << 40]), "n_tensors": 1}, ["tensor 't'", "run past the end of the file"]),
        (
            {"tensors": _tensor_info("t", [4], 0, 3), "n_tensors": 1, "tail": b"\0" * 64},
            ["not a multiple of the alignment"],
        ),
    ],
    ids=[
        "kv-count",
        "tensor-count",
        "string-length",
        "key-length",
        "value-type",
        "key-not-utf8",
        "duplicate-key",
        "string-array-short",
        "alignment-zero",
        "too-many-dims",
        "dim-past-int64",
        "unknown-tensor-type",
        "row-not-whole-blocks",
        "tensor-past-end",
        "misaligned-offset",
    ],
)
def test_gguf_headers_that_do_not_fit_their_file_are_refused(work, kwargs, fragments):
    gguf_file(work / "x.gguf", **kwargs)
    refuse(["bench", "--artifact", "x.gguf", "--reference", "r", "--out", "out"], work, "x.gguf", *fragments)


# --------------------------------------------------------------------------------------------
# 6. no code from a model folder ever runs


def _model_with_code(root: Path, marker: Path, where: str) -> Path:
    """A model folder whose ``where`` config names ``evil.py`` (which would write ``marker``) in auto_map.

    Architecture QWenLMHeadModel: edgeft hands it to llama.cpp's converter, which loads its tokenizer
    with trust_remote_code=True; the safetensors file holds no tensors, so the converter reaches it."""
    root.mkdir()
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": 32, "hidden_size": 64}
    config.update(num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    tokenizer_config = {"tokenizer_class": "EvilTokenizer"}
    if where == "config.json":
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    else:
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (root / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('attacker code ran')\n"
        "from transformers import PreTrainedTokenizer, PretrainedConfig\n"
        "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n"
        "class EvilConfig(PretrainedConfig):\n    pass\n"
    )
    safetensors(root / "model.safetensors", {"__metadata__": {"format": "pt"}})
    return root


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_a_model_folder_naming_its_own_code_is_refused_before_anything_loads_it(work, where):
    marker = work.parent / "marker"
    _model_with_code(work / "m", marker, where)
    before = snapshot(work)
    refuse(["export", "--model", "m", "--out", "out"], work, f"m/{where}", "auto_map", "evil.py", "never runs")
    refuse(["train", "--model", "m", "--data", "d.jsonl", "--out", "out"], work, f"m/{where}", "auto_map")
    refuse(["merge", "--model", "m", "--adapter", "a", "--out", "out"], work, "a: no such adapter folder")
    assert not marker.exists()
    assert snapshot(work) == before


@pytest.mark.slow
def test_the_converter_never_imports_a_model_folders_code(work):
    """Past the up-front refusal (called directly): llama.cpp's converter runs with transformers'
    loader of a folder's own code replaced by an error."""
    from edgeft.errors import ModelError
    from edgeft.formats.gguf import fallback

    if not (fallback.converter_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converter is not installed")
    marker = work.parent / "marker"
    model = _model_with_code(work / "m", marker, "tokenizer_config.json")
    with pytest.raises(ModelError, match="asks to run its own code"):
        fallback.convert(model, work / "x.gguf", "f32")
    assert not marker.exists()
    assert not (work / "x.gguf").exists()


# --------------------------------------------------------------------------------------------
# 7. tarfile's 2025 fixes are checked by feature
