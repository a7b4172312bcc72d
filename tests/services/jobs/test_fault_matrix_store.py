"""Fault matrix, issue 13 (store and reaper side): each case ends with zero live instances of ours
in the Vast.ai emulator, and the result kept where there was one."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from services.jobs import Job, JobState, JobStore
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.settings import Settings
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.world import SimWorld

S = JobState


class DiskFullAtRent(JobStore):
    """The disk is full from the moment the rented instance's id is to be written (SQLITE_FULL) until
    two such writes have failed: the rent's, and the one a cleanup would make before destroying."""

    left = 2

    async def update(self, job_id: str, **fields: Any) -> Job:
        if self.left and "instance_id" in fields and fields["instance_id"] is not None:
            self.left -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return await super().update(job_id, **fields)


async def _run(store: JobStore, settings: Settings, recorder: Recorder, steps: int = 10) -> Job:
    worker = Worker(store, settings, recorder)
    await worker.start()
    try:
        async with VastClient.from_settings(settings) as vast:
            d = await draft(store, settings, source=dataset_zip(3, 256), user_id="u", name="m", trigger="sks",
                            overrides={"steps": steps, "save_every": 5, "sample_every": 0}, vast=vast)
        assert d.ok, d.message
        await worker.submit(d.job.id)
        return await asyncio.wait_for(worker.wait(d.job.id), 90)
    finally:
        await worker.stop()


async def test_disk_full_at_rent_destroys_the_instance(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings()
    store = DiskFullAtRent(settings.db_path)
    async with store:
        job = await _run(store, settings, recorder)
    assert store.left < 2  # the fault fired
    assert job.state == S.FAILED and job.failure_kind == "local_store", job.reason
    assert world.vast.live_instances() == []


async def test_a_second_installation_on_the_same_account_is_left_alone(world: SimWorld, recorder: Recorder) -> None:
    # the reaper runs all through the job, and takes unknown instances of ours at once
    settings = world.settings(reaper_interval_s=0.2, reaper_unknown_grace_s=0)
    prefix = settings.label_prefix
    staging = [world.vast.rent_outside(f"{prefix}zzzzzz-{n:08x}") for n in range(2)]  # another deployment
    by_hand = world.vast.rent_outside(f"{prefix}test")  # `lorabot rent --label lorabot-test`
    async with JobStore(settings.db_path) as store:
        job = await _run(store, settings, recorder, steps=20)
    assert job.state == S.SUCCEEDED and job.attempt == 1, job.reason  # ours was never reaped either
    assert job.lora_key
    assert {i["id"] for i in world.vast.live_instances()} == {*staging, by_hand}
    async with VastClient.from_settings(settings) as vast:
        for iid in (*staging, by_hand):
            await vast.destroy_instance(iid)
    assert world.vast.live_instances() == []
