"""The machine description and the llama.cpp build chosen for it (edgeft/machine.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeft import machine

ZEN4 = set(
    "fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16".split()
)
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
HASWELL = set("fpu sse4_2 avx avx2 fma f16c bmi2".split())
OLD_X86 = set("fpu sse sse2 sse4_2".split())


def options(flags: set[str], arch: str = "x86_64") -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=") for a in machine.llama_cmake_args(flags, arch))


def test_avx512_cpu_gets_avx512_and_its_extensions():
    o = options(ZEN4)
    assert o["GGML_NATIVE"] == "OFF" and o["GGML_AVX2"] == "ON" and o["GGML_AVX512"] == "ON"
    assert o["GGML_AVX512_VNNI"] == o["GGML_AVX512_BF16"] == o["GGML_AVX512_VBMI"] == "ON"
    assert o["GGML_AVX_VNNI"] == "OFF"


def test_amx_is_never_enabled_even_where_the_cpu_has_it():
    # llama.cpp's AMX kernels segfault on every quantized type on this project's Xeon.
    o = options(SAPPHIRE_RAPIDS)
    assert o["GGML_AVX512"] == "ON" and o["GGML_AVX_VNNI"] == "ON"
    assert o["GGML_AMX_TILE"] == o["GGML_AMX_INT8"] == o["GGML_AMX_BF16"] == "OFF"


def test_no_instruction_set_the_cpu_lacks():
    assert options(HASWELL)["GGML_AVX512"] == "OFF" and options(HASWELL)["GGML_AVX512_VNNI"] == "OFF"
    o = options(OLD_X86)
    assert o["GGML_AVX"] == o["GGML_AVX2"] == o["GGML_FMA"] == o["GGML_F16C"] == o["GGML_BMI2"] == "OFF"
    assert o["GGML_SSE42"] == "ON"
    # AVX-512 needs all five base subsets ggml compiles with; a partial set is not enough.
    assert options(HASWELL | {"avx512f"})["GGML_AVX512"] == "OFF"
    # An extension without the AVX-512 base is not turned on on its own.
    assert options(HASWELL | {"avx512_vnni"})["GGML_AVX512_VNNI"] == "OFF"


def test_arm_builds_native_and_other_arches_keep_llama_cpps_defaults():
    assert machine.llama_cmake_args({"asimd", "asimddp"}, "aarch64") == ["-DGGML_NATIVE=ON"]
    assert machine.llama_cmake_args(set(), "riscv64") == []


def test_build_key_separates_builds_for_different_cpus():
    key = machine.build_key("0.3.36", ZEN4, "x86_64")
    assert key == machine.build_key("0.3.36", ZEN4 | {"some_unrelated_flag"}, "x86_64")  # same build
    assert key != machine.build_key("0.3.36", HASWELL, "x86_64")
    assert key != machine.build_key("0.3.37", ZEN4, "x86_64")
    # -march/-mcpu=native builds depend on every flag: two ARM cores never share a wheel.
    pi4, pi5 = {"asimd"}, {"asimd", "asimddp"}
    assert machine.build_key("0.3.36", pi4, "aarch64") != machine.build_key("0.3.36", pi5, "aarch64")


def test_cpuinfo_parsing_for_x86_and_raspberry_pi():
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\n"
    assert machine.cpu_model(x86) == "AMD EPYC 9R14"
    assert machine.cpu_flags(x86) == {"fpu", "avx2", "avx512f"}
    pi = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    assert machine.cpu_model(pi) == "Raspberry Pi 4 Model B Rev 1.4"
    assert machine.isa_features(machine.cpu_flags(pi), "aarch64") == ["NEON"]
    assert machine.isa_features(SAPPHIRE_RAPIDS, "x86_64")[-3:] == ["AMX-TILE", "AMX-INT8", "AMX-BF16"]


def test_describe_and_same_machine():
    m = machine.describe()
    assert m["cores"] >= 1 and m["arch"] and m["cpu_model"] and isinstance(m["isa"], list)
    assert machine.same_machine(m, dict(m))
    assert not machine.same_machine(m, {**m, "cpu_model": "Intel Xeon"})
    assert not machine.same_machine(m, {**m, "cores": m["cores"] + 2})
    assert not machine.same_machine(m, None)
    assert m["cpu_model"] in machine.summary(m)


def test_script_prints_cmake_args_without_edgeft_installed(tmp_path):
    import subprocess
    import sys

    script = Path(machine.__file__)
    # -I: isolated, so the repository is not importable; the Makefile runs it before installing.
    out = subprocess.run([sys.executable, "-I", str(script), "--cmake-args"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == machine.llama_cmake_args()
    bad = subprocess.run([sys.executable, "-I", str(script), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


# llama.cpp's system-info names -> the /proc/cpuinfo flag each needs.
_SYSINFO_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}


@pytest.mark.skipif(machine.arch() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86 Linux only")
def test_installed_llama_cpp_uses_this_cpu_and_nothing_it_lacks():
    llama_cpp = pytest.importorskip("llama_cpp")
    info = llama_cpp.llama_print_system_info().decode()
    enabled = set(re.findall(r"(\w+) = 1", info))
    flags = machine.cpu_flags()
    lacking = {name for name in enabled if name in _SYSINFO_FLAGS and _SYSINFO_FLAGS[name] not in flags}
    assert not lacking, f"llama.cpp was built for {sorted(lacking)}, which this CPU lacks: {info}"
    assert "AMX_INT8" not in enabled
    # ...and it is the build `make` chose for this CPU, not a generic one from pip's cache.
    chosen = options(flags)
    for opt, name in [("GGML_AVX2", "AVX2"), ("GGML_AVX512", "AVX512"), ("GGML_AVX512_VNNI", "AVX512_VNNI")]:
        assert (name in enabled) == (chosen[opt] == "ON"), (name, info)
