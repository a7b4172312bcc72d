"""The review's M1: a zip's central directory is judged from its end records, before zipfile reads
and parses it (a small archive can hold millions of entries)."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest

from services.dataset.archive import Limits, central_directory_cap, read_zip
from services.dataset.errors import UnsafeArchiveError

LIMITS = Limits(max_bytes=10**8, max_files=10, max_file_bytes=10**7, max_ratio=100.0)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _as_zip64(data: bytes, claimed_entries: int) -> bytes:
    """Rewrite the end records as Zip64 ones (as big archives have), claiming `claimed_entries`."""
    eocd = data[-22:]
    _, _, _, _, _, cd_size, cd_offset, _ = struct.unpack("<4s4H2LH", eocd)
    body = data[:-22]
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, claimed_entries, claimed_entries,
                         cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return body + eocd64 + locator + end


def never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on zipfile must not even open an archive: that is when it parses the directory."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("zipfile parsed the central directory of an archive that should be refused")

    monkeypatch.setattr(zipfile, "ZipFile", refuse)


def test_too_many_entries_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _zip({f"{i}.txt": b"x" for i in range(11)})
    never_parsed(monkeypatch)
    with pytest.raises(UnsafeArchiveError) as err:
        read_zip(data, tmp_path / "raw", LIMITS)
    assert err.value.code == "too_many_entries" and "11 entries" in str(err.value)


def test_a_zip64_count_is_read_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _as_zip64(_zip({"a.txt": b"x", "b.txt": b"y"}), claimed_entries=40_000_000)
    never_parsed(monkeypatch)
    with pytest.raises(UnsafeArchiveError) as err:
        read_zip(data, tmp_path / "raw", LIMITS)
    assert "40000000 entries" in str(err.value)


def test_an_oversized_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long = "n" * 30_000  # few entries, each with a huge name
    data = _zip({f"{long}{i}.txt": b"x" for i in range(3)})
    never_parsed(monkeypatch)
    with pytest.raises(UnsafeArchiveError) as err:
        read_zip(data, tmp_path / "raw", LIMITS)
    assert "directory is" in str(err.value) and str(central_directory_cap(LIMITS)) in str(err.value)


def test_a_normal_zip64_archive_still_opens(tmp_path: Path) -> None:
    data = _as_zip64(_zip({"a.txt": b"hello"}), claimed_entries=1)
    intake = read_zip(data, tmp_path / "raw", LIMITS)
    assert intake is not None
