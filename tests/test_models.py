"""edgeft.models: resolving built-in names and local folders, materialising the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeft.errors import ModelError
from edgeft.models import BUILTIN_MODELS, resolve_model
from edgeft.stage import read_manifest


def _write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(text)
    return folder


def _no_config(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


# case id → (builds the bad input under tmp_path, expected message fragment)
BAD_FOLDERS = {
    "nonexistent": (lambda tmp: tmp / "missing", "no such model folder"),
    "no-config": (_no_config, "no config.json"),
    "bad-json": (lambda tmp: _write_config(tmp / "bad", "{"), "config.json: not valid JSON"),
    "gpt2": (
        lambda tmp: _write_config(tmp / "gpt2", '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}'),
        "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM",
    ),
    "gpt2-no-architectures": (
        lambda tmp: _write_config(tmp / "bare", '{"model_type": "gpt2"}'),
        "unsupported architecture model_type 'gpt2'",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_model_folder_names_the_path(tmp_path: Path, case: str) -> None:
    make, expected = BAD_FOLDERS[case]
    path = make(tmp_path)
    with pytest.raises(ModelError, match=expected) as err:
        resolve_model(str(path))
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_name_lists_builtin_models() -> None:
    with pytest.raises(ModelError, match="built-in: gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m"):
        resolve_model("smollm3-9000b")


def test_local_llama_folder_is_returned_as_is(smollm2_dir: Path) -> None:
    assert resolve_model(str(smollm2_dir)) == smollm2_dir


def test_builtin_is_materialised_once(smollm2_dir: Path, edgeft_cache: Path) -> None:
    assert smollm2_dir.parent == edgeft_cache / "models"
    assert smollm2_dir.name.startswith("smollm2-135m-")
    before = read_manifest(smollm2_dir)
    assert before and before["stage"] == "materialise"
    assert resolve_model("smollm2-135m") == smollm2_dir
    assert read_manifest(smollm2_dir) == before  # a cache hit rewrites nothing


def test_materialised_model_is_plain_fp32_llama(smollm2_dir: Path) -> None:
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]


def test_materialised_tokenizer_is_repaired_and_complete(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    specials = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert specials == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    # Digits are split one by one, as in the original SmolLM2 tokenizer and llama.cpp's "smollm".
    assert len(tok("2024", add_special_tokens=False)["input_ids"]) == 4
    assert tok("hi", add_special_tokens=True)["input_ids"][0] != tok.bos_token_id  # no BOS added
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == specials["<|im_end|>"]


def test_builtin_table_names_are_lowercase() -> None:
    assert all(name == name.lower() and " " not in name for name in BUILTIN_MODELS)


def test_gemma3_builtin_records_its_licence(gemma3_dir: Path) -> None:
    """Opt-in built-in (skipped unless its package is installed): Gemma terms, not Apache."""
    results = json.loads((gemma3_dir / "manifest.json").read_text())["results"]
    assert results["license"] == "LicenseRef-Gemma-Terms-of-Use"
    assert (gemma3_dir / "GEMMA_TERMS.html").is_file()
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Safe temp for chicken?"},
    {"role": "assistant", "content": "165°F (74°C). "},
]


def test_gemma3_chat_template_renders_gemmas_turn_layout() -> None:
    """System text joins the first user turn; replies are trimmed and end on <end_of_turn>."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgeft.models import GEMMA3_CHAT_TEMPLATE

    template = ImmutableSandboxedEnvironment().from_string(GEMMA3_CHAT_TEMPLATE)
    assert template.render(messages=CHAT, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nSafe temp for chicken?<end_of_turn>\n"
        "<start_of_turn>model\n165°F (74°C).<end_of_turn>\n"
    )
    assert template.render(messages=CHAT[1:2], bos_token="<bos>", add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nSafe temp for chicken?<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.slow
def test_gemma3_folder_carries_a_chat_template_and_stops_on_end_of_turn(gemma3_dir: Path) -> None:
    """Opt-in: the base model's GGUF has no template; the folder gets Gemma's, generation stops on
    <eos> and <end_of_turn>, and a training example's labels end on <end_of_turn>."""
    from transformers import AutoTokenizer, GenerationConfig

    from edgeft.data import Example
    from edgeft.train import IGNORE_INDEX, tokenize_example

    tok = AutoTokenizer.from_pretrained(gemma3_dir)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert (gemma3_dir / "chat_template.jinja").is_file()
    assert GenerationConfig.from_pretrained(gemma3_dir).eos_token_id == [tok.eos_token_id, end_of_turn]
    row = tokenize_example(tok, Example(CHAT[1:]), 128)
    learned = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.decode(learned) == "165°F (74°C).<end_of_turn>\n"
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 1


# --- built-ins split over raw part packages (the Qwen models) ----------------------------------


def _fake_parts(site: Path, chunks: list[bytes]) -> list[str]:
    """Installed distributions ``edgeft-fake-partN==1.0``, each holding data/partNN.bin."""
    reqs = []
    for i, chunk in enumerate(chunks, 1):
        pkg = site / f"edgeft_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        info = site / f"edgeft_fake_part{i}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: edgeft-fake-part{i}\nVersion: 1.0\n")
        reqs.append(f"edgeft-fake-part{i}==1.0")
    return reqs


@pytest.fixture
def fake_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import dataclasses
    import hashlib

    from edgeft import models

    chunks = [b"GGUF" + bytes(range(256)) * 4, b"tail" * 100]
    site = tmp_path / "site"
    reqs = _fake_parts(site, chunks)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    spec = dataclasses.replace(
        BUILTIN_MODELS["qwen2.5-coder-0.5b"],
        gguf_file="fake.gguf",
        parts=tuple(reqs),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", spec)
    return whole, site


def test_parts_are_joined_once_in_order_and_checked(fake_builtin, tmp_path: Path) -> None:
    from edgeft.models import builtin_gguf_path

    whole, _ = fake_builtin
    path = builtin_gguf_path("fake")
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache" / "gguf"
    assert builtin_gguf_path("fake") == path  # the second call reuses the joined file
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # nothing half-written beside it


def test_a_changed_part_is_refused_and_leaves_nothing(fake_builtin, tmp_path: Path) -> None:
    from edgeft.models import builtin_gguf_path

    _, site = fake_builtin
    part = site / "edgeft_fake_part2" / "data" / "part02.bin"
    part.write_bytes(part.read_bytes()[:-1] + b"X")  # same size, one byte changed
    with pytest.raises(ModelError, match="expected .* bytes and .*reinstall with"):
        builtin_gguf_path("fake")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_missing_part_names_the_package_and_the_install(fake_builtin) -> None:
    import shutil

    from edgeft.models import builtin_gguf_path

    _, site = fake_builtin
    shutil.rmtree(site / "edgeft_fake_part2-1.0.dist-info")
    with pytest.raises(
        ModelError, match=r"edgeft-fake-part2==1.0 is not installed; run `pip install -e '.\[qwen05b\]'"
    ):
        builtin_gguf_path("fake")
