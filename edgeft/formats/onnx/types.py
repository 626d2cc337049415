"""Facts about ONNX targets, as data: the precisions and the onnxruntime-genai builder's knobs.

Option names and values mirror ``onnxruntime_genai.models.builder`` 0.18 (``--extra_options`` and
``quantization/quant_config.py``); a target file may set any knob below, and a size budget
(``PLAN_KEYS`` in the package, handled by edgeft, not the builder), nothing else.
"""

from __future__ import annotations

# target quant → the builder's precision. int8 and int4 are MatMulNBits (bits 8 / 4, block-wise,
# symmetric) with fp32 activations at the graph's inputs and outputs.
PRECISIONS: dict[str, str] = {"fp32": "fp32", "int8": "int8", "int4": "int4"}

# knob → (allowed values, builder default on CPU, what it does)
KNOBS: dict[str, tuple[tuple, object, str]] = {
    "block_size": ((16, 32, 64, 128, 256), 32, "weights per quantization scale; smaller is finer and larger"),
    "accuracy_level": (
        (0, 1, 2, 3, 4),
        4,
        "MatMulNBits compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest, least exact)",
    ),
    "algo_config": (
        ("default", "rtn", "k_quant", "k_quant_last", "k_quant_mixed"),
        "default",
        "quantizer: rtn, k_quant; *_last keeps the LM head int8, *_mixed also some layers",
    ),
    "shared_embeddings": (
        (True, False),
        None,  # default: the model's tie_word_embeddings
        "quantize the tied embedding with the LM head (int4 only) instead of keeping it fp32",
    ),
    "exclude_lm_head_quant": ((True, False), False, "keep the LM head MatMul in fp32"),
}
