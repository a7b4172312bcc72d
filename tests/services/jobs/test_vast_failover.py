"""Issue 14, whole jobs: what the real Vast.ai does to a rental, on the simulator.

The emulator's delays are the real ones on a compressed clock (`time_scale`); the settings that
answer them (create timeout, label watch, unknown grace) shrink by the same factor.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.jobs import JobState
from services.jobs.events import Failed
from tests.services.jobs.conftest import Recorder
from tests.services.jobs.test_pipeline import Harness
from tests.sim.world import SimWorld

SCALE = 0.02
SCALED: dict[str, Any] = {
    "vastai_create_timeout_s": 120 * SCALE,
    "vastai_label_watch_s": 180 * SCALE,
    "vastai_unknown_grace_s": 90 * SCALE,
    "vastai_label_rechecks_s": [60 * SCALE, 180 * SCALE],
    "vastai_timeout_s": 30 * SCALE,
}


@pytest.mark.parametrize("kind", ["unknown", "oci_error"])
async def test_a_machine_that_will_never_run_fails_over_within_two_minutes(
    world: SimWorld, recorder: Recorder, kind: str
) -> None:
    world.vast.set_quirks(faulty_creates=1, faulty_kind=kind, time_scale=SCALE)
    # the real readiness timeout (20 min): only the fail-fast rule can end the first attempt in time
    async with Harness(world, recorder, ready_timeout_s=1200.0, **SCALED) as h:
        job_id = await h.submit(steps=5)
        job = await h.worker.wait(job_id, timeout=120 * SCALE * 10)
        assert job.state == JobState.SUCCEEDED, job.reason
        assert job.attempt == 2
    first, second = world.vast.instances_ever()
    assert job.instance_id == second and world.vast.live_instances() == []
    (retry,) = [e for e in recorder.of(Failed) if e.retrying]  # type: ignore[attr-defined]
    assert ("'unknown'" if kind == "unknown" else "OCI runtime") in retry.reason  # type: ignore[attr-defined]
    assert first != second


async def test_slow_creates_of_60s_bill_exactly_one_instance_per_job(world: SimWorld, recorder: Recorder) -> None:
    world.vast.set_quirks(slow_creates=1, create_delay_s=60, list_lag_s=30, time_scale=SCALE)
    async with Harness(world, recorder, **SCALED) as h:
        job_id = await h.submit(steps=5)
        job = await h.worker.wait(job_id, timeout=60)
        assert job.state == JobState.SUCCEEDED, job.reason
    assert world.vast.instances_ever() == [job.instance_id]
    assert world.vast.live_instances() == []


async def test_a_lost_create_that_shows_up_late_is_the_one_instance_of_the_job(
    world: SimWorld, recorder: Recorder
) -> None:
    world.vast.set_quirks(lost_creates=1, list_lag_s=120, time_scale=SCALE)
    async with Harness(world, recorder, **SCALED) as h:
        job_id = await h.submit(steps=5)
        job = await h.worker.wait(job_id, timeout=60)
        assert job.state == JobState.SUCCEEDED, job.reason
    assert world.vast.instances_ever() == [job.instance_id]
    assert len(world.vast.creates) == 1


async def test_destroying_a_job_destroys_every_instance_under_its_label(world: SimWorld, recorder: Recorder) -> None:
    async with Harness(world, recorder, **SCALED) as h:
        job_id = await h.submit(steps=5)
        for _ in range(400):
            job = await h.store.require(job_id)
            if job.instance_id:
                break
            await asyncio.sleep(0.02)
        assert job.label
        stray = world.vast.rent_outside(job.label)  # a late create that surfaced under the label
        done = await h.worker.wait(job_id, timeout=60)
        assert done.state == JobState.SUCCEEDED, done.reason
    assert stray != done.instance_id and world.vast.live_instances() == []


async def test_a_failed_ssh_key_attach_fails_the_rental_at_once(world: SimWorld, recorder: Recorder) -> None:
    world.vast.set_quirks(attach_fails=True)
    async with Harness(world, recorder, ready_timeout_s=1200.0, **SCALED) as h:
        job_id = await h.submit(steps=5)
        job = await h.worker.wait(job_id, timeout=30)
    assert job.state == JobState.FAILED and "SSH key" in job.reason, job.reason
    assert len(world.vast.instances_ever()) == 2  # the retry elsewhere met the same refusal
    assert world.vast.live_instances() == []
