"""The bad-input corpus: broken configs, datasets, model folders, weight files, adapters, GGUF files,
reference folders, flags and output paths, each through the real CLI in its own process.

Every case must end with exit status 2, exactly one ``edgeft: error:`` line that contains the
expected fragments, no traceback, nothing at ``--out``, and every file the user had byte-identical.
The broken files are made here from good ones (truncated, garbage headers, NaN, wrong shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from .cli import run_edgeft
from .tiny import make_tiny_llama

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"
TRAIN = COOKING / "train.jsonl"
EVAL = COOKING / "eval.jsonl"


@dataclass
class Inputs:
    """Good inputs, made once per module; cases copy and break them."""

    model: Path  # tiny llama, fp32 safetensors, real SmolLM2 tokenizer
    adapter: Path  # a LoRA adapter for ``model``
    other_adapter: Path  # a LoRA adapter for a wider model
    gguf: Path  # ``model`` exported to GGUF
    reference: Path  # a stored reference of ``model`` on a few held-out questions
    onnx: Path  # ``model`` exported to an onnxruntime-genai folder (int4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer, edgeft_cache) -> Inputs:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeft.bench.run import reference
    from edgeft.config import BenchConfig
    from edgeft.formats.gguf.export import export

    root = tmp_path_factory.mktemp("inputs")
    model = make_tiny_llama(root / "model", tokenizer)
    other = make_tiny_llama(root / "wide", tokenizer, hidden=128, intermediate=256)
    adapters = []
    for base, name in ((model, "adapter"), (other, "other-adapter")):
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        )
        peft_model.save_pretrained(root / name)
        adapters.append(root / name)
    shutil.rmtree(other)
    gguf = export(model, root / "gguf", "f32").path / "model.gguf"
    eval_small = root / "eval.jsonl"
    eval_small.write_text("".join(EVAL.read_text().splitlines(keepends=True)[:2]))
    bench = BenchConfig(threads=1, max_new_tokens=4, prompt_tokens=64, decode_tokens=4, repeats=1, top_k=8)
    ref = reference(model, eval_small, root / "reference", bench).path
    from edgeft.formats.onnx.export import export as export_onnx

    onnx = export_onnx(model, root / "onnx", "int4", {}).path
    return Inputs(model, adapters[0], adapters[1], gguf, ref, onnx)


# --------------------------------------------------------------------------------------------
# ways to break files


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff\xfe not a header!"
    path.write_bytes(bytes(data))


def poison(path: Path, value: float, dtype=np.float32) -> None:
    """Put ``value`` (NaN/Inf) into one weight of a safetensors file, stored as ``dtype``."""
    from safetensors.numpy import load_file, save_file

    tensors = {k: v.astype(dtype) for k, v in load_file(path).items()}
    name = sorted(k for k in tensors if "mlp.down_proj" in k or "lora_B" in k)[0]
    tensors[name].flat[3] = value
    save_file(tensors, path, metadata={"format": "pt"})


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return dst


def config(tmp: Path, body: str = "", model: str = "smollm2-135m", train: Path = TRAIN, eval: Path = EVAL) -> Path:
    path = tmp / "edgeft.toml"
    path.write_text(f'model = "{model}"\n[data]\ntrain = "{train}"\neval = "{eval}"\n{body}')
    return path


def build(cfg: Path, *extra: str) -> list[str]:
    return ["build", "--config", str(cfg), "--target", "gguf-q8", "--out", "out", *extra]


# --------------------------------------------------------------------------------------------
# the corpus: id → (setup(tmp, inputs) → argv, fragments the error line must contain)

Case = Callable[[Path, Inputs], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        assert name not in CASES
        CASES[name] = fn
        return fn

    return register


# configs ---------------------------------------------------------------------------------------


@case("config-missing")
def _(t, i):
    return build(t / "nope.toml"), ["nope.toml", "config file not found"]


@case("config-invalid-toml")
def _(t, i):
    (t / "c.toml").write_text("[train\nrank = 4\n")
    return build(t / "c.toml"), ["c.toml", "invalid TOML"]


@case("config-unknown-key")
def _(t, i):
    return build(config(t, "[train]\nepoch = 3\n")), ["[train].epoch: unknown key", "epochs"]


@case("config-wrong-type")
def _(t, i):
    return build(config(t, '[train]\nrank = "big"\n')), ["[train].rank", "expected int"]


@case("config-table-not-table")
def _(t, i):
    (t / "c.toml").write_text('model = "smollm2-135m"\ntrain = 3\n')
    return build(t / "c.toml"), ["[train] must be a table"]


@case("config-device-profile-unknown-format")
def _(t, i):
    shipped = (Path(__file__).parent.parent / "targets" / "devices" / "rpi5.toml").read_text()
    (t / "dev.toml").write_text(shipped.replace('formats = ["gguf", "onnx"]', 'formats = ["gguf", "tflite"]'))
    return build(config(t), "--device", str(t / "dev.toml")), ["dev.toml: formats", "'tflite'"]


@case("train-negative-learning-rate")
def _(t, i):
    return build(config(t, "[train]\nlearning_rate = -0.001\n")), ["[train].learning_rate", "> 0"]


@case("train-nan-learning-rate")
def _(t, i):
    return build(config(t, "[train]\nlearning_rate = nan\n")), ["[train].learning_rate", "finite"]


@case("train-dropout-above-one")
def _(t, i):
    return build(config(t, "[train]\ndropout = 1.5\n")), ["[train].dropout", "<= 0.99"]


@case("train-target-modules-match-nothing")
def _(t, i):
    return build(config(t, '[train]\ntarget_modules = ["qq_proj"]\n')), ["'qq_proj' matches no module", "q_proj"]


@case("train-target-modules-one-wrong")
def _(t, i):
    body = '[train]\ntarget_modules = ["q_proj", "c_attn"]\n'
    return build(config(t, body)), ["'c_attn' matches no module"]


@case("train-max-steps-zero")
def _(t, i):
    return build(config(t, "[train]\nmax_steps = 0\n")), ["[train].max_steps", "got 0"]


@case("train-infinite-epochs")
def _(t, i):
    return build(config(t, "[train]\nepochs = inf\n")), ["[train].epochs", "finite"]


@case("train-eval-steps-negative")
def _(t, i):
    return build(config(t, "[train]\neval_steps = -5\n")), ["[train].eval_steps", ">= 0", "-5"]


@case("train-eval-steps-not-integer")
def _(t, i):
    return build(config(t, "[train]\neval_steps = 2.5\n")), ["[train].eval_steps", "expected int"]


@case("train-eval-steps-beyond-max-steps")
def _(t, i):
    return build(config(t, "[train]\nmax_steps = 8\neval_steps = 20\n")), ["[train].eval_steps = 20", "max_steps = 8"]


@case("train-eval-steps-without-validation")
def _(t, i):
    body = "[train]\nvalidation_share = 0\neval_steps = 5\n"
    return build(config(t, body)), ["[train].eval_steps = 5 needs a validation set", "[data].validation"]


@case("train-validation-share-above-half")
def _(t, i):
    return build(config(t, "[train]\nvalidation_share = 0.9\n")), ["[train].validation_share", "<= 0.5"]


@case("train-validation-share-holds-out-everything")
def _(t, i):
    (t / "one.jsonl").write_text(TRAIN.read_text().splitlines()[0] + "\n")
    body = "[train]\nvalidation_share = 0.5\n"
    return build(config(t, body, train=t / "one.jsonl")), ["[train].validation_share = 0.5 holds out all 1"]


@case("bench-prompt-beyond-context")
def _(t, i):
    return build(config(t, "[bench]\nprompt_tokens = 2000\n")), ["prompt_tokens + decode_tokens = 2128", "2048"]


@case("bench-negative-threads")
def _(t, i):
    return build(config(t, "[bench]\nthreads = -1\n")), ["[bench].threads", ">= 0"]


@case("bench-decode-one-token")
def _(t, i):
    return build(config(t, "[bench]\ndecode_tokens = 1\n")), ["[bench].decode_tokens", ">= 2"]


@case("bench-beyond-model-context")
def _(t, i):
    body = "[bench]\nprompt_tokens = 500\ndecode_tokens = 100\n"
    return build(config(t, body, model=str(i.model))), ["exceeds the model's context of 512"]


@case("gates-top1-above-one")
def _(t, i):
    return build(config(t, "[gates]\nmin_top1 = 1.5\n")), ["[gates].min_top1", "<= 1"]


@case("gates-drop-above-one")
def _(t, i):
    return build(config(t, "[gates]\nmax_task_accuracy_drop = 5\n")), ["[gates].max_task_accuracy_drop", "<= 1"]


@case("gates-flips-not-whole")
def _(t, i):
    return build(config(t, "[gates]\nmax_flips = 2.5\n")), ["[gates].max_flips", "expected int"]


@case("gates-negative-size")
def _(t, i):
    return build(config(t, "[gates]\nmax_size_mb = -5\n")), ["[gates].max_size_mb", "positive number"]


@case("train-device-cuda-without-gpu")
def _(t, i):
    return build(config(t, '[train]\ndevice = "cuda"\n')), ["[train].device = 'cuda'", "no GPU"]


@case("train-device-unknown")
def _(t, i):
    return build(config(t, '[train]\ndevice = "gpu"\n')), ["[train].device", "'cuda'", "'gpu'"]


@case("train-merge-dequant-of-a-lora-adapter")
def _(t, i):
    return build(config(t, '[merge]\nstrategy = "dequant"\n')), ["[merge].strategy = 'dequant'", "'qlora'"]


@case("config-merge-strategy-unknown")
def _(t, i):
    return build(config(t, '[merge]\nstrategy = "best"\n')), ["[merge].strategy", "'dequant'", "'best'"]


# datasets --------------------------------------------------------------------------------------


@case("data-no-assistant-turn")
def _(t, i):
    line = {"messages": [{"role": "user", "content": "How long do I boil an egg?"}]}
    (t / "d.jsonl").write_text(TRAIN.read_text().splitlines()[0] + "\n" + json.dumps(line) + "\n")
    return build(config(t, train=t / "d.jsonl")), ["d.jsonl:2:", "role 'assistant'"]


@case("data-validation-is-the-eval-file")
def _(t, i):
    shutil.copy2(EVAL, t / "copy.jsonl")  # same conversations under another name leak just the same
    return build(config(t, f'validation = "{t / "copy.jsonl"}"\n')), ["[data].validation", "is the [data].eval file"]


@case("data-validation-is-the-train-file")
def _(t, i):
    return build(config(t, f'validation = "{TRAIN}"\n')), ["[data].validation", "is the [data].train file"]


@case("data-validation-missing")
def _(t, i):
    return build(config(t, f'validation = "{t / "none.jsonl"}"\n')), ["none.jsonl", "not found"]


@case("data-validation-bad-line")
def _(t, i):
    (t / "v.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return build(config(t, f'validation = "{t / "v.jsonl"}"\n')), ["v.jsonl:1:", "role 'assistant'"]


@case("flag-train-validation-is-the-train-file")
def _(t, i):
    args = ["train", "--config", str(config(t)), "--validation", str(TRAIN), "--out", "out"]
    return args, ["[data].validation", "is the [data].train file"]


@case("data-missing")
def _(t, i):
    return build(config(t, train=t / "none.jsonl")), ["none.jsonl", "not found"]


@case("data-malformed-line")
def _(t, i):
    lines = TRAIN.read_text().splitlines()[:5]
    lines[2] = lines[2][:-5]
    (t / "d.jsonl").write_text("\n".join(lines) + "\n")
    return build(config(t, train=t / "d.jsonl")), ["d.jsonl:3:", "invalid JSON"]


@case("data-eval-without-answers")
def _(t, i):
    line = json.loads(EVAL.read_text().splitlines()[0])
    del line["answers"]
    (t / "e.jsonl").write_text(EVAL.read_text().splitlines()[1] + "\n" + json.dumps(line) + "\n")
    return build(config(t, eval=t / "e.jsonl")), ["e.jsonl:2:", "answers"]


@case("data-empty")
def _(t, i):
    (t / "d.jsonl").write_text("\n\n")
    return build(config(t, train=t / "d.jsonl")), ["d.jsonl", "empty"]


@case("data-is-a-folder")
def _(t, i):
    (t / "d.jsonl").mkdir()
    return build(config(t, train=t / "d.jsonl")), ["d.jsonl", "cannot read"]


@case("data-not-utf8")
def _(t, i):
    (t / "d.jsonl").write_bytes(b'{"messages": "\xff\xfe"}\n')
    return build(config(t, train=t / "d.jsonl")), ["d.jsonl", "cannot read"]


# model folders ---------------------------------------------------------------------------------


@case("model-missing")
def _(t, i):
    return build(config(t, model=str(t / "none"))), ["none", "no such model folder"]


@case("model-is-a-file")
def _(t, i):
    (t / "m").write_text("x")
    return build(config(t, model=str(t / "m"))), ["expected a model folder, found a file"]


@case("model-config-not-json")
def _(t, i):
    m = copy(i.model, t / "m")
    (m / "config.json").write_text("{ not json")
    return build(config(t, model=str(m))), ["config.json", "not valid JSON"]


@case("model-unsupported-architecture")
def _(t, i):
    m = copy(i.model, t / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    return build(config(t, model=str(m))), ["unsupported architecture GPT2LMHeadModel"]


@case("model-no-weights")
def _(t, i):
    m = copy(i.model, t / "m")
    (m / "model.safetensors").unlink()
    return ["export", "--model", str(m), "--out", "out"], ["no *.safetensors weights"]


@case("model-pickled-weights")
def _(t, i):
    m = copy(i.model, t / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return ["train", "--model", str(m), "--data", str(TRAIN), "--out", "out"], ["pickled", "safetensors"]


@case("model-bad-hidden-size")
def _(t, i):
    m = copy(i.model, t / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "hidden_size": "64"}))
    return build(config(t, model=str(m))), ["hidden_size: expected a positive integer"]


# weight files ----------------------------------------------------------------------------------


@case("weights-truncated-build")
def _(t, i):
    m = copy(i.model, t / "m")
    truncate(m / "model.safetensors")
    return build(config(t, model=str(m))), ["model.safetensors", "truncated"]


@case("weights-garbage-header-train")
def _(t, i):
    m = copy(i.model, t / "m")
    garbage_header(m / "model.safetensors")
    return ["train", "--model", str(m), "--data", str(TRAIN), "--out", "out"], [
        "model.safetensors",
        "not a safetensors file",
    ]


@case("weights-truncated-export")
def _(t, i):
    m = copy(i.model, t / "m")
    truncate(m / "model.safetensors", 0.9)
    return ["export", "--model", str(m), "--out", "out"], ["model.safetensors", "truncated"]


@case("weights-tiny-file-merge")
def _(t, i):
    m = copy(i.model, t / "m")
    (m / "model.safetensors").write_bytes(b"\x01\x02")
    return ["merge", "--model", str(m), "--adapter", str(i.adapter), "--out", "out"], ["only 2 bytes"]


@case("weights-nan-export")
def _(t, i):
    m = copy(i.model, t / "m")
    poison(m / "model.safetensors", np.nan)
    return ["export", "--model", str(m), "--out", "out"], ["mlp.down_proj", "NaN or Inf"]


@case("weights-inf-f16-build")
def _(t, i):
    m = copy(i.model, t / "m")
    poison(m / "model.safetensors", np.inf, np.float16)
    return build(config(t, model=str(m))), ["mlp.down_proj", "NaN or Inf"]


@case("weights-nan-merge-base")
def _(t, i):
    m = copy(i.model, t / "m")
    poison(m / "model.safetensors", np.nan)
    return ["merge", "--model", str(m), "--adapter", str(i.adapter), "--out", "out"], ["NaN or Inf"]


# adapters --------------------------------------------------------------------------------------


@case("adapter-missing-config")
def _(t, i):
    a = copy(i.adapter, t / "a")
    (a / "adapter_config.json").unlink()
    return ["merge", "--model", str(i.model), "--adapter", str(a), "--out", "out"], ["adapter_config.json missing"]


@case("adapter-config-garbage")
def _(t, i):
    a = copy(i.adapter, t / "a")
    (a / "adapter_config.json").write_text("[1, 2")
    return ["merge", "--model", str(i.model), "--adapter", str(a), "--out", "out"], ["not valid JSON"]


@case("adapter-for-another-base")
def _(t, i):
    args = ["merge", "--model", str(i.model), "--adapter", str(i.other_adapter), "--out", "out"]
    return args, ["lora_A is [4, 128]", "needs [4, 64]", "another base model"]


@case("adapter-weights-truncated")
def _(t, i):
    a = copy(i.adapter, t / "a")
    truncate(a / "adapter_model.safetensors")
    return ["merge", "--model", str(i.model), "--adapter", str(a), "--out", "out"], ["adapter_model.safetensors"]


@case("adapter-is-a-file")
def _(t, i):
    (t / "a").write_text("x")
    return ["merge", "--model", str(i.model), "--adapter", str(t / "a"), "--out", "out"], ["found a file"]


@case("adapter-nan")
def _(t, i):
    a = copy(i.adapter, t / "a")
    poison(a / "adapter_model.safetensors", np.nan)
    return ["merge", "--model", str(i.model), "--adapter", str(a), "--out", "out"], ["lora_B", "NaN or Inf"]


@case("adapter-wrong-rank")
def _(t, i):
    a = copy(i.adapter, t / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    return ["merge", "--model", str(i.model), "--adapter", str(a), "--out", "out"], ["needs [8, 64]"]


# GGUF artifacts --------------------------------------------------------------------------------


def bench(i: Inputs, artifact: Path, *extra: str) -> list[str]:
    return ["bench", "--artifact", str(artifact), "--reference", str(i.reference), "--out", "out", *extra]


@case("gguf-not-gguf")
def _(t, i):
    (t / "m.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    return bench(i, t / "m.gguf"), ["not a GGUF file"]


@case("gguf-truncated")
def _(t, i):
    g = copy(i.gguf, t / "m.gguf")
    truncate(g, 0.6)
    return bench(i, g), ["m.gguf", "not a valid GGUF file", "run past the end of the file"]


@case("gguf-empty")
def _(t, i):
    (t / "m.gguf").write_bytes(b"")
    return bench(i, t / "m.gguf"), ["not a GGUF file"]


@case("gguf-folder-without-model")
def _(t, i):
    (t / "art").mkdir()
    return bench(i, t / "art"), ["not an artifact edgeft can bench"]


@case("gguf-future-version")
def _(t, i):
    g = copy(i.gguf, t / "m.gguf")
    data = bytearray(g.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    g.write_bytes(bytes(data))
    return bench(i, g), ["GGUF version 99"]


@case("quantize-truncated-gguf")
def _(t, i):
    d = t / "exported"
    d.mkdir()
    truncate(copy(i.gguf, d / "model.gguf"), 0.6)
    return ["quantize", "--gguf", str(d), "--target", "gguf-q8", "--out", "out"], ["model.gguf"]


@case("onnx-missing-genai-config")
def _(t, i):
    o = copy(i.onnx, t / "onnx")
    (o / "genai_config.json").unlink()
    return bench(i, o), ["genai_config.json missing"]


@case("onnx-missing-external-data")
def _(t, i):
    o = copy(i.onnx, t / "onnx")
    (o / "model.onnx.data").unlink()
    return bench(i, o), ["external data file model.onnx.data missing"]


@case("onnx-graph-garbage")
def _(t, i):
    o = copy(i.onnx, t / "onnx")
    (o / "model.onnx").write_bytes(b"\x00garbage" * 10)
    return bench(i, o), ["model.onnx", "cannot load the ONNX graph"]


@case("onnx-target-unknown-builder-option")
def _(t, i):
    (t / "mine.toml").write_text('format = "onnx"\nquant = "int4"\nblocksize = 32\n')
    return ["build", "--config", str(config(t)), "--target", str(t / "mine.toml"), "--out", "out"], [
        "unknown key 'blocksize'",
        "block_size",
    ]


@case("onnx-target-bad-accuracy-level")
def _(t, i):
    (t / "mine.toml").write_text('format = "onnx"\nquant = "int4"\naccuracy_level = 7\n')
    return ["build", "--config", str(config(t)), "--target", str(t / "mine.toml"), "--out", "out"], [
        "accuracy_level: expected one of 0, 1, 2, 3, 4"
    ]


# reference folders -----------------------------------------------------------------------------


@case("reference-missing")
def _(t, i):
    return ["bench", "--artifact", str(i.gguf), "--reference", str(t / "ref"), "--out", "out"], ["no such folder"]


@case("reference-half")
def _(t, i):
    r = copy(i.reference, t / "ref")
    (r / "reference.npz").unlink()
    return ["bench", "--artifact", str(i.gguf), "--reference", str(r), "--out", "out"], ["not a stored reference"]


@case("reference-corrupt-arrays")
def _(t, i):
    r = copy(i.reference, t / "ref")
    truncate(r / "reference.npz")
    return ["bench", "--artifact", str(i.gguf), "--reference", str(r), "--out", "out"], ["reference.npz", "cannot load"]


@case("reference-meta-not-json")
def _(t, i):
    r = copy(i.reference, t / "ref")
    (r / "reference.json").write_text("{")
    return ["bench", "--artifact", str(i.gguf), "--reference", str(r), "--out", "out"], ["reference.json"]


@case("reference-is-a-file")
def _(t, i):
    (t / "ref").write_text("x")
    return ["bench", "--artifact", str(i.gguf), "--reference", str(t / "ref"), "--out", "out"], ["found a file"]


# flags -----------------------------------------------------------------------------------------


@case("flag-negative-threads")
def _(t, i):
    return bench(i, i.gguf, "--threads", "-1"), ["--threads", "-1"]


@case("flag-train-device-cuda-without-gpu")
def _(t, i):
    return build(config(t), "--train-device", "cuda"), ["--train-device cuda", "no GPU"]


@case("flag-device-cuda-without-gpu-train")
def _(t, i):
    args = ["train", "--model", str(i.model), "--data", str(TRAIN), "--out", "out", "--device", "cuda"]
    return args, ["--device cuda", "no GPU"]


@case("flag-gate-not-a-number")
def _(t, i):
    return build(config(t), "--gate", "max_kld=abc"), ["--gate max_kld", "expected a number"]


@case("flag-gate-flips-fraction")
def _(t, i):
    return build(config(t), "--gate", "max_flips=2.5"), ["--gate max_flips", "expected a whole number"]


@case("flag-gate-negative-drop")
def _(t, i):
    return build(config(t), "--gate", "max_task_accuracy_drop=-0.1"), ["max_task_accuracy_drop", ">= 0"]


@case("flag-gate-nan")
def _(t, i):
    return build(config(t), "--gate", "min_top1=nan"), ["min_top1", "finite"]


@case("flag-unknown-target")
def _(t, i):
    return ["build", "--config", str(config(t)), "--target", "gguf-q9", "--out", "out"], ["unknown target 'gguf-q9'"]


@case("flag-missing-required-option")
def _(t, i):
    return ["merge", "--adapter", str(i.adapter)], ["Missing option '--out'"]


@case("flag-unknown-option")
def _(t, i):
    return ["build", "--tagret", "gguf-q4"], ["No such option"]


@case("flag-compare-to-not-a-report")
def _(t, i):
    (t / "old.json").write_text("[1, 2, 3]")
    return build(config(t), "--compare-to", str(t / "old.json")), ["old.json", "not an edgeft report.json"]


@case("flag-compare-to-missing")
def _(t, i):
    return build(config(t), "--compare-to", str(t / "old.json")), ["old.json", "report not found"]


# output paths ----------------------------------------------------------------------------------


@case("out-is-a-file-build")
def _(t, i):
    (t / "out").write_text("my notes")
    return build(config(t)), ["--out out", "existing file"]


@case("out-is-a-file-merge")
def _(t, i):
    (t / "out").write_text("my notes")
    return ["merge", "--model", str(i.model), "--adapter", str(i.adapter), "--out", "out"], ["existing file"]


@case("out-foreign-folder-build")
def _(t, i):
    (t / "out").mkdir()
    (t / "out" / "thesis.tex").write_text("years of work")
    return build(config(t)), ["not written by edgeft"]


@case("out-foreign-folder-export")
def _(t, i):
    (t / "out").mkdir()
    (t / "out" / "photo.jpg").write_bytes(b"\xff\xd8")
    return ["export", "--model", str(i.model), "--out", "out"], ["not written by edgeft"]


@case("out-parent-is-a-file")
def _(t, i):
    (t / "notes").write_text("x")
    return ["train", "--model", str(i.model), "--data", str(TRAIN), "--out", "notes/adapter"], ["notes is a file"]


# --------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_the_corpus_covers_every_class():
    prefixes = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 40
    classes = (
        "config",
        "train",
        "bench",
        "data",
        "model",
        "weights",
        "adapter",
        "gguf",
        "onnx",
        "reference",
        "flag",
        "out",
    )
    for cls in classes:
        assert cls in prefixes


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(name, inputs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args, fragments = CASES[name](work, inputs)
    out = work / "out"
    out_before = snapshot(out) if out.is_dir() else (out.read_bytes() if out.is_file() else None)
    before = snapshot(work, inputs.model.parent)

    start = time.perf_counter()
    # refusals take well under a second; a case that starts real work is a bug
    proc = run_edgeft(args, work, timeout=120)
    seconds = time.perf_counter() - start
    if log := os.environ.get("EDGEFT_CORPUS_LOG"):  # the corpus as a table, for issue notes
        with open(log, "a") as f:
            f.write(f"{name}\t{seconds:.2f}\t{proc.returncode}\t{proc.stderr.strip()[:300]}\n")

    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeft: error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    # nothing written at --out, nothing of the user's changed, no scratch folders anywhere
    if out_before is None:
        assert not out.exists() and not out.is_symlink(), sorted(p.name for p in out.rglob("*"))
    else:
        assert (snapshot(out) if out.is_dir() else out.read_bytes()) == out_before
    assert snapshot(work, inputs.model.parent) == before
    assert not [p for p in work.rglob(".*tmp-*")]
