"""What this machine is: CPU model, instruction sets, memory; and the llama.cpp build that suits it.

Two users, so this module imports nothing outside the standard library:

* every report records :func:`describe` (speeds mean nothing without the machine they came from,
  and ``--compare-to`` warns when two reports come from different machines);
* ``make`` runs it as a plain script *before* edgeft is installed, to choose llama.cpp's build::

      python3 edgeft/machine.py --cmake-args   # -DGGML_NATIVE=OFF -DGGML_AVX2=ON ... for this CPU
      python3 edgeft/machine.py --build-key    # names the wheel-cache folder for that build

Why not ``GGML_NATIVE=ON``: on an Intel Xeon with AMX, ``-march=native`` turns on llama.cpp's AMX
kernels and every quantized type segfaults there. Why not llama.cpp's runtime-dispatch build
(``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``): it compiles the CPU backend about ten times
(an install of 30+ minutes on two cores) and would pick the AMX variant on that same Xeon. So the
x86 build names each instruction set the CPU reports in /proc/cpuinfo and never AMX. On ARM (a
Raspberry Pi builds its own copy) ``GGML_NATIVE`` is safe and is what llama.cpp's docs use.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

# Report name -> the flag Linux prints in /proc/cpuinfo.
X86_FEATURES = {
    "SSE4.2": "sse4_2",
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "BMI2": "bmi2",
    "AVX-VNNI": "avx_vnni",
    "AVX512F": "avx512f",
    "AVX512CD": "avx512cd",
    "AVX512VL": "avx512vl",
    "AVX512DQ": "avx512dq",
    "AVX512BW": "avx512bw",
    "AVX512-VBMI": "avx512vbmi",
    "AVX512-VNNI": "avx512_vnni",
    "AVX512-BF16": "avx512_bf16",
    "AMX-TILE": "amx_tile",
    "AMX-INT8": "amx_int8",
    "AMX-BF16": "amx_bf16",
}
ARM_FEATURES = {"NEON": "asimd", "FP16": "asimdhp", "dotprod": "asimddp", "i8mm": "i8mm", "SVE": "sve", "BF16": "bf16"}

# ggml's GGML_AVX512 compiles with all five of these (ggml-cpu/CMakeLists.txt).
_AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
# ggml option -> the cpuinfo flag it needs. AMX is deliberately absent (see the module docstring).
_X86_OPTIONS = {
    "GGML_SSE42": "sse4_2",
    "GGML_AVX": "avx",
    "GGML_AVX2": "avx2",
    "GGML_FMA": "fma",
    "GGML_F16C": "f16c",
    "GGML_BMI2": "bmi2",
    "GGML_AVX_VNNI": "avx_vnni",
}
_AVX512_OPTIONS = {
    "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni",
    "GGML_AVX512_BF16": "avx512_bf16",
}


def arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags as Linux lists them (x86 ``flags``, ARM ``Features``); empty elsewhere."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    # x86: "model name"; Raspberry Pi OS: "Model" (the board); other ARM boards: "Hardware".
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def isa_features(flags: set[str] | None = None, machine_arch: str | None = None) -> list[str]:
    """The instruction sets that matter for LLM kernels that this CPU has, by their usual names."""
    flags = cpu_flags() if flags is None else flags
    table = ARM_FEATURES if (machine_arch or arch()) in ("aarch64", "armv7l", "armv8l") else X86_FEATURES
    return [name for name, flag in table.items() if flag in flags]


def llama_cmake_args(flags: set[str] | None = None, machine_arch: str | None = None) -> list[str]:
    """CMake options for a llama.cpp build that uses this CPU's instruction sets and nothing it lacks."""
    flags = cpu_flags() if flags is None else flags
    machine_arch = machine_arch or arch()
    if machine_arch == "x86_64":
        args = ["-DGGML_NATIVE=OFF"]
        args += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in _X86_OPTIONS.items()]
        avx512 = all(f in flags for f in _AVX512_BASE)
        args.append(f"-DGGML_AVX512={'ON' if avx512 else 'OFF'}")
        args += [f"-D{opt}={'ON' if avx512 and flag in flags else 'OFF'}" for opt, flag in _AVX512_OPTIONS.items()]
        args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        return args
    if machine_arch == "aarch64":
        return ["-DGGML_NATIVE=ON"]
    return []  # llama.cpp's own defaults


def build_key(version: str, flags: set[str] | None = None, machine_arch: str | None = None) -> str:
    """A name for the wheel built with :func:`llama_cmake_args`: pip caches wheels by version alone,
    so a build for one CPU must not be handed to another. Native builds also key on the CPU."""
    flags = cpu_flags() if flags is None else flags
    machine_arch = machine_arch or arch()
    args = llama_cmake_args(flags, machine_arch)
    native = "-DGGML_NATIVE=ON" in args
    blob = json.dumps([version, machine_arch, args, sorted(flags) if native else None])
    return f"{version}-{machine_arch}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> dict:
    """The machine, for report.json: what a reader needs to know before comparing two speeds."""
    return {
        "cpu_model": cpu_model(),
        "arch": arch(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "isa": isa_features(),
        "ram_bytes": ram_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def same_machine(a: dict | None, b: dict | None) -> bool:
    """Whether two :func:`describe` records name the same kind of machine (speeds compare)."""
    if not a or not b:
        return False
    keys = ("cpu_model", "arch", "cores", "isa")
    if not all(k in a and k in b for k in keys):  # a report from before these keys existed
        return a.get("platform") == b.get("platform") and a.get("cpu_count") == b.get("cpu_count")
    return all(a[k] == b[k] for k in keys)


def summary(m: dict) -> str:
    """One line for report.md."""
    ram = f"{m['ram_bytes'] / 2**30:.0f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    return f"{m.get('cpu_model', '?')} ({m.get('arch', '?')}), {m.get('cores', '?')} cores, {ram}; ISA: {' '.join(m.get('isa') or []) or 'n/a'}"


def main(argv: list[str]) -> int:
    if argv == ["--cmake-args"]:
        print(" ".join(llama_cmake_args()))
    elif len(argv) == 2 and argv[0] == "--build-key":
        print(build_key(argv[1]))
    elif argv == ["--json"]:
        print(json.dumps(describe(), indent=2))
    else:
        print("usage: machine.py --cmake-args | --build-key VERSION | --json", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
