"""Queue, concurrency limits and money limits of the worker, on the simulator."""

from __future__ import annotations

import asyncio
import sqlite3

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


class _SlowClaims(JobStore):
    """A store whose lease writes take a while, as they do on a busy disk: it widens the window in
    which the scheduler and a warm machine's wait for a successor both reach for the same queued job."""

    async def claim(self, job_id: str, owner: str, lease_s: float = 60.0) -> bool:
        await asyncio.sleep(0.2)
        return await super().claim(job_id, owner, lease_s)


async def test_the_scheduler_and_a_warm_machine_never_both_take_one_queued_job(
        world: SimWorld, recorder: Recorder) -> None:
    # CI caught this as a crash in a finished job's handover (list.remove: x not in list): both sides
    # claimed the job under the worker's one owner, so both won, and one would also have launched it twice
    settings = world.settings(max_concurrent_jobs=1)
    async with _SlowClaims(settings.db_path) as store:
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start(recover=False)
        try:
            job_id = await _draft(store, worker, "alice")
            await worker.submit(job_id)  # wakes the scheduler, which starts its (slow) claim
            await asyncio.sleep(0.05)
            taken = await worker._take_queued(lambda _job: True)
            await asyncio.sleep(0.3)  # the scheduler's claim returns
            launched = job_id in worker.running()
            assert (taken is not None) != launched, "the job must go to exactly one of them"
            assert worker.queue_position(job_id) is None
            if taken is not None:
                worker._launch_warm(taken)  # as a handover would; the test only needs it driven
            done = await worker.wait(job_id, timeout=60)
        finally:
            await worker.stop()
    assert done.state == JobState.SUCCEEDED, done.reason
    assert world.vast.live_instances() == []


async def test_a_job_taken_for_a_warm_machine_is_not_queued_again_until_put_back(
        world: SimWorld, recorder: Recorder) -> None:
    # while a handover prepares the machine (seconds), the job is queued in the store and leased to this
    # worker: the lease loop's recover() must not queue it again, or the scheduler would rent for it too
    settings = world.settings()
    async with JobStore(settings.db_path) as store:
        worker = Worker(store, settings, recorder, reaper=False)  # not started: no scheduler takes jobs
        try:
            first = await _draft(store, worker, "alice")
            second = await _draft(store, worker, "bob")
            await worker.submit(first)
            await worker.submit(second)
            taken = await worker._take_queued(lambda _job: True)
            assert taken is not None and taken.id == first
            assert await worker.recover() == [] and worker.queue_position(first) is None
            await worker.submit(first)  # a second confirm does not queue it twice either
            assert worker.queue_position(first) is None
            worker._put_back(first)  # the handover failed before the job got the machine
            assert worker.queue_position(first) == 1 and worker.queue_position(second) == 2
        finally:
            await worker.stop()


class _LockedOnce(JobStore):
    """A store whose first lease write fails as SQLite does when another process holds the file."""

    failed = False

    async def claim(self, job_id: str, owner: str, lease_s: float = 60.0) -> bool:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database is locked")
        return await super().claim(job_id, owner, lease_s)


async def test_a_store_error_while_starting_a_job_leaves_it_queued_and_the_scheduler_alive(
        world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings()
    async with _LockedOnce(settings.db_path) as store:
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start(recover=False)
        try:
            job_id = await _draft(store, worker, "alice", steps=5)
            await worker.submit(job_id)
            done = await worker.wait(job_id, timeout=60)
        finally:
            await worker.stop()
    assert store.failed and done.state == JobState.SUCCEEDED, done.reason
    assert world.vast.live_instances() == []
