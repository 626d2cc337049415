"""Device profiles are data with sources; projections are arithmetic on measured inputs, labelled."""

from __future__ import annotations

import pytest

from edgeft.devices import available_devices, devices_dir, get_device, project
from edgeft.errors import ConfigError

REQUIRED = {"rpi4", "rpi5", "android-mid", "android-flagship", "iphone-a17", "laptop-x86"}


def test_the_promised_profiles_exist_and_cite_their_figures():
    devices = available_devices()
    assert REQUIRED <= set(devices)
    for d in devices.values():
        assert d.threads >= 1 and 0 < d.app_ram_gb <= d.ram_gb
        assert d.effective_bandwidth_gb_s <= (d.bandwidth_measured_gb_s or d.bandwidth_theoretical_gb_s)
        for source in (d.app_ram_source, d.bandwidth_theoretical_source, d.effective_bandwidth_source):
            assert len(source) > 20, (d.key, source)  # says where the figure comes from, or that it is assumed
        assert "gguf" in d.formats
    pi5 = devices["rpi5"]
    assert pi5.isa == ("NEON", "FP16", "dotprod") and pi5.effective_bandwidth_gb_s == 10.0


def test_projection_against_the_published_pi5_figure():
    # Qwen2.5-0.5B-Instruct Q4_K_M (~398 MB read per token, tied embeddings) decodes at 25.8 tok/s on a
    # Pi 5 (llama.cpp issue #26484). The profile's fit and effective bandwidth were taken from those
    # runs, so this checks the arithmetic, not an independent prediction (tests/test_decode_model.py).
    p = project(get_device("rpi5"), "gguf", 398_000_000, 600_000_000, 12_288, 2048, 2048)
    assert p["projected"] is True and p["prefill_tok_s"] is None
    assert p["decode_tok_s"] == pytest.approx(25.57, abs=0.01)  # 1 / (3.35 ms + 398 MB / 11.13 GB/s)
    assert p["decode_tok_s_low"] < 25.8 < p["decode_tok_s_high"]


def test_fit_adds_kv_cache_beyond_the_measured_context():
    pi4 = get_device("rpi4")
    small = project(pi4, "gguf", 100_000_000, 250_000_000, 23_040, 2048, 2048)
    assert small["fits"] and small["ram_needed_bytes"] == 250_000_000
    long_ctx = project(pi4, "gguf", 100_000_000, 250_000_000, 23_040, 2048, 262_144)
    assert long_ctx["ram_needed_bytes"] == 250_000_000 + (262_144 - 2048) * 23_040
    assert not long_ctx["fits"]  # 6 GB of KV cache on a 3.5 GB app budget
    too_big = project(pi4, "gguf", 3_000_000_000, 3_600_000_000, None, 2048, 2048)
    assert not too_big["fits"] and too_big["ram_needed_bytes"] > too_big["app_ram_bytes"]


def test_a_format_the_device_does_not_run_never_fits(tmp_path):
    profile = tmp_path / "gguf-only.toml"
    text = (devices_dir() / "rpi5.toml").read_text().replace('formats = ["gguf", "onnx"]', 'formats = ["gguf"]')
    profile.write_text(text)
    p = project(get_device(str(profile)), "onnx", 90_000_000, 300_000_000, None, 640, 2048)
    assert p["format_supported"] is False and p["fits"] is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name = 1", "unknown key|missing key|expected a non-empty string"),
        ('name = "x"\nbogus = 1', "unknown key 'bogus'"),
        ('name = "x"', "missing key"),
    ],
)
def test_bad_profiles_name_the_key(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        get_device(str(path))


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ConfigError, match="rpi5"):
        get_device("pi-zero")


def test_cli_unknown_device_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import cli

    for args in (
        ["bench", "--device", "pi-zero", "--artifact", str(tmp_path / "x.gguf")],
        ["recommend", "--build", str(tmp_path), "--device", "pi-zero"],
        ["recommend", "--build", str(tmp_path / "absent"), "--device", "rpi5"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_report_md_shows_each_projection_as_a_range_with_its_basis_old_reports_as_a_ceiling():
    from edgeft.report import _device_section

    pi5 = get_device("rpi5")
    new = project(pi5, "gguf", 398_000_000, 600_000_000, None, 2048, 2048) | {"measured_decode_tok_s_here": 90.0}
    old = {k: v for k, v in new.items() if not k.startswith("decode_") or k == "decode_tok_s"}
    old.pop("method")
    device = {"profile": pi5.as_dict(), "context_tokens": 2048, "targets": {"gguf-q4": new, "old-q4": old}}
    text = "\n".join(_device_section(device))
    assert "| gguf-q4 | 600 | 7500 | yes | 25.6 \\[24.4–26.9\\] | fit | 90.0 |" in text  # markdown-escaped
    assert f"| old-q4 | 600 | 7500 | yes | ≤ {new['decode_tok_s']:.1f} | ceiling | 90.0 |" in text
    assert "issue #26484" in text
