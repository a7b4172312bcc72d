"""A graceful Worker.stop() leaves the job training on its box and releases its lease at once, so that
another process (the bot, `lorabot train --attach`, `lorabot cancel`) can take it without waiting for
the lease to expire."""

from __future__ import annotations

import asyncio

from services.jobs import JobState
from services.jobs.worker import Worker
from tests.services.jobs.conftest import Recorder
from tests.services.jobs.test_pipeline import Harness
from tests.sim.world import SimWorld


async def test_stop_releases_the_lease_and_another_worker_cancels(world: SimWorld, recorder: Recorder) -> None:
    world.box.set_sec_per_step(0.1)
    # a long lease: without the release, a second worker would have to wait it out
    async with Harness(world, recorder, lease_s=600.0) as h:
        job_id = await h.submit(steps=400)
        for _ in range(600):
            job = await h.store.require(job_id)
            if job.state == JobState.TRAINING and job.step > 0:
                break
            await asyncio.sleep(0.1)
        await h.worker.stop()
        job = await h.store.require(job_id)
        assert job.state == JobState.TRAINING and job.owner is None  # still on its box, nobody's
        assert len(world.vast.live_instances()) == 1

        other = Worker(h.store, h.settings, recorder, reaper=False, adopt=False)
        await other.start(recover=False)
        try:
            result = await asyncio.wait_for(other.cancel(job_id, by="tester"), 60)
        finally:
            await other.stop()
        assert result.job.state == JobState.CANCELLED and result.destroyed_instance_id == job.instance_id
        assert world.vast.live_instances() == []
