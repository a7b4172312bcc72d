"""The packer: deterministic bytes, normalised metadata, a manifest that matches the contents."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from services.dataset import MANIFEST_NAME, DatasetError, Manifest, build_manifest, pack, prepare
from services.settings import Settings

from .corpus import basic_entries, make_zip


async def test_pack_is_deterministic_and_verifiable(tmp_path: Path, cfg: Settings) -> None:
    prepared = await prepare(make_zip(basic_entries(4, prefix="set/")), tmp_path / "w1", cfg, "ohwx")
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    pack(prepared.folder, prepared.manifest, a)
    # the same dataset prepared again, later, with other file times, packs to the same bytes
    again = await prepare(make_zip(basic_entries(4, prefix="set/")), tmp_path / "w2", cfg, "ohwx")
    for path in again.folder.iterdir():
        os.utime(path, (1_000_000, 1_000_000))
    pack(again.folder, again.manifest, b)
    assert a.read_bytes() == b.read_bytes()

    with tarfile.open(a) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names) and MANIFEST_NAME in names
        assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
        doc = json.loads(tar.extractfile(MANIFEST_NAME).read())  # type: ignore[union-attr]
        manifest = Manifest.model_validate(doc)
        assert manifest.dataset_sha256 == prepared.manifest.dataset_sha256 == manifest.digest()
        assert manifest.trigger_word == "ohwx" and manifest.images == 4 and manifest.captions == 4
        for f in manifest.files:
            data = tar.extractfile(f.path).read()  # type: ignore[union-attr]
            assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.size
    assert not list(tmp_path.glob(".*.part"))


async def test_build_manifest_matches_prepare(tmp_path: Path, cfg: Settings) -> None:
    prepared = await prepare(make_zip(basic_entries(3)), tmp_path / "w", cfg, None)
    rebuilt = build_manifest(prepared.folder, None)
    assert rebuilt == prepared.manifest


async def test_pack_refuses_a_file_changed_after_qa(tmp_path: Path, cfg: Settings) -> None:
    prepared = await prepare(make_zip(basic_entries(3)), tmp_path / "w", cfg, None)
    victim = prepared.folder / "img01.txt"
    victim.write_bytes(b"a photo of ohwx number X")  # same size, other bytes
    out = tmp_path / "out.tar"
    with pytest.raises(DatasetError) as err:
        pack(prepared.folder, prepared.manifest, out)
    assert err.value.code == "pack_mismatch"
    assert not out.exists() and not list(tmp_path.glob(".*.part"))


def test_build_manifest_refuses_unsafe_names(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "bad;rm -rf.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError) as err:
        build_manifest(tmp_path, None)
    assert err.value.code == "unsafe_name"
