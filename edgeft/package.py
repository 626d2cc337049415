"""`edgeft package` and `edgeft verify`: a bundle an app can ship, and the check an app (or CI) runs on it.

A bundle is a folder, and the same folder as a zip beside it::

    cooking-q4/
      model.gguf                      the artifact (GGUF file, or an ONNX folder's files)
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      Modelfile                       formats Ollama loads (GGUF): `ollama create NAME -f Modelfile`
      manifest.json                   what the app needs to know, and every file's sha256

``manifest.json`` holds ``edgeft_bundle`` (format version), the target, format, runtime and quant
type, the context length, the stop tokens (text and id), the memory the app needs (peak RSS
*measured* while benchmarking, with the machine it was measured on), the fidelity and latency
figures of the build's report, the base model and its licence, and ``files``: name → {sha256, size}.

:func:`verify` accepts nothing it cannot account for: a file missing, a file added, a changed byte,
a symlink, or a zip entry that would land outside the bundle's folder. Zips are read by hand
(:mod:`edgeft.bundle_zip`), so that a verified zip unpacks to its manifest with every unzip tool
and a zip bomb costs a chunk of memory.

``package`` replaces only what it wrote itself: an empty folder, or a bundle folder and zip whose
manifest carries the ``edgeft_bundle`` marker and that hold no file the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from . import __version__
from .build_layout import MERGED, bench_dir
from .bundle_zip import (
    CHUNK,
    MANIFEST,
    MANIFEST_MAX_BYTES,
    MAX_FILE_BYTES,
    MAX_FILES,
    BundleError,
    display_name,
    entry_bytes,
    fold_name,
    looks_like_zip,
    name_problem,
    show,
    zip_files,
    zip_layout,
    zip_manifest_bytes,
)
from .config import BENCH_CONTEXT, load_config
from .errors import ConfigError, EdgeftError, ModelError, OutputError, first_line
from .files import write_atomic
from .formats import detect_artifact
from .models import BUILTIN_MODELS

BUNDLE_FORMAT = 1
# Tokenizer files an app's tokenizer library reads (the GGUF file also embeds its own copy).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Bounds on the build files package reads: a model config is kilobytes; the largest tokenizer.json
# of a published model is tens of megabytes; a README's front matter is at its top.
_JSON_MAX_BYTES = 16 << 20
_TOKENIZER_MAX_BYTES = 256 << 20
_README_MAX_BYTES = 1 << 20
_TEXT_MAX_CHARS = 200  # target, quant, licence: short labels an app shows

_TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # as target files are named (targets.py)


def _text_problem(value: Any, limit: int = _TEXT_MAX_CHARS) -> str | None:
    """Why ``value`` is not a short printable string (an app shows it; a terminal prints it), or None."""
    if not isinstance(value, str) or not value:
        return f"expected a non-empty string, got {show(value)}"
    if not value.isprintable():
        return f"control or unprintable characters in {show(value)}"
    if len(value) > limit:
        return f"{len(value)} characters (at most {limit})"
    return None


def _parse_json(raw: bytes, where: str, error: type[EdgeftError], unique_keys: bool = False) -> Any:
    """JSON from untrusted bytes: one line of error for invalid, too deeply nested or (for a
    manifest) ambiguous input, where two parsers could read different values for a repeated key."""

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"{where}: key {show(key)} appears twice (readers disagree on which counts)")
            obj[key] = value
        return obj

    try:
        return json.loads(raw, object_pairs_hook=no_repeats if unique_keys else None)
    except RecursionError:
        raise error(f"{where}: nested too deeply to be read") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past the digit limit
        raise error(f"{where}: not valid JSON ({first_line(e, 120)})") from None


def _open_regular(path: Path, what: str, error: type[EdgeftError], follow: bool = False) -> IO[bytes]:
    """``path`` opened for reading when it is a regular file: not a link (unless ``follow``: a path
    the user named), and never a FIFO or device, which would block or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        if not follow and os.path.islink(path):
            raise error(f"{path}: a symbolic link; {what} must be a plain file") from None
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise error(f"{path}: not a regular file; {what} must be a plain file")
    return f


def _read_capped(path: Path, limit: int, what: str, error: type[EdgeftError]) -> bytes:
    """The whole of the regular file ``path``, refused unread when it is over ``limit`` bytes."""
    with _open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: {size} bytes; {what} is at most {limit} bytes")
        raw = f.read(limit + 1)  # the file may have grown since the stat
    if len(raw) > limit:
        raise error(f"{path}: over {limit} bytes; {what} is at most {limit} bytes")
    return raw


def _sha256_stream(chunks: Iterator[bytes]) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# ------------------------------------------------------------------------------------------ package


def _read_build_json(path: Path, what: str, limit: int = _JSON_MAX_BYTES) -> dict[str, Any]:
    """A JSON object from a build folder (or a model folder copied into it), size-bounded."""
    if not path.exists() and not path.is_symlink():
        raise ModelError(f"{path}: missing ({what})")
    obj = _parse_json(_read_capped(path, limit, what, ModelError), str(path), ModelError)
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object ({what}), got {show(obj)}")
    return obj


def _field(obj: Any, dotted: str, where: str, check: Callable[[Any], bool], expected: str) -> Any:
    """``obj[a][b]…`` for ``dotted`` = "a.b…", refused in one line when absent or of the wrong kind."""
    value = obj
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ModelError(f"{where}: no {dotted}; re-run the build that wrote it")
        value = value[key]
    if not check(value):
        raise ModelError(f"{where}: {dotted}: expected {expected}, got {show(value)}")
    return value


def _is_figure(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 31


def _license(model: str | None) -> str:
    """The base model's licence: a builtin's from its card, a folder's from its README front matter."""
    if model is None:
        return "unknown (the build's config was not found)"
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].license
    readme = Path(model) / "README.md"
    try:
        fd = os.open(readme, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the command
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return "unknown (no README.md in the model folder)"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "unknown (the model folder's README.md is not a regular file)"
        # Front matter sits at the top of a model card; the rest of it can be any length.
        head = f.read(_README_MAX_BYTES)
    lines = head.decode("utf-8", errors="replace").splitlines()
    if lines and lines[0].strip() == "---":  # Hugging Face model cards keep metadata in YAML front matter
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, _, value = line.partition(":")
            if key.strip() == "license" and value.strip():
                value = value.strip().strip("'\"")
                problem = _text_problem(value)
                if problem:
                    raise ModelError(f"{readme}: license: {problem}; a bundle records a short printable licence")
                return value
    return "unknown (not stated in the model card)"


def _stop_tokens(merged: Path) -> list[dict[str, Any]]:
    """End-of-turn tokens the app must stop on: generation_config's eos ids, with their text."""
    gen_path = merged / "generation_config.json"
    gen = _read_build_json(gen_path, "generation config") if gen_path.is_file() else {}
    cfg = _read_build_json(merged / "config.json", "model config")
    where = gen_path if "eos_token_id" in gen else merged / "config.json"
    value = gen["eos_token_id"] if "eos_token_id" in gen else cfg.get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if len(ids) > 64 or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in ids):
        shown = show(value) if not isinstance(value, list) else f"[{', '.join(show(i) for i in value[:8])}…]"
        raise ModelError(f"{where}: eos_token_id: expected a token id or a list of up to 64, got {shown}")
    text: dict[int, str] = {}
    tok_path = merged / "tokenizer.json"
    if tok_path.is_file():
        tok = _read_build_json(tok_path, "tokenizer", _TOKENIZER_MAX_BYTES)
        added = tok.get("added_tokens", [])
        if not isinstance(added, list):
            raise ModelError(f"{tok_path}: added_tokens: expected a list, got {show(added)}")
        for n, t in enumerate(added):
            if not isinstance(t, dict):
                raise ModelError(f"{tok_path}: added_tokens[{n}]: expected an object, got {show(t)}")
            if not isinstance(t.get("id"), int) or isinstance(t.get("id"), bool):
                raise ModelError(f"{tok_path}: added_tokens[{n}].id: expected a token id, got {show(t.get('id'))}")
            if not isinstance(t.get("content"), str):
                raise ModelError(
                    f"{tok_path}: added_tokens[{n}].content: expected the token's text, got {show(t.get('content'))}"
                )
            text[t["id"]] = t["content"]
    stops = [{"id": i, "text": text.get(i)} for i in ids]
    for s in stops:
        # The text goes into manifest.json (JSON-escaped) and the Modelfile (checked there); a lone
        # surrogate or a megabyte of text has no place in either.
        if s["text"] is not None and (len(s["text"]) > 1000 or not _encodable(s["text"])):
            raise ModelError(f"{tok_path}: stop token {s['id']}: text {show(s['text'])} is not a usable stop string")
    return stops


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _modelfile_string(text: str, where: str, token: int) -> str:
    """``text`` as one Ollama Modelfile argument that reads back as exactly ``text``."""
    # Ollama's Modelfile parser has no escapes. A value ends at the first newline after its closing
    # quote; a value opened with three double quotes ends with the three before that newline (the
    # parser keeps what lies between the first and last three); unprintable characters are dropped.
    # So a printable text without quotes is written in plain quotes, one with quotes in triple
    # quotes, and a newline, carriage return or control character, which cannot be written, is
    # refused: a token from an untrusted tokenizer can never start a directive of its own.
    if not text or not text.isprintable():
        raise ModelError(
            f"{where}: stop token {token}: its text {show(text)} holds a newline or control character, "
            "which an Ollama Modelfile cannot hold; fix the tokenizer's added_tokens"
        )
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def _modelfile(artifact_file: str, stops: list[dict[str, Any]], context: int, where: str) -> str:
    # Ollama reads the chat template from the GGUF's metadata; the stops and context are ours.
    lines = [
        "# Ollama: ollama create NAME -f Modelfile",
        f"FROM ./{artifact_file}",
        f"PARAMETER num_ctx {int(context)}",
    ]
    lines += [f"PARAMETER stop {_modelfile_string(s['text'], where, s['id'])}" for s in stops if s["text"]]
    return "\n".join(lines) + "\n"


def _build_model_name(build_dir: Path) -> str | None:
    """The `model =` of the config the build ran with, when that config is still where it was."""
    try:
        manifest = _read_build_json(build_dir / "manifest.json", "build manifest")
    except ModelError:
        return None
    params = manifest.get("params")
    config = params.get("config") if isinstance(params, dict) else None
    if not isinstance(config, str) or not config or "\0" in config:
        return None
    for candidate in (Path(config), build_dir.parent / config):
        if candidate.is_file():
            try:
                return str(load_config(candidate).model)
            except EdgeftError:
                return None
    return None


def _copy_in(src: Path, dest: Path) -> tuple[str, int]:
    """Copy the regular file ``src`` to the new file ``dest``; its (sha256, size).

    A link in the build folder is refused, not followed: a build folder handed over by someone else
    must not copy a file from elsewhere on this machine into a bundle the user then ships.
    """
    h, n = hashlib.sha256(), 0
    with _open_regular(src, "a bundled file", ModelError) as fin, open(dest, "xb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def package(build_dir: Path, target: str, out: Path, model: str | None = None) -> dict[str, Any]:
    """Write the bundle folder ``out`` and ``out.zip`` for ``target`` of the build in ``build_dir``."""
    build_dir, out = Path(build_dir), Path(out)
    _check_request(build_dir, target, out)
    fmt, artifact = detect_artifact(build_dir / target, f"--target {target}:")
    bench_path, bench = _bench_results(build_dir, target)
    merged = build_dir / MERGED
    if not (merged / "config.json").is_file():
        raise ConfigError(f"--build {build_dir}: no merged model (merged/config.json) to take the tokenizer from")

    model_cfg = _read_build_json(merged / "config.json", "model config")
    sources = _bundle_sources(fmt, artifact, merged)
    context, context_where = fmt.context_length(artifact, _read_build_json)
    context_where = context_where or merged / "config.json"
    context = context or model_cfg.get("max_position_embeddings") or 2048
    if not _is_count(context):
        raise ModelError(f"{context_where}: context length: expected a positive whole number, got {show(context)}")
    _check_names(artifact, sources)
    stops = _stop_tokens(merged)
    model = model or _build_model_name(build_dir)
    if model is not None and (problem := _text_problem(model, 4096)):
        raise ConfigError(f"base model {show(model)}: {problem}")
    manifest = _bundle_manifest(target, fmt, bench, str(bench_path), context, stops, model)
    modelfile = (
        _modelfile(fmt.ARTIFACT_FILE, stops, context, str(merged / "tokenizer.json")) if fmt.OLLAMA_MODELFILE else None
    )
    _write_bundle(out, sources, manifest, modelfile)
    return manifest


def _check_request(build_dir: Path, target: str, out: Path) -> None:
    if not _TARGET_NAME.fullmatch(target) or len(target) > _TEXT_MAX_CHARS:
        raise ConfigError(f"--target {show(target)}: not a target name (lower-case letters, digits, '.', '_', '-')")
    if not build_dir.is_dir():
        raise ConfigError(f"--build {build_dir}: no such build folder")
    if not (build_dir / target).is_dir():
        raise ConfigError(
            f"--target {target}: {build_dir / target} not found; run `edgeft build --target {target}` first"
        )
    _check_bundle_out(out)


def _bench_results(build_dir: Path, target: str) -> tuple[Path, dict[str, Any]]:
    """The target's bench stage manifest and its results, which the bundle's figures come from."""
    bench_path = bench_dir(build_dir, target) / "manifest.json"
    bench = _read_build_json(bench_path, "bench results").get("results") if bench_path.is_file() else None
    if not bench:
        raise ConfigError(
            f"--target {target}: not benchmarked in {build_dir}; run `edgeft build --target {target}` first"
        )
    if not isinstance(bench, dict):
        raise ModelError(f"{bench_path}: results: expected an object, got {show(bench)}")
    return bench_path, bench


def _bundle_sources(fmt: Any, artifact: Path, merged: Path) -> dict[str, Path]:
    """Name in the bundle → file: a folder artifact's files, or a one-file artifact under its
    format's name beside the merged model's tokenizer files."""
    if fmt.ARTIFACT_FILE is None:
        # Sub-folders are not part of a genai folder; links and special files are refused by _copy_in.
        return {
            p.name: p for p in sorted(artifact.iterdir()) if p.name != MANIFEST and (p.is_symlink() or not p.is_dir())
        }
    sources = {fmt.ARTIFACT_FILE: artifact}
    return sources | {n: merged / n for n in TOKENIZER_FILES if (merged / n).is_file()}


def _check_names(artifact: Path, sources: dict[str, Path]) -> None:
    """Refuse what would not unpack as itself on every app's platform (see bundle_zip)."""
    if len(sources) > MAX_FILES - 2:
        raise ModelError(f"{artifact}: {len(sources)} files; a bundle holds at most {MAX_FILES}")
    seen = {fold_name(MANIFEST): MANIFEST, fold_name("Modelfile"): "Modelfile"}
    for name in sources:
        problem = name_problem(name)
        if problem:
            raise ModelError(f"{artifact}/{display_name(name)}: cannot go into a bundle ({problem})")
        if seen.setdefault(fold_name(name), name) != name:
            raise ModelError(
                f"{artifact}/{display_name(name)}: differs from {seen[fold_name(name)]} only in case or Unicode form; "
                "one would overwrite the other when the bundle is unpacked on macOS or Windows"
            )


def _bundle_manifest(
    target: str,
    fmt: Any,
    bench: dict[str, Any],
    where: str,
    context: int,
    stops: list[dict[str, Any]],
    model: str | None,
) -> dict[str, Any]:
    """manifest.json's content (its ``files`` filled in as they are copied); every figure is checked
    against the bench results at ``where``."""
    perf = _field(bench, "performance", where, lambda v: isinstance(v, dict), "an object")
    fidelity = _field(bench, "fidelity", where, lambda v: isinstance(v, dict), "an object")
    figure = "a number or null"
    return {
        "edgeft_bundle": BUNDLE_FORMAT,
        "edgeft_version": __version__,
        "target": target,
        "format": fmt.NAME,
        "runtime": fmt.RUNTIME,
        "quant": _field(bench, "artifact.file_type", where, lambda v: _text_problem(v) is None, "a short name"),
        "context_length": context,
        "stop_tokens": stops,
        "memory": {
            # Measured, not projected: the runtime's peak RSS while benchmarking (bench context).
            "min_ram_bytes": _field(perf, "peak_rss_bytes", where, _is_figure, figure),
            "measured_context_tokens": BENCH_CONTEXT if fmt.KV_CACHE_AT_OPEN else None,
            "weights_bytes": _field(bench, "artifact.size_bytes", where, _is_figure, figure),
            "measured_on": perf.get("machine"),
        },
        "fidelity": {
            k: _field(fidelity, k, where, _is_figure, figure) if k in fidelity else None
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
        "latency": {
            k: _field(perf, f"latency.{k}.median", where, _is_figure, figure)
            for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms")
        }
        | {"threads": _field(perf, "latency.threads", where, _is_figure, figure), "measured_on": perf.get("machine")},
        "base_model": model,
        "license": _license(model),
        "files": {},
    }


def _write_bundle(out: Path, sources: dict[str, Path], manifest: dict[str, Any], modelfile: str | None) -> None:
    """Build the folder and the zip under fresh names beside ``out``, then rename them into place.

    The temporary names come from mkdtemp/mkstemp (created exclusively, never an existing entry), so
    nothing planted beside ``out`` is removed, followed or written through.
    """
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create {parent} ({e.strerror or e})") from None
    if parent.is_symlink():  # checked again: mkdir may have met a link planted since the first check
        raise OutputError(f"--out {out}: {parent} is a symbolic link; edgeft writes only into real folders")
    tmp: Path | None = None
    zip_tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the bundle from the app's build and CI
        for name, src in sources.items():
            digest, size = _copy_in(src, tmp / name)
            os.chmod(tmp / name, 0o644)
            manifest["files"][name] = {"sha256": digest, "size": size}
        if modelfile is not None:
            data = modelfile.encode()
            write_atomic(tmp / "Modelfile", data)
            manifest["files"]["Modelfile"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        manifest["files"] = dict(sorted(manifest["files"].items()))
        try:
            text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        except RecursionError:
            raise ModelError("the bench results' machine description is nested too deeply to record") from None
        write_atomic(tmp / MANIFEST, text)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".zip.tmp", dir=parent)
        zip_tmp = Path(name)
        with os.fdopen(fd, "wb") as fh:
            # Stored, not deflated: weights do not compress, and an app can read a stored entry in place.
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as z:
                for p in sorted(tmp.iterdir()):
                    z.write(p, f"{out.name}/{p.name}")
        os.chmod(zip_tmp, 0o644)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(tmp, out)
        tmp = None
        os.replace(zip_tmp, out.with_name(out.name + ".zip"))
        zip_tmp = None
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write the bundle ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if zip_tmp is not None:
            zip_tmp.unlink(missing_ok=True)


_REPLACES_ONLY = "edgeft replaces only an empty folder or a bundle exactly as it wrote it; choose another --out"


def _check_bundle_out(out: Path) -> None:
    """Replace only an earlier bundle; never a folder or zip of the user's, nor a file added to one."""
    name = out.name
    problem = "an empty or dot name" if out.name in ("", ".", "..") else name_problem(name)
    if problem:
        raise ConfigError(f"--out {show(str(out))}: the folder's name cannot name a bundle ({problem})")
    if out.parent.is_symlink():
        raise OutputError(f"--out {out}: {out.parent} is a symbolic link; edgeft writes only into real folders")
    z = out.with_name(name + ".zip")
    for path in (out, z):
        if path.is_symlink():
            raise OutputError(f"--out {out}: {path} is a symbolic link; edgeft replaces only a bundle it wrote")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {out}: a file, not an edgeft bundle; {_REPLACES_ONLY}")
        problem = _bundle_dir_problem(out)
        if problem:
            raise OutputError(f"--out {out}: {problem}; {_REPLACES_ONLY}")
    if z.exists():
        if not z.is_file():
            raise OutputError(f"--out {out}: {z} is not a file, not an edgeft bundle; {_REPLACES_ONLY}")
        problem = _bundle_zip_problem(z, name)
        if problem:
            raise OutputError(f"--out {out}: {z}: {problem}; {_REPLACES_ONLY}")


def _bundle_dir_problem(path: Path) -> str | None:
    """Why the folder ``path`` is not an empty folder or a bundle exactly as edgeft wrote it, or None."""
    try:
        entries = _list_bundle_dir(path)
        if not entries:
            return None
        if MANIFEST not in entries:
            return f"not an edgeft bundle (it holds {display_name(sorted(entries)[0])} and no {MANIFEST})"
        manifest = _check_manifest(
            _read_capped(path / MANIFEST, MANIFEST_MAX_BYTES, "a bundle manifest", BundleError), f"{MANIFEST}"
        )
    except BundleError as e:
        return f"not an edgeft bundle ({str(e).removeprefix(f'{path}: ').removeprefix(f'{path}/')})"
    files = manifest["files"]
    for name, st in sorted(entries.items()):
        if name == MANIFEST:
            continue
        if name not in files:
            return f"{display_name(name)} is not part of the bundle (added since `edgeft package` wrote it)"
        if st.st_size != files[name]["size"]:
            return f"{display_name(name)} was changed since `edgeft package` wrote it"
    return None


def _bundle_zip_problem(path: Path, root: str) -> str | None:
    """Why ``path`` is not an edgeft bundle zip of the folder ``root``, or None.

    Recognised by content at the place edgeft writes it (``ROOT/manifest.json`` carrying the
    marker), and only when every entry is one its manifest lists: a zip the user made, or added a
    file to, is theirs.
    """
    where = str(path)
    try:
        with _open_regular(path, "a bundle zip", BundleError) as f:
            entries = zip_layout(f, where)
            got_root, files = zip_files(entries, where)
            if got_root != root:
                return f"not an edgeft bundle (its entries are in {display_name(got_root)}/, not {root}/)"
            entry = files.pop(MANIFEST, None)
            if entry is None:
                return f"not an edgeft bundle (no {root}/{MANIFEST})"
            manifest = _check_manifest(zip_manifest_bytes(f, entry, where), f"{root}/{MANIFEST}")
    except BundleError as e:
        return f"not an edgeft bundle ({str(e).removeprefix(f'{where}: ').removeprefix(f'{where}:')})"
    for name, entry in sorted(files.items()):
        if name not in manifest["files"]:
            return f"{root}/{display_name(name)} is not part of the bundle (added since `edgeft package` wrote it)"
        if entry.usize != manifest["files"][name]["size"]:
            return f"{root}/{display_name(name)} was changed since `edgeft package` wrote it"
    return None


# ------------------------------------------------------------------------------------------- verify


def _check_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest in ``raw``, refused unless every field verify relies on or prints is sound."""
    if len(raw) > MANIFEST_MAX_BYTES:
        raise BundleError(f"{where}: {len(raw)} bytes; a manifest is at most {MANIFEST_MAX_BYTES} bytes")
    manifest = _parse_json(raw, where, BundleError, unique_keys=True)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    marker = manifest.get("edgeft_bundle") if isinstance(manifest, dict) else None
    # type(): json reads `true` as True, and True == 1.
    if type(marker) is not int or marker != BUNDLE_FORMAT or not isinstance(files, dict):
        raise BundleError(f"{where}: not an edgeft bundle manifest (expected edgeft_bundle {BUNDLE_FORMAT} and files)")
    for key in ("target", "format", "quant"):  # `edgeft verify` prints them
        problem = _text_problem(manifest.get(key))
        if problem:
            raise BundleError(f"{where}: {key}: {problem}")
    if len(files) > MAX_FILES:
        raise BundleError(f"{where}: files: {len(files)} entries; a bundle holds at most {MAX_FILES}")
    seen = {fold_name(MANIFEST): MANIFEST}
    for name, entry in files.items():
        problem = "the manifest itself" if name == MANIFEST else name_problem(name)
        if problem:
            raise BundleError(f"{where}: files: {show(name)}: a bundle lists plain file names only ({problem})")
        if seen.setdefault(fold_name(name), name) != name:
            raise BundleError(
                f"{where}: files: {display_name(name)} and {display_name(seen[fold_name(name)])} differ only in case or Unicode form "
                "(one overwrites the other when unpacked on macOS or Windows)"
            )
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise BundleError(f"{where}: files.{display_name(name)}: expected {{sha256, size}} with a hex sha256")
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise BundleError(
                f"{where}: files.{display_name(name)}: size: expected a whole number of bytes up to {MAX_FILE_BYTES}, "
                f"got {show(size)}"
            )
    return manifest


def _compare(where: str, manifest: dict[str, Any], sizes: dict[str, int], digest: Callable[[str], tuple[str, int]]):
    """Names, then sizes (nothing is read from a file whose size is already wrong), then contents."""
    expected = manifest["files"]
    extra, missing = sorted(set(sizes) - set(expected)), sorted(set(expected) - set(sizes))
    if missing:
        raise BundleError(f"{where}: {display_name(missing[0])} is missing (listed in {MANIFEST})")
    if extra:
        raise BundleError(f"{where}: {display_name(extra[0])} is not listed in {MANIFEST} (an extra file)")
    for name in sorted(expected):
        if sizes[name] != expected[name]["size"]:
            raise BundleError(
                f"{where}/{name}: contents changed ({sizes[name]} bytes; manifest says {expected[name]['size']} bytes)"
            )
    for name in sorted(expected):
        sha, size = digest(name)
        want = expected[name]
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
    if path.is_file() and looks_like_zip(path):
        return _verify_zip(path)
    if not path.exists():
        raise ModelError(f"{path}: no such bundle (a folder or .zip from `edgeft package`)")
    raise BundleError(f"{path}: not a bundle (expected a folder or a zip from `edgeft package`)")


def _list_bundle_dir(path: Path) -> dict[str, os.stat_result]:
    """The plain files of a bundle folder by name; a link, sub-folder or special file is refused, and
    so is a folder with more entries than a bundle holds (without listing all of them)."""
    found: dict[str, os.stat_result] = {}
    try:
        with os.scandir(path) as it:
            for entry in it:
                if len(found) > MAX_FILES:
                    raise BundleError(f"{path}: over {MAX_FILES} entries; a bundle holds at most {MAX_FILES}")
                name = display_name(entry.name)
                if entry.is_symlink():
                    raise BundleError(f"{path}/{name}: a symlink; bundles hold plain files only")
                if entry.is_dir(follow_symlinks=False):
                    raise BundleError(f"{path}/{name}: a sub-folder; bundles hold plain files only")
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise BundleError(f"{path}/{name}: not a regular file; bundles hold plain files only")
                found[entry.name] = st
    except OSError as e:
        raise BundleError(f"{path}: cannot list ({e.strerror or e})") from None
    return found


def _verify_dir(path: Path) -> dict[str, Any]:
    entries = _list_bundle_dir(path)
    if MANIFEST not in entries:
        raise BundleError(f"{path}: no {MANIFEST}; not an edgeft bundle")
    raw = _read_capped(path / MANIFEST, MANIFEST_MAX_BYTES, "a bundle manifest", BundleError)
    manifest = _check_manifest(raw, f"{path}/{MANIFEST}")
    sizes = {name: st.st_size for name, st in entries.items() if name != MANIFEST}

    def digest(name: str) -> tuple[str, int]:
        # Read one byte past the manifest's size at most: a file that grew is changed, and no more of
        # it is needed to say so.
        left = manifest["files"][name]["size"] + 1
        with _open_regular(path / name, "a bundled file", BundleError) as f:

            def chunks() -> Iterator[bytes]:
                nonlocal left
                while left > 0 and (chunk := f.read(min(CHUNK, left))):
                    left -= len(chunk)
                    yield chunk

            return _sha256_stream(chunks())

    _compare(str(path), manifest, sizes, digest)
    return manifest


def _verify_zip(path: Path) -> dict[str, Any]:
    where = str(path)
    with _open_regular(path, "a bundle zip", BundleError, follow=True) as f:
        entries = zip_layout(f, where)
        root, files = zip_files(entries, where)
        entry = files.pop(MANIFEST, None)
        if entry is None:
            raise BundleError(f"{path}: no {root}/{MANIFEST}; not an edgeft bundle")
        manifest = _check_manifest(zip_manifest_bytes(f, entry, where), f"{path}:{root}/{MANIFEST}")
        sizes = {name: e.usize for name, e in files.items()}
        _compare(f"{path}:{root}", manifest, sizes, lambda name: _sha256_stream(entry_bytes(f, files[name], where)))
    return manifest
