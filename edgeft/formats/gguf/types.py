"""Facts about GGUF quantization types, as data.

The numbers come from gguf-py's enums (``LlamaFileType``, ``GGMLQuantizationType``,
``GGML_QUANT_SIZES``), which mirror llama.h and ggml.h; edgeft only chooses which names it offers.
A test checks the file types against the installed llama_cpp package as well.
"""

from __future__ import annotations

import gguf

# The whole-file types edgeft offers, in llama.cpp's spelling (``llama-quantize``'s names).
_FILE_TYPES = (
    "F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "BF16",
)  # fmt: skip


def _ftype(name: str) -> int:
    """llama_ftype of a whole-file type: LLAMA_FTYPE_ALL_F32, else LLAMA_FTYPE_MOSTLY_<name>."""
    return gguf.LlamaFileType["ALL_F32" if name == "F32" else f"MOSTLY_{name}"].value


# name → llama_ftype
GGUF_QUANT_TYPES: dict[str, int] = {name: _ftype(name) for name in _FILE_TYPES}

# Types the exporter writes directly (→ its outtype); the rest, BF16 included (numpy has no bf16),
# are produced by llama.cpp's quantizer from the F32 export.
UNQUANTIZED: dict[str, str] = {"F32": "f32", "F16": "f16"}

# Types whose blocks span 256 values: rows of other widths make llama.cpp fall back to another type.
K_QUANTS = frozenset(n for n in GGUF_QUANT_TYPES if "_K" in n)

# Whole-file type → average bits per weight of the file, as llama.cpp's quantize reports them on a
# 7B Llama (a small model's embedding and head weigh more, so its files come out a little larger).
# Used to estimate a build's disk before it runs, never to describe a written file (inspect does).
FILE_BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.89,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.55,
    "Q3_K_L": 4.27,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "Q2_K": 3.35,
}

# Tensor types a mix may name, from fewest bits per weight to most.
_MIX_TYPES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0", "F16")


def _tensor_type(name: str) -> tuple[int, float]:
    """ggml_type of a tensor type and its bits per weight (a block's bytes × 8 / its values)."""
    kind = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return kind.value, size * 8 / block


# name → (ggml_type, bits per weight), which orders them
TENSOR_TYPES: dict[str, tuple[int, float]] = {name: _tensor_type(name) for name in _MIX_TYPES}
# A 256-block type on rows it cannot tile → the 32-block type of its size class (Q6_K has none
# below 8 bits: Q8_0, as llama.cpp chooses); a 32-block type on rows it cannot tile → F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL", "Q4_K": "Q4_0", "Q5_K": "Q5_0", "Q6_K": "Q8_0"}
