"""Fault point x fault kind: whatever goes wrong, where, every job ends in a terminal state with a
reason, and the emulator holds zero live instances afterwards (money first)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.jobs import Job, JobState, JobStore
from services.jobs.events import JobEvent, Progress, StateChanged
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.sshd import skip_without_sshd
from tests.sim.vast import Quirks
from tests.sim.world import SimWorld, run_world

S = JobState


@pytest.fixture(scope="module")
def mworld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    skip_without_sshd()
    with run_world(tmp_path_factory.mktemp("matrix"), quirks=Quirks(loading_s=0.1)) as w:
        yield w


class Injector(Recorder):
    """Fires `action` once, in its own task, when the job reaches `point`."""

    def __init__(self, point: str, action: Callable[[Job], Any]) -> None:
        super().__init__()
        self.point = point
        self.action = action
        self.fired = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    async def notify(self, job: Job, event: JobEvent) -> None:
        await super().notify(job, event)
        if self.fired.is_set():
            return
        hit = (isinstance(event, StateChanged) and event.state.value == self.point) or (
            self.point == "training" and isinstance(event, Progress) and event.step > 0
        )
        if self.point == "training" and isinstance(event, StateChanged):
            hit = False  # wait for real progress: the trainer must be running
        if hit:
            self.fired.set()

            async def fire() -> None:
                result = self.action(job)
                if asyncio.iscoroutine(result):
                    await result

            self.tasks.append(asyncio.create_task(fire()))


async def run_case(world: SimWorld, tmp: Path, point: str, kind: str, recipe: dict[str, Any] | None = None,
                   **extra: Any) -> tuple[Job, Injector]:
    settings = world.settings(db_path=str(tmp / "jobs.sqlite3"), work_dir=str(tmp / "work"), **extra)
    store = await JobStore(settings.db_path).open()
    holder: dict[str, Worker] = {}

    async def action(job: Job) -> None:
        fresh = await store.require(job.id)
        for _ in range(100):  # at "renting" the machine is not rented yet: strike right after
            if fresh.instance_id or kind not in INFRA or fresh.state.terminal:
                break
            await asyncio.sleep(0.05)
            fresh = await store.require(job.id)
        inst = fresh.instance_id
        if kind == "cancel":
            await holder["w"].cancel(job.id, by="matrix")
        elif kind == "vanish" and inst:
            world.vast.vanish(inst)
        elif kind == "offline" and inst:
            world.vast.fault(inst, "offline")
        elif kind == "ssh_cut":
            world.sshd.cut_connections()
        elif kind == "restart":
            old = holder["w"]
            await asyncio.shield(old.stop())
            fresh_worker = Worker(store, settings, injector)
            holder["w"] = fresh_worker
            await fresh_worker.start()

    injector = Injector(point, action)
    worker = Worker(store, settings, injector)
    holder["w"] = worker
    await worker.start()
    try:
        async with VastClient.from_settings(settings) as vast:
            d = await draft(store, settings, source=dataset_zip(3, 256), user_id="m", name="matrix",
                            trigger="sks", vast=vast,
                            overrides={"steps": 30, "save_every": 10, "sample_every": 0, **(recipe or {})})
        assert d.ok, d.message
        if point == "queued" and kind == "cancel":
            await store.transition(d.job.id, S.QUEUED, "confirmed")
            await worker.cancel(d.job.id, by="matrix")
        else:
            await worker.submit(d.job.id)
        job = await _wait_terminal(store, d.job.id, holder)
        for t in injector.tasks:
            await t
        return job, injector
    finally:
        await holder["w"].stop()
        await store.close()


async def _wait_terminal(store: JobStore, job_id: str, holder: dict[str, Worker], timeout: float = 90) -> Job:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await store.require(job_id)
        if job.state.terminal:
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job stuck in {job.state}: {job.reason}")
        await asyncio.sleep(0.05)


POINTS = ["renting", "waiting_ready", "uploading", "training", "collecting"]
KINDS = ["cancel", "vanish", "offline", "ssh_cut", "restart"]
INFRA = {"vanish", "offline"}


def expected(point: str, kind: str) -> set[JobState]:
    if kind == "cancel":
        return {S.CANCELLED, S.SUCCEEDED} if point == "collecting" else {S.CANCELLED}
    if kind in INFRA:
        return {S.SUCCEEDED, S.FAILED}  # one retry elsewhere, or failed cleanly when too late
    return {S.SUCCEEDED}


@pytest.mark.parametrize(("point", "kind"), [(p, k) for p in POINTS for k in KINDS])
async def test_fault(mworld: SimWorld, tmp_path: Path, point: str, kind: str) -> None:
    mworld.box.set_fault(None)
    # infra faults need a run long enough for the instance check to notice
    mworld.box.set_sec_per_step(0.1 if kind in INFRA else 0.03)
    job, fired = await run_case(mworld, tmp_path, point, kind)
    assert fired.fired.is_set()  # the fault really happened
    assert job.state.terminal and job.reason
    assert job.state in expected(point, kind), (job.state, job.reason)
    if kind in INFRA and point in ("renting", "waiting_ready", "uploading", "training") and job.state == S.SUCCEEDED:
        assert job.attempt == 2  # retried on another machine
    assert mworld.vast.live_instances() == []
    if job.instance_id is not None:
        assert job.instance_gone_at is not None


TRAINER_FAULTS = [
    ("oom", "cuda_oom"),
    ("oom@step5", "cuda_oom"),
    ("gated", "gated_model"),
    ("disk_full", "disk_full"),
    ("disk_full@step10", "disk_full"),
    ("crash@step5", "killed"),
    ("exception@step5", "unknown"),
    ("hang@step5", "stalled"),
    ("nan@step4", "nan_loss"),  # "loss is nan" 5 steps in a row: stopped, not trained on to the end
    ("repo_missing", "model_not_found"),
]


@pytest.mark.parametrize(("fault", "kind"), TRAINER_FAULTS)
async def test_trainer_failure_is_classified(mworld: SimWorld, tmp_path: Path, fault: str, kind: str) -> None:
    mworld.box.set_sec_per_step(0.03)
    mworld.box.set_fault(fault)
    try:
        job, _ = await run_case(mworld, tmp_path, "none", "none", stall_timeout_s=3.0)
    finally:
        mworld.box.set_fault(None)
    assert job.state == S.FAILED, job.reason
    assert job.failure_kind == kind, (job.failure_kind, job.reason)
    assert job.attempt == 1  # trainer failures are not infrastructure: never retried
    assert mworld.vast.live_instances() == []


async def test_cancel_while_queued(mworld: SimWorld, tmp_path: Path) -> None:
    job, _ = await run_case(mworld, tmp_path, "queued", "cancel")
    assert job.state == S.CANCELLED and job.instance_id is None
    assert mworld.vast.live_instances() == []


async def test_no_offer_under_the_cap_fails_cleanly(mworld: SimWorld, tmp_path: Path) -> None:
    mworld.vast.set_quirks(snatch=100)
    try:
        job, _ = await run_case(mworld, tmp_path, "none", "none")
    finally:
        mworld.vast.set_quirks(snatch=0)
    assert job.state == S.FAILED and job.failure_kind == "no_offers"
    assert mworld.vast.live_instances() == []


async def test_host_fault_gets_the_infra_retry_elsewhere(mworld: SimWorld, tmp_path: Path) -> None:
    """An uncorrectable ECC error is the machine's fault: one more try on another machine (here the
    fault follows the job to the second box too, so it ends failed after that one retry)."""
    mworld.box.set_sec_per_step(0.03)
    mworld.box.set_fault("host_fault@step3")
    try:
        job, _ = await run_case(mworld, tmp_path, "none", "none")
    finally:
        mworld.box.set_fault(None)
    assert job.state == S.FAILED and job.failure_kind == "host_fault", job.reason
    assert job.attempt == 2
    assert mworld.vast.live_instances() == []


async def test_a_trainer_hung_after_a_host_fault_is_retried_without_waiting_for_the_stall(
    mworld: SimWorld, tmp_path: Path
) -> None:
    mworld.box.set_sec_per_step(0.03)
    mworld.box.set_fault("host_hang@step3")
    try:
        job, _ = await run_case(mworld, tmp_path, "none", "none", stall_timeout_s=30.0)
    finally:
        mworld.box.set_fault(None)
    # stopped within a third of the stall timeout, twice (the fault follows the job to the retry box)
    assert job.state == S.FAILED and job.failure_kind == "host_fault", job.reason
    assert job.attempt == 2
    assert mworld.vast.live_instances() == []


async def test_oom_in_the_final_sampling_pass_ends_succeeded(mworld: SimWorld, tmp_path: Path) -> None:
    mworld.box.set_sec_per_step(0.03)
    mworld.box.set_fault("oom_final")
    try:
        job, _ = await run_case(mworld, tmp_path, "none", "none", recipe={"sample_every": 15})
    finally:
        mworld.box.set_fault(None)
    assert job.state == S.SUCCEEDED and job.lora_url, job.reason
    assert "after the final save" in job.measured["trainer_warning"]
    assert mworld.vast.live_instances() == []


async def test_a_silent_model_download_gets_the_load_stall_allowance(mworld: SimWorld, tmp_path: Path) -> None:
    """Images before 2026-06-24 print nothing while the base model downloads: before the first step
    and without any download bar, silence may last LORABOT_LOAD_STALL_TIMEOUT_S, not the stall timeout."""
    mworld.box.set_sec_per_step(0.03)
    mworld.box.set_fault("hang_load")
    try:
        t0 = asyncio.get_running_loop().time()
        job, _ = await run_case(mworld, tmp_path, "none", "none", stall_timeout_s=0.5, load_stall_timeout_s=4.0)
        took = asyncio.get_running_loop().time() - t0
    finally:
        mworld.box.set_fault(None)
    assert job.state == S.FAILED and job.failure_kind == "stalled", job.reason
    assert took >= 4.0
    assert mworld.vast.live_instances() == []
