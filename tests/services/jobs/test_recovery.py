"""Crash and restart: a SIGKILLed process's job is re-attached and finishes; a rental made before
its id was persisted is adopted through its label; the reaper destroys what no live job owns."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from services.jobs import Job, JobState, JobStore
from services.jobs.events import Progress
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.world import SimWorld


async def _wait(store: JobStore, job_id: str, pred: object, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await store.require(job_id)
        if pred(job):  # type: ignore[operator]
            return job
        assert time.monotonic() < deadline, f"timed out in {job.state}: {job.reason}"
        await asyncio.sleep(0.1)


async def test_sigkilled_process_is_recovered_and_the_job_finishes(world: SimWorld, tmp_path: Path,
                                                                   recorder: Recorder) -> None:
    world.box.set_sec_per_step(0.05)
    zip_path = tmp_path / "ds.zip"
    zip_path.write_bytes(dataset_zip())
    env = {**os.environ, **world.env()}
    proc = subprocess.Popen(
        ["lorabot", "train", str(zip_path), "--name", "killme", "--trigger", "sks", "--steps", "200", "--yes",
         "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    settings = world.settings()
    try:
        async with JobStore(settings.db_path) as store:
            deadline = time.monotonic() + 60
            while not await store.find(limit=1):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                await asyncio.sleep(0.1)
            (job,) = await store.find(limit=1)
            job = await _wait(store, job.id, lambda j: j.state == JobState.TRAINING and j.step >= 20)
            os.killpg(proc.pid, signal.SIGKILL)  # no cleanup, no lease release: a real crash
            proc.wait(10)
            killed_at = (await store.require(job.id)).step
            assert (await store.require(job.id)).state == JobState.TRAINING

            worker = Worker(store, settings, recorder)
            await worker.start()
            try:
                done = await _wait(store, job.id, lambda j: j.state.terminal, timeout=90)
            finally:
                await worker.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done.state == JobState.SUCCEEDED, done.reason
    assert done.step == 200 and done.attempt == 1  # the same box, not a retry
    # progress went on from the stored log offset: no replay from step 0
    steps = [e.step for e in recorder.of(Progress)]  # type: ignore[attr-defined]
    assert steps and min(steps) >= killed_at
    assert world.vast.live_instances() == []


async def test_rental_made_before_its_id_was_stored_is_adopted(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings()
    async with JobStore(settings.db_path) as store:
        async with VastClient.from_settings(settings) as vast:
            d = await draft(store, settings, source=dataset_zip(), user_id="u", name="adopt", trigger="sks",
                            overrides={"steps": 10, "save_every": 5, "sample_every": 0}, vast=vast)
        job = await store.transition(d.job.id, JobState.QUEUED, "confirmed")
        label = f"{settings.label_prefix}{job.id}"
        await store.transition(job.id, JobState.RENTING, "renting", label=label)
        # the process rented, then died before writing the instance id
        world.vast.rent_outside(label)
        worker = Worker(store, settings, recorder)
        await worker.start()
        try:
            done = await _wait(store, job.id, lambda j: j.state.terminal, timeout=90)
        finally:
            await worker.stop()
    assert done.state == JobState.SUCCEEDED, done.reason
    assert world.vast.live_instances() == []


async def test_cancel_finds_a_rental_whose_id_was_never_stored(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings()
    async with JobStore(settings.db_path) as store:
        job = await store.create(Job(user_id="u"))
        await store.transition(job.id, JobState.QUEUED, "confirmed")
        label = f"{settings.label_prefix}{job.id}"
        await store.transition(job.id, JobState.RENTING, "renting", label=label)
        world.vast.rent_outside(label)  # rented; the answer (and the process) was lost
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start(recover=False)
        try:
            result = await worker.cancel(job.id, by="operator")
        finally:
            await worker.stop()
    assert result.job.state == JobState.CANCELLED and result.job.instance_gone_at is not None
    assert world.vast.live_instances() == []


async def test_a_forgotten_launch_box_is_destroyed_after_the_max_runtime(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings(max_runtime_s=1.0)
    async with JobStore(settings.db_path) as store:
        job = await store.create(Job(user_id="op", train=False))
        label = f"{settings.label_prefix}{job.id}"
        for dst in (JobState.QUEUED, JobState.RENTING, JobState.WAITING_READY, JobState.UPLOADING):
            await store.transition(job.id, dst, "x", label=label)
        iid = world.vast.rent_outside(label)
        await store.transition(job.id, JobState.PREPARED, "shipped", instance_id=iid, rented_at=time.time())
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start(recover=False)
        try:
            assert await worker.recover() == []  # young: the operator's box is left alone
            await asyncio.sleep(1.2)
            assert await worker.recover() == [job.id]
            done = await _wait(store, job.id, lambda j: j.state.terminal)
        finally:
            await worker.stop()
    assert done.state == JobState.CANCELLED and "unused" in done.reason
    assert world.vast.live_instances() == []
