"""Queue, concurrency limits and money limits of the worker, on the simulator."""

from __future__ import annotations

import asyncio

import pytest

from services.jobs import Job, JobState, JobStore
from services.jobs.errors import JobRefused
from services.jobs.events import Queued
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.world import SimWorld


async def _draft(store: JobStore, worker: Worker, user: str, steps: int = 30) -> str:
    async with VastClient.from_settings(worker.settings) as vast:
        d = await draft(store, worker.settings, source=dataset_zip(3, 256), user_id=user, name=f"{user} lora",
                        trigger="sks", overrides={"steps": steps, "save_every": 1000, "sample_every": 0}, vast=vast)
    assert d.ok, d.message
    return d.job.id


async def test_per_user_and_global_concurrency_with_queue_positions(world: SimWorld, recorder: Recorder) -> None:
    world.box.set_sec_per_step(0.05)
    settings = world.settings(max_concurrent_jobs=2, max_jobs_per_user=1)
    async with JobStore(settings.db_path) as store:
        worker = Worker(store, settings, recorder)
        await worker.start()
        try:
            a1 = await _draft(store, worker, "alice")
            a2 = await _draft(store, worker, "alice")
            b1 = await _draft(store, worker, "bob")
            assert await worker.submit(a1) == 1
            assert await worker.submit(a2) >= 1
            await worker.submit(b1)
            await asyncio.sleep(0.5)
            running = set(worker.running())
            # alice's second job waits for her first; bob's passes it in the queue
            assert running == {a1, b1}
            assert worker.queue_position(a2) == 1
            assert any(isinstance(e, Queued) for jid, e in recorder.events if jid == a2)
            jobs = [await worker.wait(j, timeout=120) for j in (a1, a2, b1)]
        finally:
            await worker.stop()
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3
    assert world.vast.live_instances() == []


async def test_budgets_refuse_new_jobs_with_a_clear_message(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings(user_daily_budget=1.0, global_daily_budget=2.0)
    async with JobStore(settings.db_path) as store:
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start(recover=False)
        try:
            # money already spent today by this user
            await store.create(Job(user_id="carol", cost_usd=0.95, state=JobState.SUCCEEDED))
            job_id = await _draft(store, worker, "carol")
            job = await store.require(job_id)
            await store.update(job_id, quote={**job.quote, "cost_high": 0.2})
            with pytest.raises(JobRefused, match="daily budget"):
                await worker.submit(job_id)
            assert (await store.require(job_id)).state == JobState.AWAITING_CONFIRMATION
            # the server-wide cap counts everyone
            await store.create(Job(user_id="dave", cost_usd=1.9, state=JobState.SUCCEEDED))
            other = await _draft(store, worker, "erin")
            with pytest.raises(JobRefused, match="server"):
                await worker.submit(other)
        finally:
            await worker.stop()
    assert world.vast.live_instances() == []
