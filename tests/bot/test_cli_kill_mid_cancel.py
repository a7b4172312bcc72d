"""Issue 13 (H3): a cancel is on record before anything else, so a process SIGKILLed in the middle
of carrying it out leaves a cancel the next process finishes (a real `lorabot train` process)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from services.jobs import JobState, JobStore
from services.jobs.events import NullNotifier
from services.jobs.worker import Worker
from tests.bot.test_cli_train import TRAIN, dataset, jobs_in, training_job, wait_for
from tests.sim.world import SimWorld


async def test_sigkill_mid_cancel_then_restart_finishes_the_cancel(world: SimWorld) -> None:
    world.box.set_sec_per_step(0.3)
    world.box.set_fault("ignore_sigint")  # the stop escalates after the grace: a wide mid-cancel window
    slow_stop = {"remote_stop_grace_s": 6.0}
    env = {**os.environ, **world.env(**slow_stop), "COLUMNS": "200"}
    out = (world.root / "train.out").open("w")
    proc = subprocess.Popen(["lorabot", "train", dataset(world), *TRAIN, "--steps", "200", "--on-interrupt",
                             "cancel"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        job = await asyncio.to_thread(wait_for, "training", lambda: training_job(world), 90)
        proc.send_signal(signal.SIGINT)  # --on-interrupt cancel: the process starts cancelling
        await asyncio.to_thread(wait_for, "the cancel on record",
                                lambda: [j for j in jobs_in(world) if j["cancel_requested"]], 20)
        proc.kill()  # SIGKILL, mid-cancel: nothing more is written by that process
        proc.wait(10)
        [after] = jobs_in(world)
        assert after["state"] == "training", after["state"]  # the box still holds the job
        assert world.vast.live_instances() != []
        settings = world.settings(**slow_stop)
        store = await JobStore(settings.db_path).open()
        worker = Worker(store, settings, NullNotifier())  # the next process on the same store
        await worker.start()
        try:
            deadline = asyncio.get_running_loop().time() + 90
            while not (done := await store.require(job["id"])).state.terminal:
                assert asyncio.get_running_loop().time() < deadline, done.state
                await asyncio.sleep(0.2)
        finally:
            await worker.stop()
            await store.close()
        assert done.state == JobState.CANCELLED, done.reason
        assert done.instance_gone_at is not None
        assert world.vast.live_instances() == []
    finally:
        world.box.set_fault(None)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()
