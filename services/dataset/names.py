"""Names: validating archive paths, spotting junk, and turning any name into a safe flat one.

Archive names are never used as filesystem paths: entries are extracted under numbered names and
the cleaned dataset gets names made here from the manifest's safe alphabet.
"""

from __future__ import annotations

import re
import unicodedata
import zipfile
from pathlib import PurePosixPath

from services.dataset.errors import UnsafeArchiveError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})  # what ai-toolkit loads (any case)
# images people send that ai-toolkit would silently skip: reported, not ignored
OTHER_IMAGE_EXTS = frozenset(
    {".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng", ".cr2", ".nef"}
)
CAPTION_EXT = ".txt"
CAPTION_JSON = "dataset_info.json"  # the earlier system's caption file

_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "_controls"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM = 80


def decode_zip_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as its author meant it.

    Without the UTF-8 flag zipfile decodes names as cp437; many tools write UTF-8 anyway, so the
    raw bytes are re-read as UTF-8 when they are valid UTF-8, and left as cp437 otherwise.
    """
    name = info.filename
    if info.flag_bits & 0x800:
        return name
    try:
        return name.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


def safe_parts(name: str) -> tuple[str, ...]:
    """Split an archive name into parts, rejecting every form of escape.

    Backslashes count as separators (Windows tools write them); absolute paths, drive letters,
    `..` and NUL are refused rather than cleaned, since they only come from hostile or broken tools.
    """
    if "\x00" in name:
        raise UnsafeArchiveError("unsafe_path", f"entry name contains a NUL byte: {name!r}", name)
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise UnsafeArchiveError("unsafe_path", f"entry has an absolute path: {name!r}", name)
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError("unsafe_path", f"entry escapes the archive with '..': {name!r}", name)
    if any(":" in p for p in parts):
        # 'C:x' or an NTFS alternate stream: both mean something else on Windows
        raise UnsafeArchiveError("unsafe_path", f"entry name contains a drive or stream colon: {name!r}", name)
    return parts


def is_junk(parts: tuple[str, ...]) -> bool:
    """Mac metadata, hidden files and folders, Windows thumbnails, ai-toolkit's `_controls`."""
    return any(p.startswith(".") or p.casefold() in _JUNK_NAMES for p in parts)


def safe_stem(text: str) -> str:
    """A stem in the manifest's alphabet: ASCII letters, digits, '.', '_', '-'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    stem = _UNSAFE_CHARS.sub("_", ascii_text).strip("._-")
    stem = re.sub(r"_+", "_", stem)[:MAX_STEM].strip("._-")
    return stem or "image"


class NameAllocator:
    """Hands out unique stems, case-insensitively (captions pair with images by stem)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def take(self, wanted: str) -> str:
        stem = safe_stem(wanted)
        candidate, n = stem, 1
        while candidate.casefold() in self._taken:
            n += 1
            candidate = f"{stem}_{n}"
        self._taken.add(candidate.casefold())
        return candidate


def flat_stem(parts: tuple[str, ...]) -> str:
    """`photos/beach/01.JPG` -> `photos_beach_01`: flattening keeps the folder as a prefix."""
    return "_".join((*parts[:-1], PurePosixPath(parts[-1]).stem))
