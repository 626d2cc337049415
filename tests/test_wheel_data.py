"""A wheel (a non-editable install) carries the data the repository keeps at its root: the build
targets, the device profiles and the general calibration text, and the installed package finds them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_an_installed_wheel_finds_its_targets_devices_and_calibration_text(tmp_path):
    src = tmp_path / "src"  # build from a copy: an in-tree build would write build/ into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("edgeft", "targets", "calibration"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = tmp_path / "site"
    with zipfile.ZipFile(next(tmp_path.glob("edgeft-*.whl"))) as wheel:
        wheel.extractall(site)

    probe = (
        "import json; from edgeft.targets import available_targets, targets_dir; "
        "from edgeft.devices import devices_dir; from edgeft.calibration import general_text_path; "
        "print(json.dumps({'targets': sorted(available_targets()), 'dir': str(targets_dir()), "
        "'devices': sorted(p.name for p in devices_dir().glob('*.toml')), 'general': str(general_text_path())}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "EDGEFT_TARGETS"} | {"PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert Path(found["dir"]).is_relative_to(site)  # the wheel's copy, not this checkout's
    assert found["targets"] == sorted(p.stem for p in (ROOT / "targets").glob("*.toml"))
    assert found["devices"] == sorted(p.name for p in (ROOT / "targets" / "devices").glob("*.toml"))
    general = Path(found["general"])
    assert general.is_relative_to(site)
    sha = hashlib.sha256
    assert sha(general.read_bytes()).digest() == sha((ROOT / "calibration" / "general.txt").read_bytes()).digest()
