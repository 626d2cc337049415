from pathlib import Path

import pytest

from edgeft.config import load_config
from edgeft.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "cooking" / "edgeft.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "edgeft.toml"
    p.write_text(text)
    return p


def test_shipped_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    assert cfg.model == "smollm2-135m"
    assert cfg.data.train.is_file() and cfg.data.eval.is_file()
    assert cfg.train.method == "lora"


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.toml")), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    """Each example names the command that uses it on its first line, and its data files exist."""
    cfg = load_config(path)
    assert cfg.data.train.is_file() and cfg.data.eval.is_file()
    first = path.read_text().splitlines()[0]
    assert first.startswith("# edgeft build --config ") and f"examples/{path.relative_to(EXAMPLES)}" in first


def test_the_gemma_example_shares_the_cooking_data():
    cfg = load_config(EXAMPLES / "cooking" / "edgeft-gemma.toml")
    base = load_config(EXAMPLE)
    assert cfg.model == "gemma3-270m"
    assert (cfg.data.train, cfg.data.eval) == (base.data.train, base.data.eval)


def test_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\ntrain = "d/t.jsonl"\n[train]\nepochs = 2\n'))
    assert cfg.data.train == (tmp_path / "d" / "t.jsonl").resolve()
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[train]\nepoch = 3\n", "[train].epoch: unknown key; expected one of"),
        ("modle = 'x'\n", "unknown key 'modle'"),
        ("[train]\nrank = 'big'\n", "[train].rank: expected int, got 'big'"),
        ("[train]\nmethod = 'dora'\n", "[train].method: expected 'lora' or 'qlora'"),
        ("[train]\nrank = 0\n", "[train].rank: expected a positive number"),
        ("[gates]\nmax_kld = 'low'\n", "[gates].max_kld: expected float"),
        ("[train\n", "invalid TOML"),
        ("[train]\neval_steps = -1\n", "[train].eval_steps: expected a number >= 0"),
        ("[train]\nvalidation_share = 1\n", "[train].validation_share: expected a number <= 0.5"),
        ("[train]\nmax_steps = 4\neval_steps = 5\n", "[train].eval_steps = 5 exceeds [train].max_steps = 4"),
        (
            "[bench]\nreference_dtype = 'float16'\n",
            "[bench].reference_dtype: expected one of 'auto', 'float32', 'bfloat16', got 'float16'",
        ),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert fragment in str(e.value)
    assert str(path) in str(e.value)


def test_the_validation_file_resolves_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\nvalidation = "v.jsonl"\n'))
    assert cfg.data.validation == (tmp_path / "v.jsonl").resolve()
    assert cfg.train.validation_share == 0.1 and cfg.train.eval_steps == 0


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_a_config_sets_a_targets_options_for_its_model(tmp_path):
    from edgeft.targets import apply_overrides, parse_target_list

    cfg = load_config(write(tmp_path, "[targets.gguf-q4-mixed]\nmax_size_mb = 450\n"))
    targets = apply_overrides(parse_target_list("gguf-q4,gguf-q4-mixed"), cfg.targets, str(cfg.source))
    assert targets[0] == parse_target_list("gguf-q4")[0]  # targets the config does not name: as shipped
    mixed = targets[1]
    assert mixed.name == "gguf-q4-mixed" and mixed.options["max_size_mb"] == 450
    assert mixed.options["mix"] == parse_target_list("gguf-q4-mixed")[0].options["mix"]  # the rest kept


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[targets.gguf-q4-mixed]\nmax_size_mb = -1\n", "[targets.gguf-q4-mixed]: max_size_mb: expected a positive"),
        ("[targets.gguf-q4-mixed]\nbudget = 3\n", "[targets.gguf-q4-mixed]: unknown key 'budget'; a gguf target takes"),
        ("[targets.gguf-q4-mixed]\nquant = 'Q2_K'\n", "[targets.gguf-q4-mixed]: unknown key 'quant'"),
    ],
)
def test_a_bad_target_override_names_the_table_and_key(tmp_path, text, fragment):
    from edgeft.targets import apply_overrides, parse_target_list

    cfg = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as e:
        apply_overrides(parse_target_list("gguf-q4-mixed"), cfg.targets, str(cfg.source))
    assert fragment in str(e.value) and str(cfg.source) in str(e.value)


def test_targets_must_be_tables(tmp_path):
    with pytest.raises(ConfigError, match=r"\[targets\] must hold tables"):
        load_config(write(tmp_path, "targets = 3\n"))
    with pytest.raises(ConfigError, match="targets.gguf-q4: expected a table"):
        load_config(write(tmp_path, "[targets]\ngguf-q4 = 3\n"))


def test_build_refuses_an_override_of_a_target_that_does_not_exist(tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import cli

    path = write(tmp_path, "[targets.gguf-q9-mixed]\nmax_size_mb = 450\n")
    result = CliRunner().invoke(cli, ["build", "--config", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "[targets.gguf-q9-mixed]: no such target" in result.output
