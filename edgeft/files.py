"""Writing files into folders that other people (a device, a bundle, a user) may have put links in.

Every small file edgeft writes beside an artifact (reports, manifests, device runs) goes through
:func:`write_atomic`: the bytes go to a fresh, exclusively created name in the target's own folder
(never a fixed ``.NAME.tmp`` an attacker could have planted as a symlink), and ``os.replace`` then
renames that file over the target. A rename replaces a symlink at the target rather than writing
through it, so a link left at ``report.json`` is dropped, never followed.

:func:`data_dir` finds the data folders edgeft ships (``targets``, ``calibration``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from .errors import OutputError

_HASH_CHUNK = 1 << 20


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all, without following a link at ``path``.

    The folder itself must be a real folder: a symlinked parent would send the file elsewhere.
    """
    path = Path(path)
    if path.parent.is_symlink():
        raise OutputError(f"{path.parent}: is a symbolic link; edgeft writes only into real folders")
    raw = data.encode() if isinstance(data, str) else data
    # mkstemp opens with O_CREAT | O_EXCL: it never opens an existing file or a link.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports from the rest of a CI job
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG at ``path``, written like :func:`write_atomic` (savefig to a path
    would open it and follow a link there)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_atomic(path, buf.getvalue())


def data_dir(name: str) -> Path:
    """A data folder the repository keeps at its root (``targets``, ``calibration``): there in a
    checkout or an editable install, else the copy a wheel carries in ``edgeft/_data/`` (setup.py)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / name
    return checkout if checkout.is_dir() else package / "_data" / name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read a block at a time (artifacts may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
