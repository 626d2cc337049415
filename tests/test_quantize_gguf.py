"""llama.cpp quantization through the C API, on a tiny llama whose rows suit K-quants (256-multiples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeft.formats.gguf.types import GGUF_QUANT_TYPES

from .cores import THREADS
from .tiny import make_tiny_llama


def test_quant_table_mirrors_llama_h():
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, value in GGUF_QUANT_TYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == value, name


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory, smollm2_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from edgeft.formats.gguf.export import export

    root = tmp_path_factory.mktemp("q")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = make_tiny_llama(root / "hf", tok, hidden=256, intermediate=512, heads=4, kv_heads=2)
    return export(model, root / "f32", "f32").path


# quant → tensor types that must appear; 1-D norms always stay F32. With tied embeddings llama.cpp
# keeps token_embd (also the output matrix) at Q6_K in the 4-bit mixes.
EXPECTED = {
    "Q8_0": {"Q8_0", "F32"},
    "Q4_0": {"Q4_0", "Q6_K", "F32"},
    "Q4_K_M": {"Q4_K", "Q6_K", "F32"},
    "Q6_K": {"Q6_K", "F32"},
}


MIN_CORRELATION = {"Q8_0": 0.99, "Q6_K": 0.97, "Q4_K_M": 0.9, "Q4_0": 0.8}


@pytest.mark.slow
@pytest.mark.parametrize("quant", list(EXPECTED))
def test_quantized_file_has_expected_types_and_loads(tiny_f32, tmp_path, quant):
    from edgeft.formats.gguf.quantize import quantize
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    out = quantize(tiny_f32, tmp_path / quant, quant, threads=THREADS)
    types = out.manifest["results"]["tensor_types"]
    assert EXPECTED[quant] <= set(types), types
    assert set(types) <= EXPECTED[quant] | {"Q5_0", "Q5_1", "Q8_0", "Q4_1", "Q5_K"}  # llama.cpp's mix may add these
    rt = LlamaCppRuntime(out.path / "model.gguf", n_threads=THREADS)
    ref = LlamaCppRuntime(tiny_f32 / "model.gguf", n_threads=THREADS)
    tokens = rt.tokenize("<|im_start|>user\nHow long do I boil an egg?<|im_end|>\n")
    q, f = rt.logits(tokens), ref.logits(tokens)
    assert np.isfinite(q).all()
    # Quantized logits track the f32 ones, the more bits the closer (random weights with std 0.2
    # are harder to quantize than trained ones).
    corr = np.corrcoef(q.ravel(), f.ravel())[0, 1]
    assert corr > MIN_CORRELATION[quant]
    rt.close()
    ref.close()


@pytest.mark.slow
def test_quantize_is_cached_and_smaller(tiny_f32, tmp_path):
    from edgeft.formats.gguf.quantize import quantize

    a = quantize(tiny_f32, tmp_path / "q8", "Q8_0")
    assert not a.cached and quantize(tiny_f32, tmp_path / "q8", "Q8_0").cached
    assert (a.path / "model.gguf").stat().st_size < 0.4 * (tiny_f32 / "model.gguf").stat().st_size


def test_quantize_missing_input_is_a_model_error(tmp_path):
    from edgeft.errors import ModelError
    from edgeft.formats.gguf.quantize import quantize

    with pytest.raises(ModelError, match="expected an exported model.gguf"):
        quantize(tmp_path, tmp_path / "out", "Q8_0")
    assert not (tmp_path / "out").exists()
