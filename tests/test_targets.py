import pytest

from edgeft.errors import ConfigError
from edgeft.targets import available_targets, get_target, parse_target_list


def test_required_targets_exist():
    t = available_targets()
    assert {"gguf-f16", "gguf-q8", "gguf-q4", "gguf-q4_0"} <= set(t)
    assert t["gguf-q4"].quant == "Q4_K_M" and t["gguf-q8"].quant == "Q8_0"
    from edgeft.formats.gguf import needs_quantize

    assert not needs_quantize(t["gguf-f16"].quant) and needs_quantize(t["gguf-q4"].quant)


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        get_target("gguf-q3")
    assert "unknown target 'gguf-q3'" in str(e.value) and "gguf-q4" in str(e.value)


def test_target_file_validation(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('format = "gguf"\nquant = "Q7_X"\n')
    with pytest.raises(ConfigError, match="quant: expected one of"):
        get_target(str(p))
    p.write_text('format = "gguf"\nquant = "Q5_0"\n')
    assert get_target(str(p)).quant == "Q5_0"


def test_target_list():
    assert [t.name for t in parse_target_list("gguf-q8, gguf-q4,gguf-q8")] == ["gguf-q8", "gguf-q4"]
