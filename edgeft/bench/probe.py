"""Load one model in a fresh process, time it, and report that process's own memory.

Peak memory only means something in a process that holds nothing else: the parent of a build has
torch, a reference model and the eval set in memory. So the launcher, :func:`run_probe`, starts

    python -m edgeft.bench.probe --runtime llama.cpp --model M.gguf --threads 4 \\
        --prompt-tokens 512 --decode-tokens 128 --repeats 5

which prints one JSON line::

    {"pid", "runtime", "model", "threads", "load_s", "rss_after_load_bytes", "peak_rss_bytes",
     "torch_imported", "run_id", "timed_at", "machine", "latency": {...measure_latency(...)...},
     "device_state": {"affinity", "before", "after"}, "sustained": {...} | null}

``device_state`` (see :mod:`edgeft.bench.device_state`): on a big.LITTLE CPU the probe pins itself to
the big cores before loading the model (``affinity`` says what it did and why), and reads temperature
and clocks before and after the timed runs. ``--sustained SECONDS`` then decodes continuously for
that long and reports the first and last 20% of the tokens apart (:func:`measure_sustained`).

``run_id`` names the edgeft process that asked for the timing (:data:`RUN_ID`): a report compares
speeds only between rows timed in the same run, and says which rows were timed in another.

``--dtype bfloat16`` (torch only) loads the model as the reference was computed where fp32 did not
fit; the timing then is the bf16 reference's.

``peak_rss_bytes`` is the process's high-water resident set (``getrusage``), interpreter and
numpy included. Only ``--runtime torch`` imports torch, so a llama.cpp probe runs on a device
without it (``torch_imported`` says whether it was loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ..config import DTYPE_SHORT
from ..errors import ConfigError, EdgeftError, InternalError, ModelError
from ..machine import describe
from ..runtimes import RUNTIMES, load_runtime
from .device_state import ROOT, pin_big_cores, snapshot
from .latency import measure_latency, measure_sustained

# One id per edgeft command (inherited by its probe processes through the environment).
RUN_ID = os.environ.get("EDGEFT_RUN_ID") or f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def _load(runtime: str, model: Path, threads: int, dtype: str | None = None):
    """The runtime named ``runtime`` with ``model`` loaded; imports only that runtime's backend."""
    return load_runtime(runtime, model, threads=threads, scoring=False, dtype=dtype)


def _peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark.

    On Linux this must be VmHWM from /proc: getrusage's ru_maxrss survives execve, so a probe
    started from a large parent (fork, then exec) would report the *parent's* peak (seen here: a
    2.6 GB build process made every probe report 2.6 GB). VmHWM belongs to the new address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource  # POSIX; macOS reports bytes

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def probe(
    runtime: str,
    model: Path,
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    repeats: int,
    sustained_s: float = 0.0,
    sysfs_root: Path | None = None,
    dtype: str | None = None,
) -> dict:
    """Load, measure and report; meant to run in its own process (see the module docstring)."""
    model = Path(model)
    if not model.exists():
        raise ModelError(f"{model}: no such model file or folder")
    root = ROOT if sysfs_root is None else Path(sysfs_root)
    affinity = pin_big_cores(threads, root)  # before the runtime starts its threads: they inherit it
    start = time.perf_counter()
    rt = _load(runtime, model, threads, dtype)
    load_s = time.perf_counter() - start
    rss_after_load = psutil.Process().memory_info().rss
    sustained = None
    try:
        before = snapshot(root)
        latency = measure_latency(rt, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats)
        after = snapshot(root)
        if sustained_s > 0:
            sustained = measure_sustained(rt, sustained_s, root=root)
    finally:
        rt.close()
    return {
        "pid": os.getpid(),
        "runtime": runtime,
        "model": str(model),
        "threads": latency["threads"],
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": _peak_rss_bytes(),
        "torch_imported": "torch" in sys.modules,
        **({"dtype": dtype} if dtype else {}),
        "run_id": RUN_ID,
        "timed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": describe(),
        "latency": latency,
        "device_state": {"affinity": affinity, "before": before, "after": after},
        "sustained": sustained,
    }


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m edgeft.bench.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", required=True, choices=list(RUNTIMES))
    parser.add_argument("--model", required=True, type=Path, help="a .gguf file (llama.cpp) or HF folder (torch)")
    parser.add_argument("--threads", required=True, type=int)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sustained", type=float, default=0.0, help="then decode continuously this many seconds")
    parser.add_argument("--sysfs-root", type=Path, default=None, help="where /sys is read from (tests)")
    parser.add_argument("--dtype", choices=list(DTYPE_SHORT), default=None, help="torch only: load the weights in")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the probe process: one JSON line on stdout, or one error line on stderr."""
    a = _args(argv)
    try:
        result = probe(
            a.runtime,
            a.model,
            a.threads,
            a.prompt_tokens,
            a.decode_tokens,
            a.repeats,
            a.sustained,
            a.sysfs_root,
            a.dtype,
        )
    except EdgeftError as e:
        if os.environ.get("EDGEFT_RAISE_ERRORS"):
            raise
        print(e, file=sys.stderr)
        return e.exit_code
    print(json.dumps(result), flush=True)
    return 0


# A probe's time-out is a guard against a hung child, not a budget: it grows with the work. 900 s
# covered every run up to a gigabyte of weights at the default lengths; a run's time grows with the
# bytes each decoded token reads and the weights each prompt token multiplies (both the model's
# size) and with the tokens timed, so a 1.5B fp32 reference (7 GB) gets about 7x that, not 900 s.
BASE_TIMEOUT_S = 900.0
BASE_MODEL_BYTES = 1 << 30
BASE_TOKENS = 4 * (512 + 128)  # a warm-up and three timed runs of a 512-token prompt and 128 tokens


def model_bytes(model: Path) -> int:
    """Bytes of weights behind ``model``: a file's size, or every file in a model folder."""
    model = Path(model)
    if model.is_file():
        return model.stat().st_size
    return sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) if model.is_dir() else 0


def probe_timeout(size_bytes: int, prompt_tokens: int, decode_tokens: int, repeats: int) -> float:
    """Seconds before a probe of ``size_bytes`` of weights timing these lengths counts as hung."""
    size = max(1.0, size_bytes / BASE_MODEL_BYTES)
    work = max(1.0, (repeats + 1) * (prompt_tokens + decode_tokens) / BASE_TOKENS)
    return BASE_TIMEOUT_S * size * work


def run_probe(
    runtime: str,
    model: Path,
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    repeats: int,
    timeout: float | None = None,
    sustained_s: float = 0.0,
    sysfs_root: Path | None = None,
    dtype: str = "float32",
) -> dict:
    """Run :func:`probe` in a child Python process and return its report. ``dtype``: torch's (the
    reference's); float32 asks for nothing, so the command line is as it was without the option.

    The probe exits 2 when the user's input is at fault (it could not load the model): that is
    raised as ModelError with the probe's message. A crash, any other failure or a time-out is not
    the user's fault and raises InternalError (exit status 3). ``timeout``: by default
    :func:`probe_timeout` of the model's size and the lengths timed.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    cmd = [
        sys.executable, "-m", "edgeft.bench.probe",
        "--runtime", runtime,
        "--model", str(model),
        "--threads", str(threads),
        "--prompt-tokens", str(prompt_tokens),
        "--decode-tokens", str(decode_tokens),
        "--repeats", str(repeats),
    ]  # fmt: skip
    if timeout is None:
        timeout = probe_timeout(model_bytes(model), prompt_tokens, decode_tokens, repeats)
    if sustained_s > 0:
        cmd += ["--sustained", repr(float(sustained_s))]
        timeout += sustained_s
    if sysfs_root is not None:
        cmd += ["--sysfs-root", str(sysfs_root)]
    if dtype != "float32":
        cmd += ["--dtype", dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDGEFT_RUN_ID": RUN_ID}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise InternalError(
            f"internal error: the {runtime} probe of {model} did not finish in {timeout:.0f} s "
            "(the limit grows with the model's size and the tokens timed)"
        ) from e
    return _probe_report(done, runtime, model)


def _probe_report(done: subprocess.CompletedProcess, runtime: str, model: Path) -> dict:
    """The finished probe's JSON report, or the error its exit says: the user's (exit 2) or ours."""
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == EdgeftError.exit_code and errors:
        raise ModelError(errors[-1])  # the probe's own one-line message about the input
    if done.returncode != 0 or not lines:
        last = errors[-1] if errors else "no output"
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        raise InternalError(f"internal error: the {runtime} probe of {model} crashed ({how}): {last[:200]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise InternalError(
            f"internal error: the {runtime} probe of {model} printed no JSON report: {lines[-1][:200]}"
        ) from e


if __name__ == "__main__":
    sys.exit(main())
