"""Issue 13 on this host's own files: datasets leave at every end (H1), intake refuses on a nearly
full disk (H1), the store and the work folder are the operator's alone and their paths absolute
(L5), an exposed SSH key is reported (L5), and one bad row never breaks recovery (L3)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from services.jobs import Job, JobState, JobStore
from services.jobs.intake import decline, draft
from services.jobs.worker import Worker
from services.localfiles import key_permission_problem
from services.settings import Settings, load_settings
from tests.services.jobs.conftest import Recorder, dataset_zip

S = JobState


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return load_settings(db_path=str(tmp_path / "db" / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                         dataset_min_images=3, min_free_disk_gb=0, **extra)


async def _draft(store: JobStore, settings: Settings, n: int = 3) -> Any:
    return await draft(store, settings, source=dataset_zip(n, 256), user_id="u", name="n", trigger="sks")


@pytest.mark.parametrize("end", ["decline", "dry run", "expired", "failed"])
async def test_the_dataset_is_deleted_when_a_job_ends(tmp_path: Path, end: str) -> None:
    settings = _settings(tmp_path)
    async with JobStore(settings.db_path) as store:
        d = await _draft(store, settings)
        assert d.ok, d.message
        dataset = Path(d.job.dataset_dir)
        assert any(dataset.iterdir())
        (dataset.parent / "samples").mkdir()
        (dataset.parent / "samples" / "s.png").write_bytes(b"x")
        if end in ("decline", "dry run"):
            await decline(store, d.job.id, end)
        elif end == "expired":
            await store.transition(d.job.id, S.CANCELLED, "not confirmed in time; nothing was rented")
        else:
            await store.transition(d.job.id, S.QUEUED, "confirmed")
            await store.transition(d.job.id, S.FAILED, "x")
    assert not dataset.exists() and not (dataset.parent / "samples").exists()
    assert (dataset.parent / "manifest.json").exists()  # the record stays


async def test_an_unready_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    async with JobStore(settings.db_path) as store:
        d = await _draft(store, settings, n=1)  # too few images
    assert not d.ok and d.job.state == S.FAILED
    assert not (settings.work_dir / d.job.id / "dataset").exists()


async def test_intake_refuses_on_a_nearly_full_disk(tmp_path: Path) -> None:
    settings = _settings(tmp_path).model_copy(update={"min_free_disk_gb": 1e9})
    async with JobStore(settings.db_path) as store:
        d = await _draft(store, settings)
    assert not d.ok and d.job.failure_kind == "disk_full" and "disk" in d.message
    assert not (settings.work_dir / d.job.id).exists()


async def test_store_and_work_folder_are_private_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    key = tmp_path / "id_ed25519"
    key.write_text("k")
    os.chmod(key, 0o644)
    settings = load_settings(db_path="db/jobs.sqlite3", work_dir="work", vastai_ssh_key_path=str(key),
                             vastai_api_key="x")
    assert settings.db_path == tmp_path / "db" / "jobs.sqlite3" and settings.work_dir.is_absolute()
    async with JobStore(settings.db_path) as store:
        assert stat.S_IMODE(settings.db_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(settings.db_path.parent.stat().st_mode) == 0o700
        worker = Worker(store, settings, Recorder(), reaper=False)
        with caplog.at_level(logging.WARNING):
            await worker.start(recover=False)
        await worker.stop()
    assert stat.S_IMODE(settings.work_dir.stat().st_mode) == 0o700
    assert any("readable by others" in r.getMessage() for r in caplog.records)
    os.chmod(key, 0o600)
    assert key_permission_problem(key) is None


async def test_one_bad_row_never_breaks_recovery(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    async with JobStore(settings.db_path) as store:
        good = await store.create(Job(user_id="u"))
        await store.transition(good.id, S.QUEUED, "confirmed")
        bad = await store.create(Job(user_id="u"))
        await store.db.execute("UPDATE jobs SET doc = ?, state = 'queued' WHERE id = ?",
                               ('{"id": "' + bad.id + '", "state": "from-the-future"}', bad.id))
        assert [j.id for j in await store.live()] == [good.id]
        worker = Worker(store, settings, Recorder(), reaper=False)
        assert await worker.recover() == [good.id]
