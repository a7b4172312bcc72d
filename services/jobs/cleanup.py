"""A job's photos leave this host at its end (review H1): the cleaned dataset, leftovers of the
intake and the sample images are deleted at every terminal state (done, failed, cancelled, declined,
expired, dry run). The manifest (names and hashes) stays for the record; `collect/` stays too: it
holds a LoRA still waiting for R2."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
DATASET_DIR = "dataset"  # services.dataset.prepare.DATASET_DIR (not imported: the store imports this)
_DROPPED = (DATASET_DIR, ".raw", "samples")


def _drop(job_dir: Path) -> None:
    for name in _DROPPED:
        path = job_dir / name
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


async def drop_job_files(job_dir: Path) -> None:
    """Delete the dataset, intake leftovers and samples of the job whose work folder is `job_dir`."""
    try:
        await asyncio.to_thread(_drop, job_dir)
    except OSError as exc:  # never fails a transition; the next start's sweep has no need of it
        log.warning("could not delete the dataset in %s: %s", job_dir, exc)


async def drop_dataset_of(dataset_dir: str | None) -> None:
    """The same, found from a job's `dataset_dir` (always `<work>/<job>/dataset`, never a user's folder)."""
    if not dataset_dir:
        return
    path = Path(dataset_dir)
    if path.name != DATASET_DIR:
        log.warning("not deleting %s: not a job's dataset folder", path)
        return
    await drop_job_files(path.parent)
