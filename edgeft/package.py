"""`edgeft package` and `edgeft verify`: a bundle an app can ship, and the check an app (or CI) runs on it.

A bundle is a folder, and the same folder as a zip beside it::

    cooking-q4/
      model.gguf                      the artifact (GGUF file, or an ONNX folder's files)
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      Modelfile                       GGUF only: `ollama create NAME -f Modelfile`
      manifest.json                   what the app needs to know, and every file's sha256

``manifest.json`` holds ``edgeft_bundle`` (format version), the target, format, runtime and quant
type, the context length, the stop tokens (text and id), the memory the app needs (peak RSS
*measured* while benchmarking, with the machine it was measured on), the fidelity and latency
figures of the build's report, the base model and its licence, and ``files``: name → {sha256, size}.

:func:`verify` accepts nothing it cannot account for: a file missing, a file added, a changed byte,
a symlink, or a zip entry that would land outside the bundle's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from . import __version__
from .config import BENCH_CONTEXT
from .errors import ConfigError, EdgeftError, ModelError

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
# Tokenizer files an app's tokenizer library reads (the GGUF file also embeds its own copy).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class BundleError(EdgeftError):
    """A bundle that does not match its manifest (exit 2: the input is at fault)."""


def _sha256_stream(chunks: Iterator[bytes]) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


# ------------------------------------------------------------------------------------------ package


def _license(model: str | None) -> str:
    """The base model's licence: a builtin's from its card, a folder's from its README front matter."""
    from .models import BUILTIN_MODELS

    if model is None:
        return "unknown (the build's config was not found)"
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].license
    readme = Path(model) / "README.md"
    try:
        lines = readme.read_text(errors="replace").splitlines()
    except OSError:
        return "unknown (no README.md in the model folder)"
    if lines and lines[0].strip() == "---":  # Hugging Face model cards keep metadata in YAML front matter
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, _, value = line.partition(":")
            if key.strip() == "license" and value.strip():
                return value.strip().strip("'\"")
    return "unknown (not stated in the model card)"


def _stop_tokens(merged: Path) -> list[dict[str, Any]]:
    """End-of-turn tokens the app must stop on: generation_config's eos ids, with their text."""
    from .loading import read_json_object

    gen_path = merged / "generation_config.json"
    gen = read_json_object(gen_path, "generation config") if gen_path.is_file() else {}
    cfg = read_json_object(merged / "config.json", "model config")
    ids = gen.get("eos_token_id", cfg.get("eos_token_id"))
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    text = {}
    if (merged / "tokenizer.json").is_file():
        tok = read_json_object(merged / "tokenizer.json", "tokenizer")
        text = {t["id"]: t["content"] for t in tok.get("added_tokens", []) if isinstance(t, dict) and "id" in t}
    return [{"id": i, "text": text.get(i)} for i in ids]


def _modelfile(stops: list[dict[str, Any]], context: int) -> str:
    # Ollama reads the chat template from the GGUF's metadata; the stops and context are ours.
    lines = ["# Ollama: ollama create NAME -f Modelfile", "FROM ./model.gguf", f"PARAMETER num_ctx {context}"]
    lines += [f'PARAMETER stop "{s["text"]}"' for s in stops if s["text"]]
    return "\n".join(lines) + "\n"


def _build_model_name(build_dir: Path) -> str | None:
    """The `model =` of the config the build ran with, when that config is still where it was."""
    from .config import load_config
    from .stage import read_manifest

    config = ((read_manifest(build_dir) or {}).get("params") or {}).get("config")
    if not config:
        return None
    for candidate in (Path(config), build_dir.parent / config):
        if candidate.is_file():
            try:
                return str(load_config(candidate).model)
            except EdgeftError:
                return None
    return None


def package(build_dir: Path, target: str, out: Path, model: str | None = None) -> dict[str, Any]:
    """Write the bundle folder ``out`` and ``out.zip`` for ``target`` of the build in ``build_dir``."""
    from .formats import detect_artifact
    from .stage import read_manifest

    build_dir, out = Path(build_dir), Path(out)
    if not build_dir.is_dir():
        raise ConfigError(f"--build {build_dir}: no such build folder")
    if not (build_dir / target).is_dir():
        raise ConfigError(
            f"--target {target}: {build_dir / target} not found; run `edgeft build --target {target}` first"
        )
    fmt, artifact = detect_artifact(build_dir / target, f"--target {target}:")
    bench = (read_manifest(build_dir / f"bench-{target}") or {}).get("results")
    if not bench:
        raise ConfigError(
            f"--target {target}: not benchmarked in {build_dir}; run `edgeft build --target {target}` first"
        )
    merged = build_dir / "merged"
    if not (merged / "config.json").is_file():
        raise ConfigError(f"--build {build_dir}: no merged model (merged/config.json) to take the tokenizer from")
    _check_bundle_out(out)

    from .loading import read_json_object

    model_cfg = read_json_object(merged / "config.json", "model config")
    if fmt.NAME == "onnx":
        sources = {p.name: p for p in sorted(artifact.iterdir()) if p.is_file() and p.name != MANIFEST}
        genai = read_json_object(artifact / "genai_config.json", "genai_config")
        context = int(genai["model"].get("context_length") or model_cfg.get("max_position_embeddings") or 2048)
    else:
        sources = {"model.gguf": artifact}
        sources |= {n: merged / n for n in TOKENIZER_FILES if (merged / n).is_file()}
        context = int(model_cfg.get("max_position_embeddings") or 2048)
    stops = _stop_tokens(merged)
    model = model or _build_model_name(build_dir)
    perf = bench["performance"]
    manifest: dict[str, Any] = {
        "edgeft_bundle": BUNDLE_FORMAT,
        "edgeft_version": __version__,
        "target": target,
        "format": fmt.NAME,
        "runtime": fmt.RUNTIME,
        "quant": bench["artifact"]["file_type"],
        "context_length": context,
        "stop_tokens": stops,
        "memory": {
            # Measured, not projected: the runtime's peak RSS while benchmarking (bench context).
            "min_ram_bytes": perf["peak_rss_bytes"],
            # llama.cpp allocates its KV cache for the whole bench context; onnxruntime-genai per request.
            "measured_context_tokens": BENCH_CONTEXT if fmt.NAME == "gguf" else None,
            "weights_bytes": bench["artifact"]["size_bytes"],
            "measured_on": perf.get("machine"),
        },
        "fidelity": {
            k: bench["fidelity"].get(k)
            for k in (
                "kl_divergence_mean",
                "kl_divergence_p99",
                "top1_agreement",
                "perplexity_delta_pct",
                "task_accuracy_artifact",
                "task_accuracy_reference",
                "artifact_stop_rate",
            )
        },
        "latency": {k: perf["latency"][k]["median"] for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms")}
        | {"threads": perf["latency"]["threads"], "measured_on": perf.get("machine")},
        "base_model": model,
        "license": _license(model),
        "files": {},
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    zip_tmp = out.with_name(f".{out.name}.zip.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, src in sources.items():
            shutil.copyfile(src, tmp / name)
        if fmt.NAME == "gguf":
            (tmp / "Modelfile").write_text(_modelfile(stops, context))
        for p in sorted(tmp.iterdir()):
            digest, size = _sha256_stream(_file_chunks(p))
            manifest["files"][p.name] = {"sha256": digest, "size": size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        with zipfile.ZipFile(zip_tmp, "w", compression=zipfile.ZIP_STORED) as z:  # weights do not compress
            for p in sorted(tmp.iterdir()):
                z.write(p, f"{out.name}/{p.name}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        os.replace(zip_tmp, out.with_name(out.name + ".zip"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        zip_tmp.unlink(missing_ok=True)
        raise
    return manifest


def _check_bundle_out(out: Path) -> None:
    """Replace only an earlier bundle; never a folder or zip of the user's."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_bundle(out))):
        raise ConfigError(f"--out {out}: exists and is not an edgeft bundle; choose another path")
    z = out.with_name(out.name + ".zip")
    if z.exists() and not _is_bundle_zip(z):
        raise ConfigError(f"--out {out}: {z} exists and is not an edgeft bundle; choose another path")


def _is_bundle(path: Path) -> bool:
    try:
        return "edgeft_bundle" in json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False


def _is_bundle_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(PurePosixPath(n).name == MANIFEST for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# ------------------------------------------------------------------------------------------- verify


def _read_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where}: not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("edgeft_bundle") != BUNDLE_FORMAT or not isinstance(files, dict):
        raise BundleError(f"{where}: not an edgeft bundle manifest (expected edgeft_bundle {BUNDLE_FORMAT} and files)")
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
        ):
            raise BundleError(f"{where}: files.{name}: expected {{sha256, size}}")
        if PurePosixPath(name).name != name or name in ("", ".", "..", MANIFEST):
            raise BundleError(f"{where}: files.{name}: a bundle lists plain file names only")
    return manifest


def _compare(where: str, manifest: dict[str, Any], found: dict[str, Any], digest) -> None:
    expected = set(manifest["files"])
    extra, missing = sorted(set(found) - expected), sorted(expected - set(found))
    if missing:
        raise BundleError(f"{where}: {missing[0]} is missing (listed in {MANIFEST})")
    if extra:
        raise BundleError(f"{where}: {extra[0]} is not listed in {MANIFEST} (an extra file)")
    for name in sorted(expected):
        sha, size = digest(found[name])
        want = manifest["files"][name]
        if size != want["size"] or sha != want["sha256"]:
            raise BundleError(
                f"{where}/{name}: contents changed (sha256 {sha[:12]}…, {size} bytes; "
                f"manifest says {want['sha256'][:12]}…, {want['size']} bytes)"
            )


def verify(path: Path) -> dict[str, Any]:
    """Check a bundle folder or zip against its manifest; its manifest when everything matches."""
    path = Path(path)
    if path.is_dir():
        return _verify_dir(path)
    if path.is_file() and zipfile.is_zipfile(path):
        return _verify_zip(path)
    if not path.exists():
        raise ModelError(f"{path}: no such bundle (a folder or .zip from `edgeft package`)")
    raise BundleError(f"{path}: not a bundle (expected a folder or a zip from `edgeft package`)")


def _verify_dir(path: Path) -> dict[str, Any]:
    found: dict[str, Path] = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            raise BundleError(f"{path}/{rel}: a symlink; bundles hold plain files only")
        if p.is_dir():
            raise BundleError(f"{path}/{rel}: a sub-folder; bundles hold plain files only")
        if rel != MANIFEST:
            found[rel] = p
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not an edgeft bundle")
    manifest = _read_manifest((path / MANIFEST).read_bytes(), f"{path}/{MANIFEST}")
    _compare(str(path), manifest, found, lambda p: _sha256_stream(_file_chunks(p)))
    return manifest


def _verify_zip(path: Path) -> dict[str, Any]:
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path}: unreadable zip ({e})") from None
    with z:
        names = [i for i in z.infolist() if not i.is_dir()]
        roots = set()
        for info in z.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            # Zip-slip: an entry that an unzip would write outside the bundle's own folder.
            if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise BundleError(f"{path}: entry {info.filename!r} points outside the bundle; refusing it")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{path}: entry {info.filename!r} is a symlink; bundles hold plain files only")
            roots.add(parts[0] if len(parts) > 1 else "")
        if len(roots) != 1 or "" in roots:
            raise BundleError(f"{path}: expected every entry inside one top folder (as `edgeft package` writes)")
        root = roots.pop()
        found: dict[str, zipfile.ZipInfo] = {}
        for info in names:
            rel = info.filename[len(root) + 1 :]
            if "/" in rel:
                raise BundleError(f"{path}: entry {info.filename!r} is in a sub-folder; bundles hold plain files only")
            if rel != MANIFEST:
                found[rel] = info
        try:
            raw = z.read(f"{root}/{MANIFEST}")
        except KeyError:
            raise BundleError(f"{path}: no {root}/{MANIFEST}; not an edgeft bundle") from None
        manifest = _read_manifest(raw, f"{path}:{root}/{MANIFEST}")

        def digest(info: zipfile.ZipInfo) -> tuple[str, int]:
            try:
                with z.open(info) as f:
                    return _sha256_stream(iter(lambda: f.read(1 << 20), b""))
            except (zipfile.BadZipFile, OSError) as e:  # a CRC error is a changed byte too
                raise BundleError(f"{path}:{info.filename}: unreadable ({e})") from None

        _compare(f"{path}:{root}", manifest, found, digest)
    return manifest
