"""Decode speed and time to first token, measured the same way for every runtime.

One warm-up generation (page-in, allocator and thread-pool start-up), then ``repeats`` timed
generations of exactly ``decode_tokens`` tokens (end-of-generation ignored) from the same chat
prompt. Reported as median with min and max: on shared machines single runs vary by ±20%.
"""

from __future__ import annotations

from .stats import spread

# A fixed prompt so runs are comparable; its answer length does not matter (EOS is ignored).
LATENCY_PROMPT = [{"role": "user", "content": "Explain how to roast a whole chicken, step by step."}]


def measure_decode(runtime, decode_tokens: int = 64, repeats: int = 3) -> dict:
    runtime.generate(LATENCY_PROMPT, max_new_tokens=8, ignore_eos=True)
    runs = [runtime.generate(LATENCY_PROMPT, max_new_tokens=decode_tokens, ignore_eos=True) for _ in range(repeats)]
    return {
        "runtime": runtime.name,
        "runtime_version": runtime.version,
        "threads": runtime.threads,
        "prompt_tokens": runs[0].n_prompt,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "decode_tok_s": spread([r.decode_tok_s for r in runs]),
        "ttft_ms": spread([1000 * r.ttft_s for r in runs]),
    }
