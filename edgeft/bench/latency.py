"""Time to first token, prefill speed and decode speed, measured the same way for every runtime.

The prompt is a single user message of fixed public-domain text (Python's own pydoc topics),
trimmed with the runtime's own tokenizer until the rendered chat prompt is ``prompt_tokens``
tokens long, give or take a few; the exact count is reported. One warm-up generation (page-in,
allocator and thread-pool start-up), then ``repeats`` timed generations of exactly
``decode_tokens`` tokens (end-of-generation ignored). Every number is reported as median with
min and max: on shared machines single runs vary by ±20%.
"""

from __future__ import annotations

import time

from ..errors import ConfigError
from .device_state import ROOT, fastest_clock, hottest, snapshot
from .stats import spread

WARMUP_TOKENS = 8  # the warm-up run's decode budget: enough to start every code path


def _filler_text() -> str:
    """~460 KB of deterministic technical English that ships with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _prompt_length(runtime, text: str) -> int:
    return len(runtime.tokenize(runtime.render_chat(_chat(text))))


def build_prompt(runtime, prompt_tokens: int) -> tuple[list[dict[str, str]], int]:
    """A chat whose rendered prompt is at most ``prompt_tokens`` tokens for ``runtime``, and as
    close to it as whole characters allow; returns the chat and its exact token count.

    Binary search over the length of the filler text, tokenizing the whole rendered chat each
    time so template tokens and merges at the boundary are counted.
    """
    text = _filler_text()
    overhead = _prompt_length(runtime, "")
    if prompt_tokens <= overhead:
        raise ConfigError(f"prompt_tokens={prompt_tokens} is not above the chat template's own {overhead} tokens")
    # Grow the upper bound from ~4 characters a token so long texts are tokenized rarely.
    lo, hi = 0, min(len(text), 4 * prompt_tokens)
    while _prompt_length(runtime, text[:hi]) <= prompt_tokens:
        if hi == len(text):
            raise ConfigError(f"prompt_tokens={prompt_tokens} is longer than the built-in filler text")
        lo, hi = hi, min(len(text), 2 * hi)
    while hi - lo > 1:  # invariant: text[:lo] fits, text[:hi] does not
        mid = (lo + hi) // 2
        if _prompt_length(runtime, text[:mid]) <= prompt_tokens:
            lo = mid
        else:
            hi = mid
    chat = _chat(text[:lo])
    return chat, _prompt_length(runtime, text[:lo])


def _clear_prompt_cache(runtime, prompt: list[int]) -> None:
    """Make the next generation process its whole prompt.

    llama-cpp-python keeps the KV cache between calls and reuses the longest common prefix, so a
    repeated prompt would cost one token and the measured TTFT would be near zero. Scoring one
    token that differs from the prompt's first token rewinds any such cache to a single entry
    that the prompt does not share; it costs one token's evaluation and is outside the timing.
    """
    runtime.logits([next((t for t in prompt if t != prompt[0]), prompt[0] + 1)])


def measure_latency(runtime, *, prompt_tokens: int = 512, decode_tokens: int = 128, repeats: int = 5) -> dict:
    """TTFT, prefill tokens/s and decode tokens/s of ``runtime`` for a ~``prompt_tokens`` prompt.

    ``decode_tok_s`` excludes the first token (it is part of TTFT). Raises ConfigError when the
    prompt and the decode budget do not fit in the runtime's context.
    """
    if decode_tokens < 2 or repeats < 1:
        raise ConfigError(f"need decode_tokens >= 2 and repeats >= 1, got {decode_tokens} and {repeats}")
    n_ctx = getattr(runtime, "n_ctx", None)
    if n_ctx is not None and prompt_tokens + decode_tokens > n_ctx:
        raise ConfigError(
            f"prompt_tokens + decode_tokens = {prompt_tokens + decode_tokens} exceeds the runtime's n_ctx={n_ctx}"
        )
    chat, n_prompt = build_prompt(runtime, prompt_tokens)
    prompt = runtime.tokenize(runtime.render_chat(chat))

    _clear_prompt_cache(runtime, prompt)
    runtime.generate(chat, max_new_tokens=min(WARMUP_TOKENS, decode_tokens), ignore_eos=True)
    runs = []
    for _ in range(repeats):
        _clear_prompt_cache(runtime, prompt)
        runs.append(runtime.generate(chat, max_new_tokens=decode_tokens, ignore_eos=True))
    short = [r.n_tokens for r in runs if r.n_tokens != decode_tokens]
    if short:
        raise RuntimeError(f"{runtime.name} generated {short[0]} tokens, expected {decode_tokens}")
    return {
        "runtime": runtime.name,
        "runtime_version": runtime.version,
        "runtime_build": getattr(runtime, "build_info", ""),
        "threads": runtime.threads,
        "prompt_tokens": n_prompt,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "ttft_ms": spread([1000 * r.ttft_s for r in runs]),
        "prefill_tok_s": spread([r.n_prompt / r.ttft_s for r in runs]),
        "decode_tok_s": spread([r.decode_tok_s for r in runs]),
    }


def _run_end(chunks: list[dict], part: float) -> dict:
    """The decode speed over the chunks from the start of ``chunks`` that hold ``part`` of all their
    tokens (at least one chunk, at most half of them)."""
    total = sum(c["tokens"] for c in chunks)
    taken: list[dict] = []
    for c in chunks:
        taken.append(c)
        if sum(t["tokens"] for t in taken) >= part * total or len(taken) >= len(chunks) // 2:
            break
    tokens = sum(c["tokens"] for c in taken)
    return {"chunks": len(taken), "tokens": tokens, "tok_s": tokens / sum(c["decode_s"] for c in taken)}


def measure_sustained(
    runtime,
    seconds: float,
    *,
    chunk_tokens: int = 256,
    prompt_tokens: int = 64,
    part: float = 0.2,
    root=None,
    clock=None,
) -> dict:
    """Decode back to back for ``seconds`` and compare the first and the last ``part`` of the tokens.

    A phone or a fanless board throttles once it is hot: a 10-second benchmark measures the cool
    device. Decoding runs as consecutive generations of ``chunk_tokens`` tokens from a short prompt
    (the KV cache bounds one generation, so a long run is a chain of them); each chunk's decode
    speed is timed without its prompt, and the hottest thermal zone and fastest CPU clock are read
    after each (see :mod:`edgeft.bench.device_state`; None where unreadable). ``first``/``last`` are
    the chunks from each end that hold at least ``part`` of the tokens (at least one chunk, at most
    half of them, so the two never share one: the run goes on until there are two).
    """
    if not seconds > 0 or not 0 < part <= 0.5:
        raise ConfigError(f"sustained decode: need seconds > 0 and 0 < part <= 0.5, got {seconds} and {part}")
    clock = clock or time.perf_counter
    root = ROOT if root is None else root
    chat, n_prompt = build_prompt(runtime, prompt_tokens)
    n_ctx = getattr(runtime, "n_ctx", None)
    chunk = min(chunk_tokens, n_ctx - n_prompt - 1) if n_ctx else chunk_tokens
    if chunk < 2:
        raise ConfigError(f"sustained decode: no room for tokens after the {n_prompt}-token prompt in n_ctx={n_ctx}")
    prompt = runtime.tokenize(runtime.render_chat(chat))
    series = []
    start = clock()
    while len(series) < 2 or clock() - start < seconds:
        _clear_prompt_cache(runtime, prompt)
        g = runtime.generate(chat, max_new_tokens=chunk, ignore_eos=True)
        state = snapshot(root)
        series.append(
            {
                "at_s": clock() - start,
                "tokens": g.n_tokens - 1,  # the first token belongs to the prompt's time
                "decode_s": g.total_s - g.ttft_s,
                "tok_s": g.decode_tok_s,
                "temperature_c": hottest(state),
                "cpu_mhz": fastest_clock(state),
            }
        )
    total = sum(c["tokens"] for c in series)
    first, last = _run_end(series, part), _run_end(series[::-1], part)
    return {
        "seconds": clock() - start,
        "tokens": total,
        "chunk_tokens": chunk,
        "part": part,
        "first": first,
        "last": last,
        "change_pct": 100 * (last["tok_s"] - first["tok_s"]) / first["tok_s"],
        "series": series,
    }
