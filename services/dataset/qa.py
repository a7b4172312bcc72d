"""QA and repair: decode every image, pair captions, apply safe repairs, write the flat dataset.

Runs in worker threads (Pillow and hashlib release the GIL while decoding and hashing). Memory is
bounded by the worker count: each worker holds one file's bytes and one decoded image at a time,
and images above `dataset_max_pixels` are refused from their header, before decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from services.dataset.archive import Intake, SourceFile
from services.dataset.manifest import ManifestFile
from services.dataset.names import CAPTION_EXT, CAPTION_JSON, IMAGE_EXTS, NameAllocator, flat_stem
from services.dataset.report import Problem, Repair, Severity
from services.settings import MissingCaptionPolicy, Settings

T = TypeVar("T")
R = TypeVar("R")

TRIGGER_TOKEN = "[trigger]"  # noqa: S105 - ai-toolkit replaces it with the job's trigger word
_FORMAT_EXTS = {"JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
_KEEP_MODES = frozenset({"RGB", "L"})  # what training reads without conversion
_ORIENTATION = 0x0112
MAX_CAPTION_BYTES = 64 * 1024
_REPORTED = "\x00reported"  # a caption that exists but was reported as a problem

# what Pillow raises on a broken or hostile image file
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    RuntimeError,
)


@dataclass
class ImageCheck:
    src: SourceFile
    sha256: str = ""
    format: str = ""
    size: tuple[int, int] = (0, 0)
    mode: str = ""
    orientation: int = 1
    alpha_used: bool = False
    problem: Problem | None = None


@dataclass
class Written:
    name: str
    sha256: str
    size: int
    repairs: list[Repair]


@dataclass
class QAResult:
    problems: list[Problem] = field(default_factory=list)
    repairs: list[Repair] = field(default_factory=list)
    files: list[ManifestFile] = field(default_factory=list)
    images: int = 0
    captioned: int = 0
    filled: int = 0
    duplicates: int = 0
    # images still without a caption under the captioner policy: (stem, display path, image file)
    to_caption: list[tuple[str, str, Path]] = field(default_factory=list)


def workers(settings: Settings) -> int:
    return settings.dataset_workers or max(1, min(4, os.cpu_count() or 1))


def _pmap(fn: Callable[[T], R], items: Iterable[T], n: int) -> list[R]:
    items = list(items)
    if n <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="dataset-qa") as pool:
        return list(pool.map(fn, items))


# --- images -----------------------------------------------------------------------------------


def inspect_image(src: SourceFile, max_pixels: int, min_side: int) -> ImageCheck:
    """Hash and fully decode one image; never raises for a bad image, reports it instead."""
    check = ImageCheck(src)

    def bad(code: str, message: str) -> ImageCheck:
        check.problem = Problem(code=code, path=src.display, message=message)
        return check

    try:
        data = src.path.read_bytes()
    except OSError as exc:
        return bad("image_unreadable", f"cannot read the file: {exc.strerror}")
    check.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            check.format = im.format or ""
            check.size = im.size
            w, h = im.size
            if check.format not in _FORMAT_EXTS:
                return bad(
                    "unsupported_format",
                    f"the file is {check.format or 'not an image'} inside; use JPEG, PNG or WebP",
                )
            if w * h > max_pixels:
                return bad("image_too_large", f"{w}x{h} is more than {max_pixels} pixels")
            im.load()  # the real decode: truncated or corrupt data fails here
            check.mode = im.mode
            check.orientation = int(im.getexif().get(_ORIENTATION, 1) or 1)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                alpha = im.convert("RGBA").getchannel("A") if im.mode == "P" else im.getchannel("A")
                extrema = alpha.getextrema()
                check.alpha_used = isinstance(extrema, tuple) and extrema[0] != 255
    except _DECODE_ERRORS as exc:
        if isinstance(exc, Image.DecompressionBombError):
            return bad("image_too_large", str(exc))
        if isinstance(exc, UnidentifiedImageError):
            return bad("image_unreadable", "not an image Pillow can read")
        return bad("image_unreadable", f"the image does not decode: {exc}")
    if check.orientation in (5, 6, 7, 8):  # rotated 90 degrees: sides swap
        w, h = h, w
    if min(w, h) < min_side:
        return bad("image_too_small", f"{w}x{h} is smaller than the minimum side of {min_side} px")
    return check


def _extension(check: ImageCheck, reencoded_as: str | None) -> str:
    if reencoded_as:
        return ".jpg" if reencoded_as == "JPEG" else ".png"
    allowed = _FORMAT_EXTS[check.format]
    return check.src.suffix if check.src.suffix in allowed else allowed[0]


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system allows one: a folder of photos is not written out again
    (which, for a GB, also costs the upload right after it the disk's write-back). Nothing writes
    into the prepared folder's images, and a source edited in place later fails the sha256 check
    on the box by name instead of shipping something else."""
    try:
        os.link(src, dest)
    except OSError:  # another file system, or a file we may read but not link
        shutil.copyfile(src, dest)


def write_image(check: ImageCheck, stem: str, folder: Path) -> Written:
    """Move or copy the image as it is, or re-encode it when orientation or mode need a repair."""
    src = check.src
    repairs: list[Repair] = []
    needs_turn = check.orientation not in (0, 1)
    needs_mode = check.mode not in _KEEP_MODES
    if not (needs_turn or needs_mode):
        name = stem + _extension(check, None)
        if name.rsplit(".", 1)[-1] != src.suffix.lstrip(".") and src.suffix in IMAGE_EXTS:
            repairs.append(
                Repair(code="extension_fixed", path=src.display, message=f"the file is {check.format}; saved as {name}")
            )
        dest = folder / name
        if src.owned:
            os.replace(src.path, dest)
        else:
            _link_or_copy(src.path, dest)
        return Written(name, check.sha256, src.size, repairs)

    with Image.open(src.path) as opened:
        im: Image.Image = opened
        im.load()
        if needs_turn:
            im = ImageOps.exif_transpose(im)
            repairs.append(
                Repair(code="exif_rotated", path=src.display, message=f"applied EXIF orientation {check.orientation}")
            )
        if needs_mode:
            if check.alpha_used:
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                im = flat
                repairs.append(
                    Repair(
                        code="alpha_flattened",
                        path=src.display,
                        message="transparent areas put on white (training needs RGB)",
                    )
                )
            else:
                repairs.append(Repair(code="converted_rgb", path=src.display, message=f"converted {check.mode} to RGB"))
                im = im.convert("RGB")
        # JPEG stays JPEG (high quality); PNG and WebP become lossless PNG
        fmt = "JPEG" if check.format in ("JPEG", "MPO") else "PNG"
        buf = io.BytesIO()
        if fmt == "JPEG":
            im.save(buf, "JPEG", quality=95, subsampling=0)
        else:
            im.save(buf, "PNG", compress_level=3)
    data = buf.getvalue()
    name = stem + _extension(check, fmt)
    (folder / name).write_bytes(data)
    return Written(name, hashlib.sha256(data).hexdigest(), len(data), repairs)


# --- captions ---------------------------------------------------------------------------------


def decode_caption(data: bytes) -> tuple[str | None, list[str]]:
    """(text, notes). text is None when it is not UTF-8; notes say what was normalised."""
    notes: list[str] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
            notes.append("re-encoded from UTF-16 to UTF-8")
        except UnicodeDecodeError:
            return None, notes
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, notes
        if data.startswith(b"\xef\xbb\xbf"):
            notes.append("removed the byte-order mark")
    if "\x00" in text:
        return None, notes
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        notes.append("Windows line endings made Unix")
    return text.strip(), notes


def _key(parts: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """Pairing key: folder and stem, case-insensitive (`IMG_1.JPG` pairs with `img_1.txt`)."""
    return tuple(p.casefold() for p in parts[:-1]), PurePosixPath(parts[-1]).stem.casefold()


def _json_captions(src: SourceFile) -> tuple[dict[str, str], Problem | None]:
    """Captions from the earlier system's dataset_info.json, keyed by casefolded relative path.

    Accepted shapes: {"img.jpg": "caption"}, {"img.jpg": {"caption": ...}} (ai-toolkit's own),
    a list of {"file"|"file_name"|"image"|"path": ..., "caption"|"text"|"prompt": ...}, or either
    of those under a top-level "images", "files", "items", "captions" or "data" key.
    """

    def problem(why: str) -> tuple[dict[str, str], Problem]:
        return {}, Problem(code="caption_source_invalid", path=src.display, message=why)

    if src.size > 16 * 1024 * 1024:
        return problem("dataset_info.json is larger than 16 MiB")
    try:
        doc: Any = json.loads(src.path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return problem(f"dataset_info.json is not valid UTF-8 JSON: {exc}")
    if isinstance(doc, dict):
        for wrapper in ("images", "files", "items", "captions", "data"):
            if wrapper in doc and isinstance(doc[wrapper], dict | list):
                doc = doc[wrapper]
                break
    pairs: list[tuple[Any, Any]] = []
    if isinstance(doc, dict):
        pairs = list(doc.items())
    elif isinstance(doc, list):
        for item in doc:
            if isinstance(item, dict):
                file = next((item[k] for k in ("file", "file_name", "filename", "image", "path") if k in item), None)
                pairs.append((file, item))
    out: dict[str, str] = {}
    for file, value in pairs:
        if isinstance(value, dict):
            value = next((value[k] for k in ("caption", "text", "prompt") if k in value), None)
        if isinstance(file, str) and isinstance(value, str):
            key = "/".join(p for p in file.replace("\\", "/").split("/") if p not in ("", "."))
            out[key.casefold()] = value
    if not out:
        return problem("dataset_info.json holds no recognisable {image: caption} entries")
    return out, None


# --- the whole pass ---------------------------------------------------------------------------


def run_qa(intake: Intake, folder: Path, settings: Settings, trigger: str | None) -> QAResult:
    res = QAResult()
    for display in intake.unsupported:
        res.problems.append(
            Problem(
                code="unsupported_format",
                path=display,
                message="ai-toolkit only trains on .jpg .jpeg .png .webp; convert it",
            )
        )
    for display in intake.unknown:
        res.problems.append(
            Problem(
                code="unknown_file", path=display, message="not an image or caption: ignored", severity=Severity.WARNING
            )
        )

    images = sorted((f for f in intake.files if f.suffix in IMAGE_EXTS), key=lambda f: f.parts)
    captions: dict[tuple[tuple[str, ...], str], list[SourceFile]] = {}
    jsons: list[SourceFile] = []
    for f in intake.files:
        if f.name.casefold() == CAPTION_JSON:
            jsons.append(f)
        elif f.suffix == CAPTION_EXT:
            captions.setdefault(_key(f.parts), []).append(f)

    json_maps: list[tuple[tuple[str, ...], dict[str, str]]] = []
    for j in sorted(jsons, key=lambda f: f.parts):
        mapping, problem = _json_captions(j)
        if problem:
            res.problems.append(problem)
        json_maps.append((tuple(p.casefold() for p in j.parts[:-1]), mapping))

    # phase 1: decode and hash every image, in parallel
    n = workers(settings)
    checks = _pmap(lambda f: inspect_image(f, settings.dataset_max_pixels, settings.dataset_min_side), images, n)
    kept: list[ImageCheck] = []
    # captions of rejected or duplicate images are not orphans: their image was reported instead
    used_captions: set[tuple[tuple[str, ...], str]] = set()
    first_by_hash: dict[str, str] = {}
    for check in checks:
        if check.problem:
            res.problems.append(check.problem)
            used_captions.add(_key(check.src.parts))
            continue
        if check.sha256 in first_by_hash:
            used_captions.add(_key(check.src.parts))
            res.duplicates += 1
            res.repairs.append(
                Repair(
                    code="duplicate_removed",
                    path=check.src.display,
                    message=f"same bytes as {first_by_hash[check.sha256]}; dropped",
                )
            )
            continue
        first_by_hash[check.sha256] = check.src.display
        kept.append(check)

    # phase 2: write the kept images under unique safe stems
    names = NameAllocator()
    stems = [names.take(flat_stem(c.src.parts)) for c in kept]
    folder.mkdir(parents=True, exist_ok=True)
    written = _pmap(lambda pair: write_image(pair[0], pair[1], folder), list(zip(kept, stems, strict=True)), n)
    for w in written:
        res.repairs.extend(w.repairs)
        res.files.append(ManifestFile(path=w.name, size=w.size, sha256=w.sha256))
    res.images = len(written)

    for check, stem, w in zip(kept, stems, written, strict=True):
        key = _key(check.src.parts)
        text = _caption_for(check.src, key, captions, json_maps, used_captions, res)
        if text is _REPORTED:
            continue
        if text is None:
            text = _missing(check.src, stem, folder / w.name, settings, trigger, res)
            if text is None:
                continue
        else:
            res.captioned += 1
            text = _with_trigger(text, check.src.display, trigger, res)
        _write_caption(folder, stem, text, res)

    for key, files in sorted(captions.items()):
        if key not in used_captions:
            for f in files:
                res.problems.append(
                    Problem(
                        code="orphan_caption",
                        path=f.display,
                        severity=Severity.WARNING,
                        message="no image with this name: ignored",
                    )
                )

    if res.images == 0:
        res.problems.append(Problem(code="no_images", message="no usable .jpg .jpeg .png or .webp image found"))
    elif res.images < settings.dataset_min_images:
        res.problems.append(
            Problem(
                code="too_few_images",
                message=(f"{res.images} usable images; at least {settings.dataset_min_images} are needed"),
            )
        )
    return res


def _caption_for(
    src: SourceFile,
    key: tuple[tuple[str, ...], str],
    captions: dict[tuple[tuple[str, ...], str], list[SourceFile]],
    json_maps: list[tuple[tuple[str, ...], dict[str, str]]],
    used: set[tuple[tuple[str, ...], str]],
    res: QAResult,
) -> str | None:
    """The image's own caption: its .txt first, then a dataset_info.json entry. None when absent."""
    files = captions.get(key)
    if files:
        used.add(key)
        cap = files[0]
        if cap.size > MAX_CAPTION_BYTES:
            res.problems.append(
                Problem(
                    code="caption_too_long", path=cap.display, message=f"caption file is over {MAX_CAPTION_BYTES} bytes"
                )
            )
            return _REPORTED
        text, notes = decode_caption(cap.path.read_bytes())
        if text is None:
            res.problems.append(
                Problem(
                    code="caption_encoding",
                    path=cap.display,
                    message=("caption is not UTF-8 text (an old Windows or Mac encoding?); save it as UTF-8"),
                )
            )
            return _REPORTED  # do not also call it missing
        if notes:
            res.repairs.append(Repair(code="caption_normalised", path=cap.display, message="; ".join(notes)))
        if text:
            return text
    folder_parts = tuple(p.casefold() for p in src.parts[:-1])
    for base, mapping in json_maps:
        if folder_parts[: len(base)] != base:
            continue
        rel = "/".join(p.casefold() for p in src.parts[len(base) :])
        text = mapping.get(rel) or mapping.get(src.name.casefold())
        if text and text.strip():
            res.repairs.append(
                Repair(code="caption_from_json", path=src.display, message="caption taken from dataset_info.json")
            )
            return text.replace("\r\n", "\n").strip()
    return None


def _missing(
    src: SourceFile, stem: str, image: Path, settings: Settings, trigger: str | None, res: QAResult
) -> str | None:
    policy = settings.missing_captions
    if policy is MissingCaptionPolicy.TRIGGER and trigger:
        res.filled += 1
        res.repairs.append(
            Repair(
                code="caption_filled",
                path=src.display,
                message=f"no caption: filled with {TRIGGER_TOKEN} (the trigger word)",
            )
        )
        return TRIGGER_TOKEN
    if policy is MissingCaptionPolicy.CAPTIONER:
        res.to_caption.append((stem, src.display, image))
        return None
    why = (
        "no caption, and no trigger word to fill it with (pass --trigger)"
        if policy is MissingCaptionPolicy.TRIGGER
        else "no caption (captions are required)"
    )
    res.problems.append(Problem(code="missing_caption", path=src.display, message=why))
    return None


def _with_trigger(text: str, display: str, trigger: str | None, res: QAResult) -> str:
    if not text:
        return text
    if trigger is None:
        if TRIGGER_TOKEN in text:
            res.problems.append(
                Problem(
                    code="trigger_placeholder",
                    path=display,
                    severity=Severity.WARNING,
                    message=f"caption uses {TRIGGER_TOKEN} but no trigger word was given",
                )
            )
        return text
    if trigger in text or TRIGGER_TOKEN in text:
        return text
    # ai-toolkit would put the trigger in front at training time; make it explicit and visible
    res.repairs.append(
        Repair(
            code="trigger_added", path=display, message=f"caption lacked the trigger word: {TRIGGER_TOKEN} put in front"
        )
    )
    return f"{TRIGGER_TOKEN}, {text}"


def _write_caption(folder: Path, stem: str, text: str, res: QAResult) -> None:
    data = text.encode("utf-8")
    name = stem + CAPTION_EXT
    (folder / name).write_bytes(data)
    res.files.append(ManifestFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
