"""Issue 13, "never lose the result": R2 down at collect (the review's C4). The LoRA is made safe
before its box is destroyed, the job is never retried on a new machine, never announced as failed,
and the LoRA arrives once R2 is back, also across a restart of the bot."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from services.jobs import Job, JobState, JobStore
from services.jobs.events import Failed, JobEvent, StateChanged
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.storage import SHA256_META
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.gate import Gate, gate
from tests.sim.world import SimWorld

S = JobState


class CloseAtCollect(Recorder):
    """R2 goes down the moment training ends."""

    def __init__(self, g: Gate) -> None:
        super().__init__()
        self.gate = g

    async def notify(self, job: Job, event: JobEvent) -> None:
        await super().notify(job, event)
        if isinstance(event, StateChanged) and event.state == S.COLLECTING:
            self.gate.close_gate()


async def _until(store: JobStore, job_id: str, check: Any, timeout: float = 90) -> Job:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await store.require(job_id)
        if check(job):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"stuck: {job.state} {job.reason}"
        await asyncio.sleep(0.05)


async def test_r2_down_at_collect_keeps_the_lora_and_delivers_it_after_a_restart(
    world: SimWorld, tmp_path: Path
) -> None:
    with gate(world.s3.endpoint_url) as g:
        settings = world.settings(r2_endpoint_url=g.url, collect_retry_min_s=0.2, collect_retry_max_s=0.5)
        recorder = CloseAtCollect(g)
        store = await JobStore(settings.db_path).open()
        worker = Worker(store, settings, recorder)
        await worker.start()
        try:
            async with VastClient.from_settings(settings) as vast:
                d = await draft(store, settings, source=dataset_zip(3, 256), user_id="u", name="keep",
                                trigger="sks", overrides={"steps": 20, "save_every": 10, "sample_every": 0},
                                vast=vast)
            assert d.ok, d.message
            await worker.submit(d.job.id)
            # R2 is down: the LoRA comes here over SSH, verified, and only then the box goes
            job = await _until(store, d.job.id, lambda j: j.instance_gone_at is not None or j.state.terminal)
            assert job.state == S.COLLECTING, (job.state, job.reason)
            assert job.local_lora and Path(job.local_lora).exists()
            assert hashlib.sha256(Path(job.local_lora).read_bytes()).hexdigest() == job.local_lora_sha256
            assert world.vast.live_instances() == []
            assert g.refused > 0  # R2 really was asked, and really was down
            await asyncio.sleep(0.5)  # a few upload retries against the closed gate
            assert (await store.require(d.job.id)).state == S.COLLECTING
            # the bot restarts while R2 is still down; the new process resumes the upload
            await worker.stop()
            worker = Worker(store, settings, recorder)
            await worker.start()
            await asyncio.sleep(0.3)
            g.open_gate()
            job = await _until(store, d.job.id, lambda j: j.state.terminal)
        finally:
            await worker.stop()
            await store.close()
    assert job.state == S.SUCCEEDED, job.reason
    assert job.attempt == 1 and job.local_lora is None  # never rented again; the local copy cleaned up
    assert recorder.of(Failed) == []  # nobody was told it failed
    assert job.lora_key
    obj = world.s3.client().get_object(Bucket=world.s3.bucket, Key=job.lora_key)
    body = obj["Body"].read()
    assert body and obj["Metadata"][SHA256_META] == hashlib.sha256(body).hexdigest()
    assert world.vast.live_instances() == []


async def test_a_box_gone_before_the_lora_was_saved_fails_once_and_never_rents_again(
    world: SimWorld, tmp_path: Path
) -> None:
    """The review's loop: collecting, the box gone, nothing saved. The old code destroyed, posted
    "retrying", hit COLLECTING -> RENTING (forbidden) and did it again at every re-adoption."""
    settings = world.settings()
    recorder = Recorder()
    async with JobStore(settings.db_path) as store:
        job = await store.create(Job(user_id="u", name="gone", dataset_dir=str(tmp_path / "w" / "dataset")))
        for dst in (S.QUEUED, S.RENTING, S.WAITING_READY, S.UPLOADING, S.TRAINING, S.COLLECTING):
            job = await store.transition(job.id, dst, "x")
        await store.update(job.id, instance_id=4242, instance_gone_at=1.0, rented_at=None)
        for _ in range(2):  # a restart re-adopts it: still one post, still no rental
            worker = Worker(store, settings, recorder, reaper=False)
            await worker.start()
            try:
                job = await _until(store, job.id, lambda j: j.state.terminal, timeout=30)
            finally:
                await worker.stop()
    assert job.state == S.FAILED and job.failure_kind == "collect", job.reason
    assert job.attempt == 1
    failed = recorder.of(Failed)
    assert len(failed) == 1 and not failed[0].retrying  # type: ignore[attr-defined]
    assert world.vast.live_instances() == []


async def test_a_kept_copy_that_vanished_fails_instead_of_retrying_forever(world: SimWorld, tmp_path: Path) -> None:
    settings = world.settings(collect_retry_min_s=0.1, collect_retry_max_s=0.1)
    recorder = Recorder()
    async with JobStore(settings.db_path) as store:
        job = await store.create(Job(user_id="u", name="lost"))
        for dst in (S.QUEUED, S.RENTING, S.WAITING_READY, S.UPLOADING, S.TRAINING, S.COLLECTING):
            job = await store.transition(job.id, dst, "x")
        await store.update(job.id, instance_id=4243, instance_gone_at=1.0, rented_at=None,
                           local_lora=str(tmp_path / "nowhere.safetensors"), local_lora_sha256="0" * 64)
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start()
        try:
            job = await _until(store, job.id, lambda j: j.state.terminal, timeout=20)
        finally:
            await worker.stop()
    assert job.state == S.FAILED and "kept copy" in job.reason
    assert len(recorder.of(Failed)) == 1
