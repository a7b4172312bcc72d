"""Fault matrix, issue 13 "nothing bills unwatched": a box that hangs a command while its sshd stays
up, the watchdog past a hard limit, a crash mid-cancel. Each case ends with zero live instances."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.jobs import Job, JobState, JobStore
from services.jobs.events import Progress
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.sshd import skip_without_sshd
from tests.sim.vast import Quirks
from tests.sim.world import SimWorld, run_world

S = JobState


@pytest.fixture(scope="module")
def uworld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    skip_without_sshd()
    with run_world(tmp_path_factory.mktemp("unwatched"), quirks=Quirks(loading_s=0.1)) as w:
        yield w


def hanging_python(tmp: Path, *, once: bool, hang_s: int,
                   command: str = "supervisor.py status") -> tuple[str, Path]:
    """The box's Python, except that `<script> <command>` (the supervisor's status read unless told)
    blocks while a flag file exists: what a stalled disk or a wedged process does to a command while
    sshd keeps answering. The script is named: the supervisor is not the box's only Python script with
    a `status` command (issue 18's model prefetch has one)."""
    flag = tmp / "hang"
    wrapper = tmp / "python-on-a-hung-box"
    forget = f'rm -f "{flag}"; ' if once else ""
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *"/{command} "*) if [ -f "{flag}" ]; then {forget}exec sleep {hang_s}; fi;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), flag


async def start_job(world: SimWorld, store: JobStore, worker: Worker, settings: Any) -> str:
    async with VastClient.from_settings(settings) as vast:
        d = await draft(store, settings, source=dataset_zip(3, 256), user_id="u", name="unwatched",
                        trigger="sks", overrides={"steps": 30, "save_every": 10, "sample_every": 0}, vast=vast)
    assert d.ok, d.message
    await worker.submit(d.job.id)
    return d.job.id


async def until(store: JobStore, job_id: str, ok: Any, timeout: float = 90) -> Job:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await store.require(job_id)
        if ok(job):
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job stuck in {job.state}: {job.reason}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("command", ["supervisor.py status", "prefetch.py status"])
async def test_a_hung_box_command_is_an_infrastructure_failure(uworld: SimWorld, tmp_path: Path, command: str) -> None:
    """The supervisor's status read (or the model prefetch's, before training) hangs once: the command
    times out, the job gets its one retry."""
    python, flag = hanging_python(tmp_path, once=True, hang_s=30, command=command)
    flag.touch()
    uworld.box.set_sec_per_step(0.03)
    settings = uworld.settings(db_path=str(tmp_path / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                               remote_python=python, box_command_timeout_s=3.0)
    store = await JobStore(settings.db_path).open()
    worker = Worker(store, settings, Recorder())
    await worker.start()
    try:
        job_id = await start_job(uworld, store, worker, settings)
        job = await until(store, job_id, lambda j: j.state.terminal)
    finally:
        await worker.stop()
        await store.close()
    assert not flag.exists()  # the hang really happened
    assert job.state == S.SUCCEEDED, job.reason
    assert job.attempt == 2  # the hung machine was destroyed and the job retried elsewhere
    events = await JobStore(settings.db_path).open()
    try:
        reasons = [e.reason for e in await events.events(job_id)]
    finally:
        await events.close()
    assert any("stopped answering" in r for r in reasons), reasons
    assert uworld.vast.live_instances() == []


async def test_the_watchdog_destroys_a_job_whose_monitor_is_stuck(uworld: SimWorld, tmp_path: Path) -> None:
    """The monitor loop is stuck in a box command (no command timeout to save it): past max_runtime
    the watchdog cancels the pipeline and destroys through the API. Failed, never retried."""
    python, flag = hanging_python(tmp_path, once=False, hang_s=90)
    flag.touch()
    uworld.box.set_sec_per_step(0.03)
    settings = uworld.settings(db_path=str(tmp_path / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                               remote_python=python, box_command_timeout_s=600.0, max_runtime_s=10.0,
                               watchdog_grace_s=0.0, watchdog_interval_s=0.2)
    store = await JobStore(settings.db_path).open()
    recorder = Recorder()
    worker = Worker(store, settings, recorder)
    await worker.start()
    try:
        job_id = await start_job(uworld, store, worker, settings)
        await until(store, job_id, lambda j: j.state == S.TRAINING or j.state.terminal)
        job = await until(store, job_id, lambda j: j.state.terminal, timeout=60)
        for _ in range(200):  # the watchdog records the end first; the cancelled pipeline task ends after
            if not worker.running():
                break
            await asyncio.sleep(0.05)
        assert worker.running() == []
    finally:
        flag.unlink(missing_ok=True)
        await worker.stop()
        await store.close()
    assert job.state == S.FAILED and job.failure_kind == "max_runtime", (job.state, job.reason)
    assert "watchdog" in (job.reason or "")
    assert job.attempt == 1  # a limit stop is never a retry on a new machine
    assert job.instance_gone_at is not None
    assert uworld.vast.live_instances() == []


def crash(worker: Worker) -> None:
    """What SIGKILL leaves: tasks gone, nothing released, nothing written after this instant."""
    for task in [*worker._tasks, *worker._watchdogs.values(), *(t for t, _ in worker._running.values())]:
        task.cancel()


async def test_a_crash_mid_cancel_is_finished_after_the_restart(uworld: SimWorld, tmp_path: Path) -> None:
    uworld.box.set_sec_per_step(0.5)  # a long run: without the cancel it would train for a while
    settings = uworld.settings(db_path=str(tmp_path / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                               save_partial_on_cancel=False)
    store = await JobStore(settings.db_path).open()
    recorder = Recorder()
    first = Worker(store, settings, recorder)
    await first.start()
    second: Worker | None = None
    try:
        job_id = await start_job(uworld, store, first, settings)
        await until(store, job_id, lambda j: j.state == S.TRAINING)
        while not [e for e in recorder.of(Progress) if isinstance(e, Progress) and e.step > 0]:
            await asyncio.sleep(0.05)
        cancel = asyncio.create_task(first.cancel(job_id, by="tester"))
        await until(store, job_id, lambda j: j.cancel_requested, timeout=5)
        crash(first)  # the process dies the instant the cancel is on record
        with contextlib.suppress(BaseException):
            await cancel
        assert (await store.require(job_id)).state == S.TRAINING  # the box still trains
        second = Worker(store, settings, recorder)  # the restarted process
        await second.start()
        job = await until(store, job_id, lambda j: j.state.terminal, timeout=60)
    finally:
        if second is not None:
            await second.stop()
        await first.stop()
        await store.close()
    assert job.state == S.CANCELLED, (job.state, job.reason)
    assert job.instance_gone_at is not None
    assert uworld.vast.live_instances() == []


async def test_the_box_ends_itself_when_the_bot_is_gone_past_the_deadman_time(
    uworld: SimWorld, tmp_path: Path
) -> None:
    """The bot dies mid-training and never comes back: the box's supervisor stops the trainer and
    destroys its own instance with the instance's CONTAINER_API_KEY (compressed dead-man time)."""
    uworld.box.set_sec_per_step(0.5)  # 30 steps: the trainer would run for 15 s
    settings = uworld.settings(db_path=str(tmp_path / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                               deadman_s=2.0)
    store = await JobStore(settings.db_path).open()
    recorder = Recorder()
    worker = Worker(store, settings, recorder)
    await worker.start()
    try:
        job_id = await start_job(uworld, store, worker, settings)
        job = await until(store, job_id, lambda j: j.state == S.TRAINING)
        assert job.instance_id is not None
        uworld.expose_container_env(job.instance_id)  # what Vast.ai puts in the container
        while not [e for e in recorder.of(Progress) if isinstance(e, Progress) and e.step > 0]:
            await asyncio.sleep(0.05)
        crash(worker)  # the bot is gone for good: no heartbeat, no watchdog, no reaper
        deadline = asyncio.get_running_loop().time() + 30
        while uworld.vast.live_instances():
            assert asyncio.get_running_loop().time() < deadline, uworld.vast.live_instances()
            await asyncio.sleep(0.2)
    finally:
        uworld.expose_container_env(None)
        await worker.stop()
        await store.close()
    assert uworld.vast.destroyed_by_instance_key(job.instance_id)
    status = json.loads((Path(settings.remote_root) / "jobs" / job_id / "status.json").read_text())
    assert "no word from the bot" in status["deadman"] and status["phase"] == "exited"


async def test_a_cancel_while_a_box_command_hangs_still_destroys(uworld: SimWorld, tmp_path: Path) -> None:
    """/cancel interrupts a hung command, and the stop + partial save it tries on the same hung box is
    bounded by LORABOT_CANCEL_SAVE_TIMEOUT_S: the instance is destroyed within seconds."""
    python, flag = hanging_python(tmp_path, once=False, hang_s=90)
    uworld.box.set_sec_per_step(0.3)
    settings = uworld.settings(db_path=str(tmp_path / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                               remote_python=python, box_command_timeout_s=600.0, cancel_save_timeout_s=2.0)
    store = await JobStore(settings.db_path).open()
    recorder = Recorder()
    worker = Worker(store, settings, recorder)
    await worker.start()
    try:
        job_id = await start_job(uworld, store, worker, settings)
        while not [e for e in recorder.of(Progress) if isinstance(e, Progress) and e.step > 0]:
            await asyncio.sleep(0.05)
        flag.touch()  # from now on the box hangs every status read
        await asyncio.sleep(1.0)  # the monitor loop is stuck in one by now
        t0 = asyncio.get_running_loop().time()
        result = await asyncio.wait_for(worker.cancel(job_id, by="tester"), 30)
        took = asyncio.get_running_loop().time() - t0
    finally:
        flag.unlink(missing_ok=True)
        await worker.stop()
        await store.close()
    assert result.job.state == S.CANCELLED, result.job.reason
    assert result.job.instance_gone_at is not None and took < 20, took
    assert uworld.vast.live_instances() == []


async def test_a_limit_stop_that_fails_on_the_box_is_never_a_retry(uworld: SimWorld, tmp_path: Path) -> None:
    """M4: the trainer stalls, and the stop command then hangs on the box. The job fails as stalled,
    on its first machine, destroyed: no second rental."""
    python, flag = hanging_python(tmp_path, once=False, hang_s=30, command="supervisor.py stop")
    flag.touch()
    uworld.box.set_sec_per_step(0.03)
    uworld.box.set_fault("hang@step5")
    settings = uworld.settings(db_path=str(tmp_path / "jobs.sqlite3"), work_dir=str(tmp_path / "work"),
                               remote_python=python, box_command_timeout_s=2.0, stall_timeout_s=3.0)
    store = await JobStore(settings.db_path).open()
    worker = Worker(store, settings, Recorder())
    await worker.start()
    seen = len(uworld.vast.requests)
    try:
        job_id = await start_job(uworld, store, worker, settings)
        job = await until(store, job_id, lambda j: j.state.terminal)
        rentals = [r for r in uworld.vast.requests[seen:]
                   if r["method"] == "PUT" and r["path"].startswith("/api/v0/asks/")]
    finally:
        uworld.box.set_fault(None)
        flag.unlink(missing_ok=True)
        await worker.stop()
        await store.close()
    assert job.state == S.FAILED and job.failure_kind == "stalled", (job.state, job.failure_kind, job.reason)
    assert job.attempt == 1 and len(rentals) == 1  # one machine rented, never a second
    assert uworld.vast.live_instances() == []
