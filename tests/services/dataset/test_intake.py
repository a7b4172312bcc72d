"""Hostile and odd-but-valid uploads through `prepare`: expected verdicts, codes and repairs, and
nothing ever written outside the work folder."""

from __future__ import annotations

import stat
import uuid
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from services.dataset import DatasetError, PreparedDataset, prepare
from services.dataset.manifest import _SAFE_PATH
from services.settings import MissingCaptionPolicy, Settings

from .corpus import (
    Entry,
    basic_entries,
    exif_rotated_jpeg,
    image_bytes,
    make_zip,
    png_header_only,
    rename_raw,
    set_encrypted,
    snapshot,
    symlink_entry,
    unix_entry,
)


async def _prepare_zip(
    tmp_path: Path, work: Path, cfg: Settings, data: bytes, trigger: str | None = None
) -> PreparedDataset:
    """Run prepare on a zip file and prove that nothing outside `work` changed."""
    src = tmp_path / "upload.zip"
    src.write_bytes(data)
    before = snapshot(tmp_path, work)
    try:
        return await prepare(src, work, cfg, trigger)
    finally:
        assert snapshot(tmp_path, work) == before
        # the extraction area is always cleaned up
        assert not (work / ".raw").exists()


def _codes(prepared: PreparedDataset) -> set[str]:
    return {p.code for p in prepared.report.problems}


def _repairs(prepared: PreparedDataset) -> set[str]:
    return {r.code for r in prepared.report.repairs}


# --- hostile: rejected outright ---------------------------------------------------------------

EVIL = f"lorabot-evil-{uuid.uuid4().hex}"

HOSTILE: list[tuple[str, list[Entry], str]] = [
    ("absolute", [*basic_entries(), (f"/tmp/{EVIL}.txt", b"x")], "unsafe_path"),
    ("dotdot", [*basic_entries(), (f"../../{EVIL}.jpg", image_bytes())], "unsafe_path"),
    ("dotdot-inner", [*basic_entries(), (f"a/../../{EVIL}.txt", b"x")], "unsafe_path"),
    ("backslash-dotdot", [*basic_entries(), (f"..\\..\\{EVIL}.txt", b"x")], "unsafe_path"),
    ("drive", [*basic_entries(), (f"C:\\{EVIL}.txt", b"x")], "unsafe_path"),
    ("drive-slash", [*basic_entries(), (f"D:/{EVIL}.txt", b"x")], "unsafe_path"),
    ("symlink", [*basic_entries(), (symlink_entry("link.jpg"), b"/etc/passwd")], "symlink"),
    ("symlink-in-junk", [*basic_entries(), (symlink_entry("__MACOSX/x"), b"/etc")], "symlink"),
    ("chardev", [*basic_entries(), (unix_entry("dev.jpg", stat.S_IFCHR | 0o644), b"")], "special_file"),
    ("fifo", [*basic_entries(), (unix_entry("pipe.txt", stat.S_IFIFO | 0o644), b"")], "special_file"),
]


@pytest.mark.parametrize(("entries", "code"), [(e, c) for _n, e, c in HOSTILE], ids=[n for n, _e, _c in HOSTILE])
async def test_hostile_entries_are_rejected(
    tmp_path: Path, work: Path, cfg: Settings, entries: list[Entry], code: str
) -> None:
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, cfg, make_zip(entries))
    assert err.value.code == code
    assert not Path(f"/tmp/{EVIL}.txt").exists()
    # rejection happens before extraction: no dataset was produced
    assert not any((work / "dataset").glob("*"))


async def test_zip_bomb_ratio_is_rejected(tmp_path: Path, work: Path, cfg: Settings) -> None:
    data = make_zip([*basic_entries(), ("bomb.txt", b"\0" * (8 * 1024 * 1024))])
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, cfg, data)
    assert err.value.code == "compression_ratio"


async def test_too_many_entries(tmp_path: Path, work: Path, cfg: Settings) -> None:
    cfg = cfg.model_copy(update={"dataset_max_files": 8})
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, cfg, make_zip(basic_entries(5)))  # 10 entries
    assert err.value.code == "too_many_entries"


async def test_entry_and_total_size_caps(tmp_path: Path, work: Path, cfg: Settings) -> None:
    data = make_zip(basic_entries(5), compression=zipfile.ZIP_STORED)
    one = max(len(image_bytes(seed=i + 1)) for i in range(5))
    small = cfg.model_copy(update={"dataset_max_file_bytes": one - 1})
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, small, data)
    assert err.value.code == "entry_too_large"
    # five images and five captions unpack to more than three images' worth
    total = cfg.model_copy(update={"dataset_max_bytes": 3 * one})
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, total, data)
    assert err.value.code == "archive_too_large"


async def test_encrypted_entries_are_refused(tmp_path: Path, work: Path, cfg: Settings) -> None:
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, cfg, set_encrypted(make_zip(basic_entries())))
    assert err.value.code == "encrypted"


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04" + b"\0" * 40], ids=["empty", "text", "stub"])
async def test_unreadable_archives(tmp_path: Path, work: Path, cfg: Settings, data: bytes) -> None:
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, cfg, data)
    assert err.value.code == "archive_unreadable"


async def test_corrupt_entry_data_is_unreadable(tmp_path: Path, work: Path, cfg: Settings) -> None:
    data = bytearray(make_zip(basic_entries(), compression=zipfile.ZIP_STORED))
    data[200] ^= 0xFF  # inside the first entry's data: CRC check fails
    with pytest.raises(DatasetError) as err:
        await _prepare_zip(tmp_path, work, cfg, bytes(data))
    assert err.value.code == "archive_unreadable"


async def test_folder_with_symlink_is_rejected(tmp_path: Path, work: Path, cfg: Settings) -> None:
    src = tmp_path / "folder"
    src.mkdir()
    for name, data in basic_entries():
        assert isinstance(name, str)
        (src / name).write_bytes(data)
    (src / "escape.jpg").symlink_to("/etc/passwd")
    with pytest.raises(DatasetError) as err:
        await prepare(src, work, cfg)
    assert err.value.code == "symlink"


# --- odd but valid: ready, with the right repairs ----------------------------------------------


async def test_mac_zip_with_nested_folders_and_odd_extensions(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries: list[Entry] = [
        ("My Set/", b""),
        ("My Set/a/one.JPG", image_bytes(seed=1)),
        ("My Set/a/one.txt", "\ufeffohwx on a beach\r\nat dusk\r\n".encode()),
        ("My Set/b/two.PNG", image_bytes("PNG", seed=2)),
        ("My Set/b/two.TXT", b"ohwx in a park"),
        ("My Set/b/c/three.JpEg", image_bytes(seed=3)),
        ("My Set/b/c/three.txt", b"ohwx, portrait"),
        ("My Set/four.webp", image_bytes("WEBP", seed=4, quality=90)),
        ("My Set/four.txt", b"ohwx smiling"),
        ("__MACOSX/My Set/a/._one.JPG", b"\0\5\26\7 AppleDouble junk"),
        ("My Set/.DS_Store", b"junk"),
        ("My Set/.hidden/secret.jpg", image_bytes(seed=9)),
        ("My Set/Thumbs.db", b"junk"),
    ]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries), trigger="ohwx")
    report = prepared.report
    assert report.ready, report.problems
    assert (report.images, report.captioned) == (4, 4)
    assert len(report.ignored) == 4
    assert {"caption_normalised", "flattened"} <= _repairs(prepared)
    names = sorted(p.name for p in prepared.folder.iterdir())
    assert names == sorted(
        ["a_one.jpg", "a_one.txt", "b_two.png", "b_two.txt", "b_c_three.jpeg", "b_c_three.txt", "four.webp", "four.txt"]
    )
    assert (prepared.folder / "a_one.txt").read_bytes() == b"ohwx on a beach\nat dusk"
    assert all(_SAFE_PATH.match(f.path) for f in prepared.manifest.files)
    assert prepared.manifest.images == 4 and prepared.manifest.captions == 4


async def test_colour_modes_and_orientation_are_repaired(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries: list[Entry] = [
        ("rgba.png", image_bytes("PNG", mode="RGBA", seed=1)),
        ("cmyk.jpg", image_bytes("JPEG", mode="CMYK", seed=2)),
        ("palette.png", image_bytes("PNG", mode="P", seed=3)),
        ("rotated.jpg", exif_rotated_jpeg((400, 300), orientation=6)),
        ("gray.jpg", image_bytes("JPEG", mode="L", seed=4)),
    ]
    entries += [(n.rsplit(".", 1)[0] + ".txt", b"ohwx") for n, _ in list(entries) if isinstance(n, str)]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries), trigger="ohwx")
    assert prepared.report.ready, prepared.report.problems
    by_code = {(r.code, r.path) for r in prepared.report.repairs}
    assert ("alpha_flattened", "rgba.png") in by_code
    assert ("converted_rgb", "cmyk.jpg") in by_code
    assert ("converted_rgb", "palette.png") in by_code
    assert ("exif_rotated", "rotated.jpg") in by_code
    folder = prepared.folder
    for name in ("rgba.png", "cmyk.jpg", "palette.png", "rotated.jpg"):
        with Image.open(folder / name) as im:
            assert im.mode == "RGB", name
    with Image.open(folder / "rotated.jpg") as im:
        assert im.size == (300, 400)
        assert im.getexif().get(0x0112, 1) == 1
    with Image.open(folder / "gray.jpg") as im:
        assert im.mode == "L"  # left alone: training reads greyscale fine
    # the manifest describes the re-encoded files, not the originals
    for f in prepared.manifest.files:
        assert (folder / f.path).stat().st_size == f.size


async def test_duplicates_are_dropped(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries = [*basic_entries(4), ("copy/img00 (1).jpg", image_bytes(seed=1)), ("copy/img00 (1).txt", b"ohwx")]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries), trigger="ohwx")
    assert prepared.report.ready
    assert prepared.report.images == 4 and prepared.report.duplicates == 1
    dup = [r for r in prepared.report.repairs if r.code == "duplicate_removed"]
    # the first in path order is kept: 'copy/...' sorts before 'img00.jpg'
    assert [(r.path, r.message) for r in dup] == [("img00.jpg", "same bytes as copy/img00 (1).jpg; dropped")]
    assert (prepared.folder / "copy_img00_1.jpg").exists() and not (prepared.folder / "img00.jpg").exists()


async def test_non_utf8_names(tmp_path: Path, work: Path, cfg: Settings) -> None:
    data = make_zip(
        [
            *basic_entries(3),
            ("cafX.jpg", image_bytes(seed=7)),  # becomes latin-1 'café' bytes, no UTF-8 flag
            ("cafX.txt", b"ohwx in a cafe"),
            ("jpnXXX.jpg", image_bytes(seed=8)),  # becomes UTF-8 bytes without the UTF-8 flag
        ]
    )
    data = rename_raw(data, "cafX.", b"caf\xe9.")
    data = rename_raw(data, "jpnXXX.", "日本.".encode()[:7])  # 日本 is 6 bytes + '.'
    prepared = await _prepare_zip(tmp_path, work, cfg, data, trigger="ohwx")
    report = prepared.report
    assert report.images == 5, report.problems
    # UTF-8 bytes without the flag are read as UTF-8; other bytes fall back to cp437
    assert [r.path for r in report.repairs if r.code == "caption_filled"] == ["日本.jpg"]
    names = {f.path for f in prepared.manifest.files}
    assert {"caf.jpg", "caf.txt", "image.jpg", "image.txt"} <= names
    assert all(_SAFE_PATH.match(f.path) for f in prepared.manifest.files)
    # the latin-1 image kept its caption: pairing works on the decoded name
    assert report.captioned == 4


async def test_dataset_info_json_captions(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries: list[Entry] = [
        ("set/a.jpg", image_bytes(seed=1)),
        ("set/b.jpg", image_bytes(seed=2)),
        ("set/c.jpg", image_bytes(seed=3)),
        ("set/c.txt", b"ohwx from its own txt"),
        ("set/dataset_info.json", b'{"a.jpg": {"caption": "ohwx from json"}, "b.jpg": "ohwx too", "c.jpg": "x"}'),
    ]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries), trigger="ohwx")
    assert prepared.report.ready, prepared.report.problems
    assert prepared.report.captioned == 3
    assert (prepared.folder / "a.txt").read_text() == "ohwx from json"
    assert (prepared.folder / "c.txt").read_text() == "ohwx from its own txt"  # the .txt wins
    assert not (prepared.folder / "dataset_info.json").exists()


async def test_extension_mismatch_is_fixed(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries = [*basic_entries(3), ("really_png.jpg", image_bytes("PNG", seed=5)), ("really_png.txt", b"ohwx")]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries))
    assert prepared.report.ready
    assert (prepared.folder / "really_png.png").exists()
    assert "extension_fixed" in _repairs(prepared)


# --- readable but not ready -------------------------------------------------------------------


async def test_bad_images_are_reported(tmp_path: Path, work: Path, cfg: Settings) -> None:
    jpeg = image_bytes(seed=20)
    entries = [
        *basic_entries(3),
        ("tiny.jpg", image_bytes(size=(32, 32), seed=21)),
        ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        ("noise.png", b"\x89PNG\r\n\x1a\n garbage"),
        ("anim.gif", image_bytes("GIF", seed=22)),
        ("gif_in_disguise.jpg", image_bytes("GIF", seed=23)),
        ("bomb.png", png_header_only(30_000, 30_000)),
        ("notes.pdf", b"%PDF-1.4"),
    ]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries))
    report = prepared.report
    assert not report.ready
    by_path = {p.path: p.code for p in report.problems}
    assert by_path["tiny.jpg"] == "image_too_small"
    assert by_path["truncated.jpg"] == "image_unreadable"
    assert by_path["noise.png"] == "image_unreadable"
    assert by_path["anim.gif"] == "unsupported_format"
    assert by_path["gif_in_disguise.jpg"] == "unsupported_format"
    assert by_path["bomb.png"] == "image_too_large"
    assert by_path["notes.pdf"] == "unknown_file"
    assert report.images == 3


async def test_pixel_cap(tmp_path: Path, work: Path, cfg: Settings) -> None:
    cfg = cfg.model_copy(update={"dataset_max_pixels": 100 * 100})
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(basic_entries(3)))
    assert _codes(prepared) == {"image_too_large", "no_images"}


async def test_missing_captions_policies(tmp_path: Path, work: Path, cfg: Settings) -> None:
    data = make_zip([*basic_entries(3), ("bare.jpg", image_bytes(seed=30))])
    no_trigger = await _prepare_zip(tmp_path, work, cfg, data)
    assert not no_trigger.report.ready and _codes(no_trigger) == {"missing_caption"}

    filled = await _prepare_zip(tmp_path, work, cfg, data, trigger="ohwx")
    assert filled.report.ready and filled.report.filled == 1 and filled.report.captioned == 3
    assert (filled.folder / "bare.txt").read_text() == "[trigger]"

    strict = cfg.model_copy(update={"missing_captions": MissingCaptionPolicy.FAIL})
    failed = await _prepare_zip(tmp_path, work, strict, data, trigger="ohwx")
    assert _codes(failed) == {"missing_caption"}

    class Captioner:
        async def caption(self, image: Path) -> str:
            assert image.parent == work / "dataset" and image.exists()
            return "a generated caption"

    auto = cfg.model_copy(update={"missing_captions": MissingCaptionPolicy.CAPTIONER})
    without = await _prepare_zip(tmp_path, work, auto, data, trigger="ohwx")
    assert _codes(without) == {"missing_caption"}
    src = tmp_path / "upload.zip"
    captioned = await prepare(src, work, auto, "ohwx", captioner=Captioner())
    assert captioned.report.ready and captioned.report.captioned == 4
    assert (captioned.folder / "bare.txt").read_text() == "a generated caption"


async def test_caption_encodings_and_trigger(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries = [
        *basic_entries(3),
        ("latin.jpg", image_bytes(seed=40)),
        ("latin.txt", "ohwx au café".encode("cp1252")),
        ("wide.jpg", image_bytes(seed=41)),
        ("wide.txt", "ohwx in UTF-16".encode("utf-16")),
        ("plain.jpg", image_bytes(seed=42)),
        ("plain.txt", b"a dog on grass"),
        ("orphan.txt", b"no image for me"),
    ]
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(entries), trigger="ohwx")
    by_path = {p.path: p.code for p in prepared.report.problems}
    assert by_path == {"latin.txt": "caption_encoding", "orphan.txt": "orphan_caption"}
    assert not prepared.report.ready
    assert (prepared.folder / "wide.txt").read_text() == "ohwx in UTF-16"
    assert (prepared.folder / "plain.txt").read_text() == "[trigger], a dog on grass"
    assert "trigger_added" in _repairs(prepared)


async def test_too_few_images(tmp_path: Path, work: Path, cfg: Settings) -> None:
    prepared = await _prepare_zip(tmp_path, work, cfg, make_zip(basic_entries(2)))
    assert _codes(prepared) == {"too_few_images"}


async def test_bytes_and_folder_sources_agree(tmp_path: Path, work: Path, cfg: Settings) -> None:
    entries = basic_entries(4, prefix="top/")
    from_bytes = await prepare(make_zip(entries), work, cfg, "ohwx")
    src = tmp_path / "folder"
    for name, data in entries:
        assert isinstance(name, str)
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    before = snapshot(tmp_path, work)
    from_folder = await prepare(src, tmp_path / "work2", cfg, "ohwx")
    assert from_bytes.manifest.dataset_sha256 == from_folder.manifest.dataset_sha256
    # the person's folder is read, never changed
    after = snapshot(tmp_path, work)
    assert {k: v for k, v in after.items() if "work2" not in k} == before
