"""The packer: a deterministic tar of the cleaned dataset plus `manifest.json`.

Same folder and manifest in, same bytes out: entries sorted, owner/time/mode normalised, no
directory entries. Every file is hashed again while it is packed, so a file changed on disk after
QA cannot slip into the tar under the manifest's old checksum.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from services.dataset.errors import DatasetError
from services.dataset.manifest import MANIFEST_NAME, Manifest, ManifestFile
from services.dataset.names import CAPTION_EXT, IMAGE_EXTS

CHUNK = 1024 * 1024
_MTIME = 0  # fixed, so that the tar's bytes depend on content only


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def build_manifest(folder: Path, trigger: str | None) -> Manifest:
    """Hash every file of a flat dataset folder (hidden files and manifest.json left out)."""
    files: list[ManifestFile] = []
    images = captions = 0
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == MANIFEST_NAME:
            continue
        if entry.is_symlink() or not entry.is_file():
            raise DatasetError("unsafe_folder", f"dataset folder holds a non-file: {entry.name}", entry.name)
        digest, size = sha256_file(entry)
        try:
            files.append(ManifestFile(path=entry.name, size=size, sha256=digest))
        except ValidationError:
            raise DatasetError("unsafe_name", f"unsafe file name in the dataset: {entry.name!r}", entry.name) from None
        suffix = entry.suffix.lower()
        images += suffix in IMAGE_EXTS
        captions += suffix == CAPTION_EXT
    return Manifest(files=files, images=images, captions=captions, trigger_word=trigger)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingReader(io.RawIOBase):
    """Reads a file for tarfile while hashing it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.hash.update(data)
        return data


def pack(folder: Path, manifest: Manifest, out: Path) -> None:
    """Write `out` (a tar) with the manifest's files and manifest.json, atomically."""
    doc = manifest.model_dump_json(indent=2).encode() + b"\n"
    entries = sorted([*((f.path, f) for f in manifest.files), (MANIFEST_NAME, None)], key=lambda e: e[0])
    tmp = out.with_name(f".{out.name}.part")
    try:
        # GNU format: long names without pax headers (pax would carry varying metadata)
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for name, mf in entries:
                if mf is None:
                    tar.addfile(_info(name, len(doc)), io.BytesIO(doc))
                    continue
                path = folder / mf.path
                try:
                    size = path.stat().st_size
                    if size != mf.size:
                        raise DatasetError("pack_mismatch", f"{mf.path} changed size since it was checked", mf.path)
                    with path.open("rb") as f:
                        reader = _HashingReader(f)
                        tar.addfile(_info(name, size), reader)
                except FileNotFoundError:
                    raise DatasetError("pack_mismatch", f"{mf.path} is missing from {folder}", mf.path) from None
                if reader.hash.hexdigest() != mf.sha256:
                    raise DatasetError("pack_mismatch", f"{mf.path} changed since it was checked", mf.path)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
