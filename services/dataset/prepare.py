"""`prepare`: from an upload (zip path, folder, zip bytes or https URL) to a checked, cleaned,
flat dataset folder with its report and manifest. All CPU work runs in threads."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
from pathlib import Path
from typing import Protocol

from services.dataset.archive import Intake, Limits, read_folder, read_zip
from services.dataset.errors import DatasetError, UnreadableArchiveError
from services.dataset.fetch import fetch_url
from services.dataset.manifest import Manifest, ManifestFile
from services.dataset.qa import QAResult, run_qa
from services.dataset.report import DatasetReport, PreparedDataset, Problem, Repair, Severity
from services.settings import Settings

DATASET_DIR = "dataset"  # the cleaned flat folder inside work_dir
_RAW_DIR = ".raw"  # extracted entries, removed when done
_DOWNLOAD = "download.zip"
_TRIGGER = re.compile(r"^[^\s\[\]]{1,64}$")


class Captioner(Protocol):
    """Writes a caption for an image (interface only; a real captioner is a later step)."""

    async def caption(self, image: Path) -> str: ...


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_bytes=settings.dataset_max_bytes,
        max_files=settings.dataset_max_files,
        max_file_bytes=settings.dataset_max_file_bytes,
        max_ratio=settings.dataset_max_ratio,
    )


def _is_url(source: str) -> bool:
    return "://" in source[:16]


def _check_trigger(trigger: str | None) -> str | None:
    if trigger is None:
        return None
    trigger = trigger.strip()
    if not _TRIGGER.match(trigger):
        raise DatasetError("bad_trigger", "the trigger word must be one word of 1-64 characters without brackets")
    return trigger


async def prepare(
    source: str | Path | bytes,
    work_dir: Path,
    settings: Settings,
    trigger: str | None = None,
    *,
    captioner: Captioner | None = None,
) -> PreparedDataset:
    """Take in, check and clean a dataset. Raises DatasetError when the input is rejected;
    a readable dataset with problems comes back with `report.ready == False`."""
    trigger = _check_trigger(trigger)
    folder = work_dir / DATASET_DIR
    raw = work_dir / _RAW_DIR
    await asyncio.to_thread(_clear, folder, raw)
    limits = limits_from(settings)
    try:
        if isinstance(source, str) and _is_url(source):
            downloaded = await fetch_url(source, raw / _DOWNLOAD, settings, settings.dataset_max_bytes)
            intake = await asyncio.to_thread(read_zip, downloaded, raw / "entries", limits)
        elif isinstance(source, bytes):
            intake = await asyncio.to_thread(read_zip, source, raw / "entries", limits)
        else:
            intake = await asyncio.to_thread(_read_path, Path(source), raw / "entries", limits)
        qa = await asyncio.to_thread(run_qa, intake, folder, settings, trigger)
        if qa.to_caption:
            await _run_captioner(qa, folder, captioner)
    finally:
        await asyncio.to_thread(shutil.rmtree, raw, True)
    manifest = Manifest(
        files=qa.files,
        images=qa.images,
        captions=sum(f.path.endswith(".txt") for f in qa.files),
        trigger_word=trigger,
    )
    report = _report(intake, qa, manifest, trigger)
    return PreparedDataset(report=report, folder=folder, manifest=manifest)


def _clear(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)


def _read_path(path: Path, raw: Path, limits: Limits) -> Intake:
    if path.is_dir():
        return read_folder(path, limits)
    if not path.is_file():
        raise UnreadableArchiveError("source_unreadable", f"no such file or folder: {path}")
    return read_zip(path, raw, limits)


async def _run_captioner(qa: QAResult, folder: Path, captioner: Captioner | None) -> None:
    for stem, display, image in qa.to_caption:
        if captioner is None:
            qa.problems.append(
                Problem(code="missing_caption", path=display, message="no caption, and no captioner is configured")
            )
            continue
        text = (await captioner.caption(image)).strip()
        if not text:
            qa.problems.append(Problem(code="missing_caption", path=display, message="the captioner gave nothing"))
            continue
        data = text.encode("utf-8")
        name = f"{stem}.txt"
        await asyncio.to_thread((folder / name).write_bytes, data)
        qa.files.append(ManifestFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        qa.captioned += 1
        qa.repairs.append(Repair(code="caption_generated", path=display, message="caption written by the captioner"))


def _report(intake: Intake, qa: QAResult, manifest: Manifest, trigger: str | None) -> DatasetReport:
    repairs = list(qa.repairs)
    nested = sum(len(f.parts) > 1 for f in intake.files)
    if nested:
        repairs.append(Repair(code="flattened", message=f"{nested} files from sub-folders moved to the top level"))
    report = DatasetReport(
        ready=not any(p.severity is Severity.ERROR for p in qa.problems),
        images=qa.images,
        captioned=qa.captioned,
        filled=qa.filled,
        problems=qa.problems,
        repairs=repairs,
        ignored=intake.ignored,
        duplicates=qa.duplicates,
        trigger_word=trigger,
        total_bytes=manifest.total_bytes,
    )
    report.summary = report.render_summary()
    return report


def rejected_report(error: DatasetError) -> DatasetReport:
    """The report of an input that was refused outright (for uniform --json output)."""
    problem = Problem(code=error.code, path=error.path, message=error.message)
    report = DatasetReport(ready=False, images=0, captioned=0, problems=[problem])
    report.summary = f"rejected: {error.message}"
    return report
