"""Facts about GGUF quantization types, as data.

``GGUF_QUANT_TYPES`` maps the name users write (llama.cpp's own spelling) to ``llama_ftype`` from
llama.h (mirrored here so the module imports without llama.cpp; a test checks the values against the
installed llama_cpp package).
"""

from __future__ import annotations

# name → llama_ftype (llama.h: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_*)
GGUF_QUANT_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}

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

# Tensor types a mix may name → ggml_type (ggml.h; gguf-py's GGMLQuantizationType has the same
# values, checked by a test) and bits per weight, which orders them.
TENSOR_TYPES: dict[str, tuple[int, float]] = {
    "Q2_K": (10, 2.625),
    "Q3_K": (11, 3.4375),
    "IQ4_XS": (23, 4.25),
    "Q4_0": (2, 4.5),
    "IQ4_NL": (20, 4.5),
    "Q4_K": (12, 4.5),
    "Q4_1": (3, 5.0),
    "Q5_0": (6, 5.5),
    "Q5_K": (13, 5.5),
    "Q5_1": (7, 6.0),
    "Q6_K": (14, 6.5625),
    "Q8_0": (8, 8.5),
    "F16": (1, 16.0),
}
# A 256-block type on rows it cannot tile → the 32-block type of its size class (Q6_K has none
# below 8 bits: Q8_0, as llama.cpp chooses); a 32-block type on rows it cannot tile → F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL", "Q4_K": "Q4_0", "Q5_K": "Q5_0", "Q6_K": "Q8_0"}
