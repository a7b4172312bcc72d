"""A generated corpus of datasets: valid, odd-but-valid and hostile zips, built in memory."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

Entry = tuple[str | zipfile.ZipInfo, bytes]


def image_bytes(
    fmt: str = "JPEG", size: tuple[int, int] = (320, 288), mode: str = "RGB", seed: int = 0, **save: object
) -> bytes:
    """A distinct image per seed (noise, so that no two seeds hash alike)."""
    w, h = size
    noise = Image.frombytes("L", size, os.urandom(w * h) if seed < 0 else _prng(w * h, seed))
    im = Image.merge("RGB", (noise, noise.rotate(90, expand=False), noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize(size))  # really transparent in places
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def _prng(n: int, seed: int) -> bytes:
    # cheap deterministic bytes: repeat a seeded block (good enough to make images differ)
    block = bytes((i * 131 + seed * 7919 + (i >> 5) * seed) & 0xFF for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def exif_rotated_jpeg(size: tuple[int, int] = (400, 300), orientation: int = 6) -> bytes:
    im = Image.open(io.BytesIO(image_bytes("JPEG", size, seed=11)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions and holds almost nothing: a decompression bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def make_zip(entries: Iterable[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def unix_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def symlink_entry(name: str) -> zipfile.ZipInfo:
    return unix_entry(name, stat.S_IFLNK | 0o777)


def set_encrypted(data: bytes) -> bytes:
    """Set the 'encrypted' flag of every entry (local and central headers), as a zip tool would."""
    out = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = out.find(sig)
        while pos != -1:
            (flags,) = struct.unpack_from("<H", out, pos + offset)
            struct.pack_into("<H", out, pos + offset, flags | 0x1)
            pos = out.find(sig, pos + 4)
    return bytes(out)


def rename_raw(data: bytes, placeholder: str, raw_name: bytes) -> bytes:
    """Swap an ASCII placeholder name for raw (non-UTF-8) bytes of the same length, flag unset."""
    assert len(placeholder.encode()) == len(raw_name)
    return data.replace(placeholder.encode(), raw_name)


def basic_entries(n: int = 5, prefix: str = "", captions: bool = True) -> list[Entry]:
    entries: list[Entry] = []
    for i in range(n):
        entries.append((f"{prefix}img{i:02d}.jpg", image_bytes(seed=i + 1)))
        if captions:
            entries.append((f"{prefix}img{i:02d}.txt", f"a photo of ohwx number {i}".encode()))
    return entries


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` except under `skip`: (size, mtime_ns), to prove nothing else changed."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, files in os.walk(root):
        if Path(dirpath).is_relative_to(skip):
            continue
        for f in files:
            st = (Path(dirpath) / f).lstat()
            out[str(Path(dirpath) / f)] = (st.st_size, st.st_mtime_ns)
    return out
