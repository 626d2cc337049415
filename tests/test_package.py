"""`edgeft verify` on hand-made zips: what an unzip would do wrong must be refused (no build needed)."""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from pathlib import Path

import pytest

from edgeft.cli import cli
from edgeft.package import BundleError, verify


def manifest_for(files: dict[str, bytes]) -> bytes:
    entries = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in files.items()}
    return json.dumps({"edgeft_bundle": 1, "target": "t", "format": "gguf", "quant": "Q4_0", "files": entries}).encode()


def write_zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


FILES = {"model.gguf": b"GGUF" + bytes(100), "tokenizer.json": b"{}"}


def good_entries(root: str = "b") -> dict[str, bytes]:
    return {f"{root}/{n}": b for n, b in FILES.items()} | {f"{root}/manifest.json": manifest_for(FILES)}


def test_a_consistent_zip_verifies(tmp_path):
    assert verify(write_zip(tmp_path / "b.zip", good_entries()))["target"] == "t"


@pytest.mark.parametrize(
    "name",
    ["b/../../evil.sh", "../evil.sh", "/etc/cron.d/evil", "b/sub/../../../evil", "C:/evil", "\\\\evil"],
)
def test_entries_outside_the_folder_are_refused(tmp_path, name):
    z = write_zip(tmp_path / "b.zip", good_entries() | {name: b"x"})
    with pytest.raises(BundleError, match="outside the bundle|one top folder"):
        verify(z)


def test_symlink_entries_are_refused(tmp_path):
    z = write_zip(tmp_path / "b.zip", good_entries(), symlink="b/passwd")
    with pytest.raises(BundleError, match="symlink"):
        verify(z)


def test_changed_extra_and_missing_files_fail(tmp_path):
    changed = good_entries() | {"b/tokenizer.json": b"{ }"}
    with pytest.raises(BundleError, match="tokenizer.json: contents changed"):
        verify(write_zip(tmp_path / "c.zip", changed))
    with pytest.raises(BundleError, match="extra.gguf is not listed"):
        verify(write_zip(tmp_path / "e.zip", good_entries() | {"b/extra.gguf": b"x"}))
    missing = {k: v for k, v in good_entries().items() if k != "b/model.gguf"}
    with pytest.raises(BundleError, match="model.gguf is missing"):
        verify(write_zip(tmp_path / "m.zip", missing))
    no_manifest = {k: v for k, v in good_entries().items() if not k.endswith("manifest.json")}
    with pytest.raises(BundleError, match="no b/manifest.json"):
        verify(write_zip(tmp_path / "n.zip", no_manifest))


def test_a_manifest_naming_paths_is_refused(tmp_path):
    bad = json.loads(manifest_for(FILES))
    bad["files"]["../x"] = {"sha256": "0" * 64, "size": 1}
    with pytest.raises(BundleError, match="plain file names only"):
        verify(write_zip(tmp_path / "b.zip", good_entries() | {"b/manifest.json": json.dumps(bad).encode()}))


def test_verify_cli_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    z = write_zip(tmp_path / "b.zip", good_entries() | {"b/../evil": b"x"})
    result = CliRunner().invoke(cli, ["verify", str(z)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "points outside the bundle" in result.output
    not_zip = tmp_path / "x.zip"
    not_zip.write_bytes(b"not a zip")
    result = CliRunner().invoke(cli, ["verify", str(not_zip)])
    assert result.exit_code == 2 and "not a bundle" in result.output
    assert CliRunner().invoke(cli, ["verify", str(tmp_path / "absent")]).exit_code == 2
