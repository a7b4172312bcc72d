"""Safe intake of a zip (path or bytes) or a folder into a list of source files.

Every entry is checked before anything is written; hostile entries reject the whole archive
(never skipped silently). Accepted entries are extracted under numbered names inside `raw_dir`,
so no archive name ever becomes a filesystem path.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from services.dataset.errors import DatasetError, UnreadableArchiveError, UnsafeArchiveError
from services.dataset.names import (
    CAPTION_EXT,
    CAPTION_JSON,
    IMAGE_EXTS,
    OTHER_IMAGE_EXTS,
    decode_zip_name,
    is_junk,
    safe_parts,
)

CHUNK = 1024 * 1024
# below this size a high compression ratio is harmless (a caption of repeated words compresses 100x)
RATIO_FLOOR = 1024 * 1024

# What zipfile and its decompressors raise on malformed input. Caught only around reads of the
# archive, so a failure to write our own files is never mistaken for a bad archive.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    struct.error,
    OverflowError,
    IndexError,
    KeyError,
    UnicodeError,
    RuntimeError,
)


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # total uncompressed
    max_files: int  # entries in the archive / files in the folder
    max_file_bytes: int  # one entry
    max_ratio: float  # uncompressed / compressed, per entry and overall


@dataclass(frozen=True)
class SourceFile:
    parts: tuple[str, ...]  # the path as the person sees it, after unwrapping the top folder
    display: str  # the original path inside the upload, for messages
    path: Path  # where the bytes are on disk now
    size: int
    owned: bool  # extracted by us, so it may be moved instead of copied

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.parts[-1]).suffix.lower()

    @property
    def name(self) -> str:
        return self.parts[-1]


@dataclass
class Intake:
    files: list[SourceFile] = field(default_factory=list)  # images, captions, caption json
    ignored: list[str] = field(default_factory=list)  # junk (Mac metadata, hidden, thumbnails)
    unsupported: list[str] = field(default_factory=list)  # images of formats ai-toolkit skips
    unknown: list[str] = field(default_factory=list)  # anything else (pdf, mp4, ...)


def _wanted(parts: tuple[str, ...]) -> bool:
    name = parts[-1]
    suffix = PurePosixPath(name).suffix.lower()
    return suffix in IMAGE_EXTS or suffix == CAPTION_EXT or name.casefold() == CAPTION_JSON


def _classify(intake: Intake, parts: tuple[str, ...], display: str) -> bool:
    """Record junk/unsupported/unknown; True when the file is one the dataset needs."""
    if is_junk(parts):
        intake.ignored.append(display)
        return False
    if _wanted(parts):
        return True
    if PurePosixPath(parts[-1]).suffix.lower() in OTHER_IMAGE_EXTS:
        intake.unsupported.append(display)
    else:
        intake.unknown.append(display)
    return False


def _unwrap(intake: Intake) -> None:
    """Strip top-level folders shared by every kept file (`MyDataset/a.jpg` -> `a.jpg`)."""
    files = intake.files
    while files and all(len(f.parts) > 1 for f in files) and len({f.parts[0] for f in files}) == 1:
        files = [SourceFile(f.parts[1:], f.display, f.path, f.size, f.owned) for f in files]
    intake.files = files


# --- zip --------------------------------------------------------------------------------------


def read_zip(source: Path | bytes, raw_dir: Path, limits: Limits) -> Intake:
    """Validate every entry of the zip, then extract the useful ones into `raw_dir`."""
    archive_size = len(source) if isinstance(source, bytes) else _file_size(source)
    if archive_size > limits.max_bytes:
        raise UnsafeArchiveError(
            "archive_too_large", f"archive is {archive_size} bytes, the limit is {limits.max_bytes}"
        )
    fileobj: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else _open(source)
    try:
        _check_central_directory(fileobj, archive_size, limits)
        try:
            zf = zipfile.ZipFile(fileobj)
        except _READ_ERRORS as exc:
            raise UnreadableArchiveError("archive_unreadable", f"not a readable zip archive: {exc}") from None
        with zf:
            return _extract(zf, archive_size, raw_dir, limits)
    finally:
        fileobj.close()


# zipfile reads the whole central directory into memory and builds a ZipInfo per entry before
# anything can be counted (review M1): its size and entry count are read from the end records first
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: 22 bytes + a comment up to 64 KiB
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, right before the EOCD
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


def central_directory_cap(limits: Limits) -> int:
    """Bytes of central directory an archive within `limits` needs at most (generous names)."""
    return min(8 * 1024 * 1024, max(64 * 1024, limits.max_files * 512))


def _check_central_directory(fh: IO[bytes], size: int, limits: Limits) -> None:
    if size < _EOCD.size:
        return  # zipfile says it is not a zip
    tail_len = min(size, _EOCD.size + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    fh.seek(0)
    # the record zipfile will use: at the very end (no comment), else the last signature
    at = tail_len - _EOCD.size if tail[-_EOCD.size:-_EOCD.size + 4] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > tail_len:
        return
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF) and at >= _EOCD64_LOCATOR.size:
        sig, _, eocd64_at, _ = _EOCD64_LOCATOR.unpack_from(tail, at - _EOCD64_LOCATOR.size)
        if sig == b"PK\x06\x07" and eocd64_at + _EOCD64.size <= size:
            fh.seek(eocd64_at)
            record = fh.read(_EOCD64.size)
            fh.seek(0)
            if len(record) == _EOCD64.size and record[:4] == b"PK\x06\x06":
                entries, cd_size = _EOCD64.unpack(record)[7:9]
    if entries > limits.max_files:
        raise UnsafeArchiveError(
            "too_many_entries", f"archive has {entries} entries, the limit is {limits.max_files}"
        )
    cap = central_directory_cap(limits)
    if cd_size > cap:
        raise UnsafeArchiveError(
            "too_many_entries", f"the archive's directory is {cd_size} bytes, the limit is {cap}"
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise UnreadableArchiveError("archive_unreadable", f"cannot read {path}: {exc.strerror}") from None


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise UnreadableArchiveError("archive_unreadable", f"cannot read {path}: {exc.strerror}") from None


def _check_entry(info: zipfile.ZipInfo, name: str) -> tuple[str, ...]:
    parts = safe_parts(name)
    if info.create_system == 3:  # Unix: the high 16 bits of external_attr are st_mode
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError("symlink", f"entry is a symbolic link: {name!r}", name)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError("special_file", f"entry is a device, fifo or socket: {name!r}", name)
    if info.flag_bits & 0x1:
        raise UnreadableArchiveError("encrypted", f"entry is encrypted (password-protected zip): {name!r}", name)
    return parts


def _extract(zf: zipfile.ZipFile, archive_size: int, raw_dir: Path, limits: Limits) -> Intake:
    try:
        infos = zf.infolist()
    except _READ_ERRORS as exc:
        raise UnreadableArchiveError("archive_unreadable", f"cannot list the archive: {exc}") from None
    if len(infos) > limits.max_files:
        raise UnsafeArchiveError(
            "too_many_entries", f"archive has {len(infos)} entries, the limit is {limits.max_files}"
        )
    # pass 1: judge every entry from the central directory before writing a byte
    planned: list[tuple[zipfile.ZipInfo, tuple[str, ...], str]] = []
    total = 0
    for info in infos:
        name = decode_zip_name(info)
        parts = _check_entry(info, name)
        if not parts or info.filename.endswith("/"):  # (is_dir() crashes on an empty name)
            continue
        if info.file_size > limits.max_file_bytes:
            raise UnsafeArchiveError(
                "entry_too_large",
                f"{name!r} unpacks to {info.file_size} bytes, the limit is {limits.max_file_bytes}",
                name,
            )
        if info.file_size > RATIO_FLOOR and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise UnsafeArchiveError(
                "compression_ratio",
                f"{name!r} expands {info.file_size // max(info.compress_size, 1)}x: refused as a zip bomb",
                name,
            )
        total += info.file_size
        planned.append((info, parts, name))
    if total > limits.max_bytes:
        raise UnsafeArchiveError(
            "archive_too_large", f"archive unpacks to {total} bytes, the limit is {limits.max_bytes}"
        )
    if total > RATIO_FLOOR and total > limits.max_ratio * max(archive_size, 1):
        raise UnsafeArchiveError("compression_ratio", f"archive expands {total // archive_size}x: refused")

    # pass 2: extract what the dataset needs, counting real bytes (headers can lie)
    intake = Intake()
    raw_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, (info, parts, name) in enumerate(planned):
        if not _classify(intake, parts, name):
            continue
        dest = raw_dir / f"{index:06d}"
        size = _copy_entry(zf, info, name, dest, limits)
        written += size
        if written > limits.max_bytes:
            raise UnsafeArchiveError("archive_too_large", "archive unpacks to more than its headers say")
        intake.files.append(SourceFile(parts, name, dest, size, owned=True))
    _unwrap(intake)
    return intake


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, dest: Path, limits: Limits) -> int:
    size = 0
    cap = min(info.file_size, limits.max_file_bytes)
    with dest.open("xb") as out:
        try:
            src = zf.open(info)
        except _READ_ERRORS as exc:
            raise UnreadableArchiveError("archive_unreadable", f"cannot open {name!r}: {exc}", name) from None
        with src:
            while True:
                try:
                    chunk = src.read(CHUNK)
                except _READ_ERRORS as exc:
                    raise UnreadableArchiveError("archive_unreadable", f"corrupt entry {name!r}: {exc}", name) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise UnsafeArchiveError("compression_ratio", f"{name!r} unpacks past its declared size", name)
                out.write(chunk)
    return size


# --- folder -----------------------------------------------------------------------------------


def read_folder(root: Path, limits: Limits) -> Intake:
    """Walk a folder with the zip's rules: links and devices reject it; files are read in place."""
    if not root.is_dir():
        raise UnreadableArchiveError("source_unreadable", f"not a folder: {root}")
    intake = Intake()
    count = 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_base = base.relative_to(root).parts
        # never descend into junk folders; links among folders are refused like any link
        for d in list(dirnames):
            if (base / d).is_symlink():
                raise UnsafeArchiveError("symlink", f"folder is a symbolic link: {'/'.join((*rel_base, d))}")
            if is_junk((d,)):
                intake.ignored.append("/".join((*rel_base, d)) + "/")
                dirnames.remove(d)
        dirnames.sort()
        for fname in sorted(filenames):
            parts = (*rel_base, fname)
            display = "/".join(parts)
            path = base / fname
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError("symlink", f"file is a symbolic link: {display}", display)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeArchiveError("special_file", f"not a regular file: {display}", display)
            count += 1
            if count > limits.max_files:
                raise UnsafeArchiveError("too_many_entries", f"folder has more than {limits.max_files} files")
            if not _classify(intake, parts, display):
                continue
            if st.st_size > limits.max_file_bytes:
                raise UnsafeArchiveError(
                    "entry_too_large",
                    f"{display} is {st.st_size} bytes, the limit is {limits.max_file_bytes}",
                    display,
                )
            total += st.st_size
            if total > limits.max_bytes:
                raise UnsafeArchiveError("archive_too_large", f"folder holds more than {limits.max_bytes} bytes")
            intake.files.append(SourceFile(parts, display, path, st.st_size, owned=False))
    _unwrap(intake)
    return intake


def is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


__all__ = ["DatasetError", "Intake", "Limits", "SourceFile", "is_zip", "read_folder", "read_zip"]
