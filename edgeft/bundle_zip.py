"""Bundle zips read by hand, so that what ``edgeft verify`` accepts unpacks the same with every tool.

zipfile trusts the central directory alone; a streaming unpacker (``jar x``) trusts the local
headers. Here the local headers are walked from byte 0 and must be exactly the central directory's
entries, back to back, with nothing before, between or after them; names must unpack alike on every
file system (no duplicates by case or Unicode form, no separators or dot names); every read is
bounded by the size the entry declares, so a zip bomb costs a chunk of memory, not what it inflates
to. Also the name and text checks :mod:`edgeft.package` applies to a bundle's folder.
"""

from __future__ import annotations

import os
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

from .errors import EdgeftError
from .untrusted import show

MANIFEST = "manifest.json"
# What a bundle may hold. A manifest lists a handful of files in a few kilobytes; these bounds are
# far above any real bundle and far below what would hurt the machine that checks one.
MANIFEST_MAX_BYTES = 1 << 20
MAX_FILES = 1000
MAX_FILE_BYTES = 1 << 40
_CENTRAL_DIR_MAX_BYTES = 4 << 20
CHUNK = 1 << 20


class BundleError(EdgeftError):
    """A bundle that does not match its manifest (exit 2: the input is at fault)."""


def display_name(name: str) -> str:
    """A file name for a message: as is when it is printable, else escaped."""
    return name if name.isprintable() and len(name) <= 255 else show(name)


def fold_name(name: str) -> str:
    """The key under which two names land on the same file on macOS or Windows (case-insensitive,
    Unicode-normalising file systems)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file of a bundle (a plain name every OS unpacks the same), or None."""
    if name in ("", ".", ".."):
        return "an empty or dot name"
    if not name.isprintable():  # also refuses lone surrogates (a non-UTF-8 name)
        return "control or unprintable characters"
    if "/" in name or "\\" in name:
        return "a path separator"
    if ":" in name:
        return "a colon (a drive or stream on Windows)"
    if name.endswith((".", " ")):
        return "a trailing dot or space (Windows drops it)"
    if len(name.encode()) > 255:
        return "longer than 255 bytes"
    return None


# --------------------------------------------------------------------------------- zip, read by hand

_LOCAL_SIG, _CENTRAL_SIG, _EOCD_SIG = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
_Z64_EOCD_SIG, _Z64_LOCATOR_SIG, _DESCRIPTOR_SIG = b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08"
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name/extra lengths
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
_Z64_LOCATOR = struct.Struct("<4sIQI")
_Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_FLAG_ENCRYPTED, _FLAG_DESCRIPTOR, _FLAG_STRONG, _FLAG_UTF8, _FLAG_MASKED = 0x1, 0x8, 0x40, 0x800, 0x2000
# Deflate's speed hints (bits 1-2), a data descriptor, UTF-8 names: what zip tools set on plain files.
_FLAGS_ALLOWED = 0x2 | 0x4 | _FLAG_DESCRIPTOR | _FLAG_UTF8
_STORED, _DEFLATED = 0, 8
_METHODS = {1: "shrink", 6: "implode", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd", 95: "xz", 99: "AES"}
_U32, _U16 = 0xFFFFFFFF, 0xFFFF


@dataclass
class ZipEntry:
    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int  # of its local header
    external_attr: int
    data_offset: int = 0  # set by the walk of the local headers


def _extra_fields(extra: bytes, where: str, name: str) -> dict[int, bytes]:
    """A header's extra field as {id: data}; a malformed or repeated field is refused (readers would
    disagree on what it says)."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise BundleError(f"{where}: entry {display_name(name)}: malformed extra field")
        tag, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra) or tag in fields:
            raise BundleError(f"{where}: entry {display_name(name)}: malformed extra field")
        fields[tag] = extra[pos + 4 : pos + 4 + size]
        pos += 4 + size
    unicode_path = fields.get(0x7075)
    if unicode_path is not None:
        # Info-ZIP's Unicode path: some unzippers name the file by it instead of the header's name.
        try:
            alias = unicode_path[5:].decode("utf-8") if unicode_path[:1] == b"\x01" else None
        except UnicodeDecodeError:
            alias = None
        if alias != name:
            raise BundleError(f"{where}: entry {display_name(name)}: its Unicode-path field names another file")
    return fields


def _zip64_values(fields: dict[int, bytes], wanted: int, where: str, name: str) -> list[int]:
    """The first ``wanted`` 8-byte values of the zip64 extra field."""
    data = fields.get(0x0001, b"")
    if len(data) < 8 * wanted:
        raise BundleError(f"{where}: entry {display_name(name)}: zip64 sizes missing from its extra field")
    return list(struct.unpack_from(f"<{wanted}Q", data))


def _entry_name(raw: bytes, flags: int, where: str) -> str:
    if flags & _FLAG_UTF8:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{where}: entry name {show(raw)} is marked UTF-8 but is not") from None
    if not raw.isascii():
        # Without the UTF-8 flag, unzip tools decode a name by code page or locale: each would
        # name the file differently.
        raise BundleError(f"{where}: entry name {show(raw)} is neither ASCII nor marked UTF-8")
    return raw.decode("ascii")


def _zip_end(f: IO[bytes], size: int, where: str) -> tuple[int, int, int]:
    """(entry count, central directory offset, where the central directory must end), from the end
    record, which must be the file's last 22 bytes (no comment, nothing appended)."""
    if size < _EOCD.size:
        raise BundleError(f"{where}: {size} bytes; too short to be a zip (truncated?)")
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack(f.read(_EOCD.size))
    if sig != _EOCD_SIG or comment:
        raise BundleError(
            f"{where}: does not end with a zip end record (truncated, or a comment or bytes after it); "
            "a bundle zip ends with its central directory"
        )
    end = size - _EOCD.size
    tail = b""
    if end >= _Z64_LOCATOR.size:
        f.seek(end - _Z64_LOCATOR.size)
        tail = f.read(_Z64_LOCATOR.size)
    if tail[:4] == _Z64_LOCATOR_SIG:
        _, loc_disk, record, disks = _Z64_LOCATOR.unpack(tail)
        end = end - _Z64_LOCATOR.size - _Z64_EOCD.size
        if loc_disk != 0 or disks != 1:
            raise BundleError(f"{where}: a multi-part zip; a bundle is one file")
        if record != end or end < 0:
            raise BundleError(f"{where}: its zip64 end record is not where its locator says")
        f.seek(record)
        sig64, rest, _, _, disk64, cd_disk64, n_disk64, n_total64, cd_size64, cd_offset64 = _Z64_EOCD.unpack(
            f.read(_Z64_EOCD.size)
        )
        if sig64 != _Z64_EOCD_SIG or rest != _Z64_EOCD.size - 12:
            raise BundleError(f"{where}: damaged zip64 end record")
        if disk64 or cd_disk64 or n_disk64 != n_total64:
            raise BundleError(f"{where}: a multi-part zip; a bundle is one file")
        # A reader that ignores zip64 uses the classic record: it must say the same or "see zip64".
        for classic, wide, sentinel in (
            (n_total, n_total64, _U16),
            (cd_size, cd_size64, _U32),
            (cd_offset, cd_offset64, _U32),
        ):
            if classic not in (wide, sentinel):
                raise BundleError(f"{where}: its zip64 and classic end records disagree")
        if n_disk not in (n_total, _U16) or disk not in (0, _U16) or cd_disk not in (0, _U16):
            raise BundleError(f"{where}: a multi-part zip; a bundle is one file")
        n_total, cd_size, cd_offset = n_total64, cd_size64, cd_offset64
    elif disk or cd_disk or n_disk != n_total:
        raise BundleError(f"{where}: a multi-part zip; a bundle is one file")
    if n_total > MAX_FILES + 1:  # the files, and the top folder's own entry
        raise BundleError(f"{where}: {n_total} entries; a bundle holds at most {MAX_FILES} files")
    if cd_size > _CENTRAL_DIR_MAX_BYTES:
        raise BundleError(f"{where}: a {cd_size}-byte central directory; far more than a bundle's")
    if cd_offset + cd_size != end:
        raise BundleError(
            f"{where}: its central directory does not end where its end record starts "
            "(bytes added before or inside the zip, or a damaged zip)"
        )
    return n_total, cd_offset, end


def zip_layout(f: IO[bytes], where: str) -> list[ZipEntry]:
    """The entries of the zip open in ``f``, in central directory order, once its local headers have
    been walked from byte 0 and found to be exactly those entries, back to back, up to the central
    directory: a hidden entry, a gap, an overlap or a header that says otherwise is refused."""
    size = os.fstat(f.fileno()).st_size
    n_total, cd_offset, cd_end = _zip_end(f, size, where)
    f.seek(cd_offset)
    entries = _central_entries(f.read(cd_end - cd_offset), n_total, where)
    at = 0
    for e in sorted(entries, key=lambda e: e.offset):
        at = _local_entry_end(f, e, at, cd_offset, where)
    if at != cd_offset:
        raise BundleError(
            f"{where}: {cd_offset - at} bytes between the last entry and the central directory "
            "(data no entry accounts for)"
        )
    return entries


def _central_entries(cd: bytes, n_total: int, where: str) -> list[ZipEntry]:
    """The central directory's ``n_total`` entries, each checked on its own; nothing may follow them."""
    entries: list[ZipEntry] = []
    pos = 0
    for _ in range(n_total):
        if pos + _CENTRAL.size > len(cd) or cd[pos : pos + 4] != _CENTRAL_SIG:
            raise BundleError(f"{where}: damaged central directory (entry {len(entries) + 1} of {n_total})")
        (_, _, _, flags, method, _, _, crc, csize, usize, n_len, e_len, c_len, disk, _, attr, offset) = (
            _CENTRAL.unpack_from(cd, pos)
        )
        pos += _CENTRAL.size
        raw_name, extra = cd[pos : pos + n_len], cd[pos + n_len : pos + n_len + e_len]
        pos += n_len + e_len + c_len
        if pos > len(cd):
            raise BundleError(f"{where}: damaged central directory (entry {len(entries) + 1} of {n_total})")
        name = _entry_name(raw_name, flags, where)
        fields = _extra_fields(extra, where, name)
        wide = iter(_zip64_values(fields, [usize, csize, offset].count(_U32), where, name))
        usize, csize, offset = (next(wide) if v == _U32 else v for v in (usize, csize, offset))
        if c_len:
            raise BundleError(f"{where}: entry {display_name(name)} has a comment; a bundle zip has none")
        if disk:
            raise BundleError(f"{where}: a multi-part zip; a bundle is one file")
        _check_entry_kind(flags, method, csize, usize, where, name)
        entries.append(ZipEntry(name, raw_name, flags, method, crc, csize, usize, offset, attr))
    if pos != len(cd):
        raise BundleError(f"{where}: {len(cd) - pos} bytes after the last central directory entry")
    return entries


def _local_entry_end(f: IO[bytes], e: ZipEntry, at: int, cd_offset: int, where: str) -> int:
    """Check that entry ``e``'s local header starts at ``at`` (the previous entry's end) and agrees with
    the central directory; sets ``e.data_offset`` and returns where the entry's data (and descriptor) end."""
    if e.offset > at:
        raise BundleError(
            f"{where}: {e.offset - at} bytes before entry {display_name(e.name)} that no entry accounts for "
            "(a hidden entry a streaming unzip would extract, or a damaged zip)"
        )
    if e.offset < at:
        raise BundleError(f"{where}: entry {display_name(e.name)} overlaps the entry before it")
    f.seek(at)
    head = f.read(_LOCAL.size)
    if len(head) < _LOCAL.size or head[:4] != _LOCAL_SIG:
        raise BundleError(f"{where}: no local header where the central directory puts {display_name(e.name)}")
    _, _, flags, method, _, _, crc, csize, usize, n_len, e_len = _LOCAL.unpack(head)
    raw_name, extra = f.read(n_len), f.read(e_len)
    if raw_name != e.raw_name:
        shown = show(raw_name.decode("utf-8", errors="replace"))
        raise BundleError(
            f"{where}: entry {display_name(e.name)} is named {shown} in its local header (a streaming unzip would "
            "write that name)"
        )
    if flags != e.flags or method != e.method:
        raise BundleError(f"{where}: entry {display_name(e.name)}: its local header and central directory disagree")
    fields = _extra_fields(extra, where, e.name)
    has_zip64 = 0x0001 in fields
    if _U32 in (usize, csize):
        usize, csize = _zip64_values(fields, 2, where, e.name)
    local = (crc, csize, usize)
    # With a data descriptor the local header may hold zeros; the descriptor then must match.
    if local != (e.crc, e.csize, e.usize) and not (e.flags & _FLAG_DESCRIPTOR and local == (0, 0, 0)):
        raise BundleError(
            f"{where}: entry {display_name(e.name)}: its local header and central directory disagree on its size"
        )
    e.data_offset = at + _LOCAL.size + n_len + e_len
    at = e.data_offset + e.csize
    if e.flags & _FLAG_DESCRIPTOR:
        at += _descriptor_length(f, at, e, has_zip64, where)
    if at > cd_offset:
        raise BundleError(f"{where}: entry {display_name(e.name)} runs into the central directory (truncated?)")
    return at


def _check_entry_kind(flags: int, method: int, csize: int, usize: int, where: str, name: str) -> None:
    if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG | _FLAG_MASKED):
        raise BundleError(
            f"{where}: entry {display_name(name)} is encrypted; a bundle's files are readable as they are"
        )
    if flags & ~_FLAGS_ALLOWED:
        raise BundleError(
            f"{where}: entry {display_name(name)} sets zip flags {flags:#06x}, which a bundle does not use"
        )
    if method not in (_STORED, _DEFLATED):
        kind = _METHODS.get(method, "unknown")
        raise BundleError(
            f"{where}: entry {display_name(name)}: compression method {method} ({kind}); a bundle is stored or deflated"
        )
    if method == _STORED and csize != usize:
        raise BundleError(f"{where}: entry {display_name(name)} is stored but its two sizes differ")
    if method == _STORED and flags & _FLAG_DESCRIPTOR:
        # A streaming unzip cannot tell where a stored entry of unknown size ends.
        raise BundleError(f"{where}: entry {display_name(name)} is stored with a data descriptor; its end is ambiguous")
    if usize > MAX_FILE_BYTES:
        raise BundleError(f"{where}: entry {display_name(name)} declares {usize} bytes; over {MAX_FILE_BYTES}")


def _descriptor_length(f: IO[bytes], at: int, e: ZipEntry, zip64: bool, where: str) -> int:
    """Length of the data descriptor at ``at``, which must repeat the central directory's CRC and sizes."""
    f.seek(at)
    raw = f.read(24)
    width = "Q" if zip64 else "I"
    body = struct.Struct(f"<I{width}{width}")
    for skip in (4, 0) if raw[:4] == _DESCRIPTOR_SIG else (0,):
        if len(raw) >= skip + body.size and body.unpack_from(raw, skip) == (e.crc, e.csize, e.usize):
            return skip + body.size
    raise BundleError(
        f"{where}: entry {display_name(e.name)}: its data descriptor does not match the central directory"
    )


def zip_files(entries: list[ZipEntry], where: str) -> tuple[str, dict[str, ZipEntry]]:
    """The bundle's top folder and its files by name; what an unzip would write anywhere else, or
    as a link, a sub-folder or a second copy of a name, is refused."""
    roots: set[str] = set()
    for e in entries:
        name = e.name
        parts = PurePosixPath(name.replace("\\", "/")).parts
        # Zip-slip: an entry that an unzip would write outside the bundle's own folder.
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise BundleError(f"{where}: entry {show(name)} points outside the bundle; refusing it")
        if "\\" in name:
            raise BundleError(f"{where}: entry {show(name)} has a backslash, a folder separator on Windows")
        kind = stat.S_IFMT(e.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise BundleError(f"{where}: entry {show(name)} is a symlink; bundles hold plain files only")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise BundleError(f"{where}: entry {show(name)} is not a plain file; bundles hold plain files only")
        roots.add(parts[0] if len(parts) > 1 or name.endswith("/") else "")
    if len(roots) != 1 or "" in roots:
        raise BundleError(f"{where}: expected every entry inside one top folder (as `edgeft package` writes)")
    root = roots.pop()
    problem = name_problem(root)
    if problem:
        raise BundleError(f"{where}: top folder {show(root)}: not a plain folder name ({problem})")
    files: dict[str, ZipEntry] = {}
    seen: dict[str, str] = {}
    for e in entries:
        if not e.name.startswith(root + "/"):
            raise BundleError(f"{where}: entry {show(e.name)} is not in the top folder {display_name(root)}/")
        rel = e.name[len(root) + 1 :]
        if rel == "":  # the top folder's own entry, as `zip -r` writes it
            if e.usize:
                raise BundleError(f"{where}: entry {show(e.name)} is a folder with contents")
            continue
        if "/" in rel or "\\" in rel:
            raise BundleError(f"{where}: entry {show(e.name)} is in a sub-folder; bundles hold plain files only")
        problem = name_problem(rel)
        if problem or stat.S_IFMT(e.external_attr >> 16) == stat.S_IFDIR or e.external_attr & 0x10:
            raise BundleError(f"{where}: entry {show(e.name)}: not a plain file name ({problem or 'a folder'})")
        if rel in files:
            raise BundleError(
                f"{where}: entry {display_name(e.name)} appears twice (unzip tools disagree on which wins)"
            )
        if seen.setdefault(fold_name(rel), rel) != rel:
            raise BundleError(
                f"{where}: entries {display_name(rel)} and {display_name(seen[fold_name(rel)])} differ only in case or Unicode form "
                "(one overwrites the other when unpacked on macOS or Windows)"
            )
        files[rel] = e
    return root, files


def entry_bytes(f: IO[bytes], e: ZipEntry, where: str) -> Iterator[bytes]:
    """The entry's contents, a chunk at a time, never more than the size it declares: a deflate
    stream that inflates past it (a zip bomb), ends before or after the entry's data, or fails its
    CRC is refused."""
    f.seek(e.data_offset)
    left, produced, crc = e.csize, 0, 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if e.method == _DEFLATED else None

    def out(piece: bytes) -> bytes:
        nonlocal produced, crc
        produced += len(piece)
        if produced > e.usize:
            raise BundleError(
                f"{where}: entry {display_name(e.name)} inflates past the {e.usize} bytes it declares (a zip bomb?)"
            )
        crc = zlib.crc32(piece, crc)
        return piece

    try:
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise BundleError(f"{where}: entry {display_name(e.name)} is cut short (truncated zip)")
            left -= len(chunk)
            if inflater is None:
                yield out(chunk)
                continue
            while chunk:
                if inflater.eof:
                    break
                yield out(inflater.decompress(chunk, CHUNK))
                chunk = inflater.unconsumed_tail
            if inflater.eof and (inflater.unused_data or chunk or left):
                raise BundleError(
                    f"{where}: entry {display_name(e.name)}: its deflate stream ends before its data does"
                )
        if inflater is not None:
            while not inflater.eof and (piece := inflater.decompress(b"", CHUNK)):
                yield out(piece)
            if not inflater.eof:
                raise BundleError(f"{where}: entry {display_name(e.name)}: its deflate stream is cut short")
    except zlib.error as e2:
        raise BundleError(f"{where}: entry {display_name(e.name)}: damaged deflate data ({e2})") from None
    if produced != e.usize:
        raise BundleError(f"{where}: entry {display_name(e.name)} holds {produced} bytes; it declares {e.usize}")
    if crc != e.crc:
        raise BundleError(f"{where}: entry {display_name(e.name)}: CRC mismatch (a changed byte)")


def zip_manifest_bytes(f: IO[bytes], e: ZipEntry, where: str) -> bytes:
    if e.usize > MANIFEST_MAX_BYTES:  # refused before a byte of it is inflated
        raise BundleError(
            f"{where}: {display_name(e.name)} declares {e.usize} bytes; a manifest is at most {MANIFEST_MAX_BYTES} bytes"
        )
    return b"".join(entry_bytes(f, e, where))


def looks_like_zip(path: Path) -> bool:
    """A zip by its first bytes (a truncated one too, so that it is named as such) or its end record."""
    try:
        with open(path, "rb") as f:
            if f.read(4) in (_LOCAL_SIG, _EOCD_SIG):
                return True
    except OSError:
        return False
    return zipfile.is_zipfile(path)
