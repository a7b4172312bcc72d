"""End to end on the simulator: emulator + sshd box + stand-in trainer + S3, with the real worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.jobs import Job, JobState, JobStore
from services.jobs.events import Finished, LogSnippet, Progress, Readiness, SampleImage
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.storage import job_keys
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.world import HF_TOKEN, SimWorld


class Harness:
    def __init__(self, world: SimWorld, recorder: Recorder, **extra: Any) -> None:
        self.world = world
        self.recorder = recorder
        self.settings = world.settings(**extra)
        self.store = JobStore(self.settings.db_path)
        self.worker = Worker(self.store, self.settings, recorder)

    async def __aenter__(self) -> Harness:
        await self.store.open()
        await self.worker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.worker.stop()
        await self.store.close()

    async def submit(self, steps: int = 20, user: str = "u1", **overrides: Any) -> str:
        async with VastClient.from_settings(self.settings) as vast:
            d = await draft(self.store, self.settings, source=dataset_zip(), user_id=user, name="cat lora",
                            trigger="sks", overrides={"steps": steps, "save_every": 10, "sample_every": 10,
                                                      **overrides}, vast=vast)
        assert d.ok, d.message
        await self.worker.submit(d.job.id)
        return d.job.id


def kill_job_processes(job_dir: Path) -> None:
    """What a dead host does to a job's processes (on the simulator every box shares one sshd)."""
    status = json.loads((job_dir / "status.json").read_text())
    # the supervisor first (it is not a group leader): left alive, it would write the dead job's exit
    # into the folder the retry re-uses on this shared disk
    with contextlib.suppress(OSError, TypeError):
        os.kill(int(status["supervisor_pid"]), signal.SIGKILL)
    with contextlib.suppress(OSError, TypeError):
        os.killpg(int(status["trainer_pid"]), signal.SIGKILL)  # the trainer leads its own group
    # SIGKILL lands asynchronously: wait until neither can write into the folder any more
    for _ in range(500):
        alive = [p for p in (status.get("supervisor_pid"), status.get("trainer_pid")) if p and _running(int(p))]
        if not alive:
            return
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_training(h: Harness, job_id: str, step: int) -> Job:
    for _ in range(600):
        job = await h.store.require(job_id)
        if job.state == JobState.TRAINING and job.step >= step:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached step {step}: {job.state} {job.reason}")


@pytest.fixture
async def h(world: SimWorld, recorder: Recorder) -> AsyncIterator[Harness]:
    async with Harness(world, recorder) as harness:
        yield harness


async def test_happy_path_from_draft_to_link(h: Harness) -> None:
    job_id = await h.submit(steps=20)
    job = await h.worker.wait(job_id, timeout=90)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.instance_gone_at is not None and h.world.vast.live_instances() == []
    assert job.cost_usd > 0 and job.step == 20 and job.loss is not None
    # the link works with a plain HTTP client and serves a safetensors file
    assert job.lora_url
    async with httpx.AsyncClient() as http:
        body = (await http.get(job.lora_url)).content
    header_len = int.from_bytes(body[:8], "little")
    assert b"lora" in body[8:8 + header_len]
    steps = [e.step for e in h.recorder.of(Readiness)]  # type: ignore[attr-defined]
    # "downloading": the base model's download bars are passed on
    for expected in ("renting", "rented", "api", "tcp", "auth", "probe", "uploading", "uploaded", "launched",
                     "downloading"):
        assert expected in steps, (expected, steps)
    assert h.recorder.of(Progress) and h.recorder.of(SampleImage)
    (finished,) = h.recorder.of(Finished)
    assert finished.lora_url == job.lora_url and finished.cost_usd == pytest.approx(job.cost_usd)  # type: ignore[attr-defined]
    history = [e.dst for e in await h.store.events(job_id)]
    assert history == ["validating", "awaiting_confirmation", "queued", "renting", "waiting_ready", "uploading",
                       "training", "collecting", "succeeded"]


async def test_secrets_stay_off_the_box_except_hf_token(h: Harness) -> None:
    job_id = await h.submit(steps=5)
    job = await h.worker.wait(job_id, timeout=90)
    assert job.state == JobState.SUCCEEDED, job.reason
    box_files = [p for p in h.world.box.root.rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in box_files)
    s = h.settings
    for secret in (s.vastai_api_key, s.r2_secret_access_key, s.r2_access_key_id):
        assert secret is not None and secret.get_secret_value().encode() not in blob
    env_file = h.world.box.remote_root / "jobs" / job_id / "env"
    assert HF_TOKEN in env_file.read_text() and oct(env_file.stat().st_mode & 0o777) == "0o600"


async def test_cancel_while_training_destroys_and_reports_cost(h: Harness) -> None:
    h.world.box.set_sec_per_step(0.2)
    job_id = await h.submit(steps=400)
    for _ in range(300):
        job = await h.store.require(job_id)
        if job.state == JobState.TRAINING and job.step > 0:
            break
        await asyncio.sleep(0.1)
    result = await h.worker.cancel(job_id, by="tester")
    assert result.job.state == JobState.CANCELLED and result.destroyed_instance_id is not None
    assert result.cost_usd > 0 and h.world.vast.live_instances() == []


async def test_infra_retry_resumes_from_the_backed_up_checkpoint(h: Harness) -> None:
    h.world.box.set_sec_per_step(0.1)
    job_id = await h.submit(steps=60)
    for _ in range(600):
        job = await h.store.require(job_id)
        if job.artifacts.get("checkpoint") and job.step >= 25:
            break
        await asyncio.sleep(0.05)
    assert job.instance_id is not None
    first_instance, first_machine = job.instance_id, job.machine_id
    # the host goes away mid-training, and everything on it (on the simulator all instances share
    # one sshd and disk: kill this job's processes and wipe its folder, as a dead host would)
    h.world.vast.vanish(first_instance)
    job_dir = h.world.box.remote_root / "jobs" / job_id
    kill_job_processes(job_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    done = await h.worker.wait(job_id, timeout=120)
    assert done.state == JobState.SUCCEEDED, done.reason
    assert done.attempt == 2 and done.instance_id != first_instance
    assert first_machine in done.excluded_machines
    assert "resuming" in [e.step for e in h.recorder.of(Readiness)]  # type: ignore[attr-defined]
    # the second box started from the checkpoint, not from step 0
    log = (h.world.box.remote_root / "jobs" / job_id / "log.txt").read_text()
    assert "RESUMING" in log.upper()


async def test_a_command_failing_as_the_host_dies_gets_the_infra_retry(world: SimWorld, recorder: Recorder) -> None:
    """The host dies while a status command runs on it: the command fails in an odd way before the
    instance check has noticed. That is the host's fault (retry on a new machine), not a crash."""
    async with Harness(world, recorder, instance_check_s=3600.0) as h:  # only the status poll can notice
        h.world.box.set_sec_per_step(0.1)
        job_id = await h.submit(steps=30)
        job = await wait_training(h, job_id, 3)
        h.world.vast.vanish(job.instance_id)
        job_dir = h.world.box.remote_root / "jobs" / job_id
        kill_job_processes(job_dir)
        # its files half gone: the status command cannot run any more (a dying writer may race the wipe)
        shutil.rmtree(job_dir, ignore_errors=True)
        job_dir.mkdir(exist_ok=True)
        (job_dir / "supervisor.py").write_text("raise SystemExit(3)\n")
        done = await h.worker.wait(job_id, timeout=120)
        assert done.state == JobState.SUCCEEDED, done.reason
        assert done.attempt == 2 and done.instance_id != job.instance_id


# --- the real ai-toolkit (issue 16) -------------------------------------------------------------
async def test_oom_in_the_final_sampling_pass_still_delivers_the_lora(h: Harness) -> None:
    """ai-toolkit saves the final LoRA, then runs a last sampling pass; an OOM there exits 1 with a
    complete LoRA on disk: the job succeeds, the late error is passed on as a warning."""
    h.world.box.set_sec_per_step(0.02)
    h.world.box.set_fault("oom_final")
    try:
        job_id = await h.submit(steps=12)
        job = await h.worker.wait(job_id, timeout=90)
    finally:
        h.world.box.set_fault(None)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.lora_url and h.world.vast.live_instances() == []
    assert "GPU ran out of memory" in job.measured["trainer_warning"]
    warnings = [e.text for e in h.recorder.of(LogSnippet) if e.text.startswith("warning:")]  # type: ignore[attr-defined]
    assert warnings and "after the final save" in warnings[0]
    # the final file was backed up as soon as its line appeared, with its size and sha256
    assert job.artifacts["checkpoint"].endswith(f"lora_{job_id}.safetensors")
    assert len(job.artifacts["checkpoint_sha256"]) == 64 and int(job.artifacts["checkpoint_size"]) > 0


async def test_a_restart_between_the_final_save_and_a_late_oom_still_delivers_the_lora(h: Harness) -> None:
    """The bot re-attaches after it read the final save line: it reads the log on from its stored
    offset and never sees that line again, yet the LoRA on disk is complete."""
    h.world.box.set_sec_per_step(0.02)
    h.world.box.set_fault("oom_final@3")
    try:
        job_id = await h.submit(steps=12)
        for _ in range(600):  # the final file is backed up as its save line is read
            job = await h.store.require(job_id)
            if job.artifacts.get("checkpoint", "").endswith(f"lora_{job_id}.safetensors"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the final save was never read")
        await asyncio.sleep(0.5)  # the monitor stores the log offset past that line
        await h.worker.stop()  # a graceful restart: the trainer goes on on its box
        worker = Worker(h.store, h.settings, h.recorder)
        await worker.start()
        try:
            done = await worker.wait(job_id, timeout=90)
        finally:
            await worker.stop()
    finally:
        h.world.box.set_fault(None)
    assert done.state == JobState.SUCCEEDED, done.reason
    assert "GPU ran out of memory" in done.measured["trainer_warning"]
    assert done.lora_url and h.world.vast.live_instances() == []


async def test_a_truncated_checkpoint_in_r2_makes_the_retry_start_fresh(h: Harness) -> None:
    """A restore that does not match the size and sha256 recorded at backup is not used: ai-toolkit
    would load the newest `<name>*` file and die on it. The retry starts fresh and says so."""
    h.world.box.set_sec_per_step(0.1)
    job_id = await h.submit(steps=40)
    for _ in range(600):
        job = await h.store.require(job_id)
        if job.artifacts.get("checkpoint") and job.step >= 15:
            break
        await asyncio.sleep(0.05)
    key = job.artifacts["checkpoint"]
    s3 = h.world.s3.client()
    body = s3.get_object(Bucket=h.world.s3.bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=h.world.s3.bucket, Key=key, Body=body[: len(body) // 2])  # truncated in R2
    h.world.vast.vanish(job.instance_id)
    job_dir = h.world.box.remote_root / "jobs" / job_id
    kill_job_processes(job_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    done = await h.worker.wait(job_id, timeout=120)
    assert done.state == JobState.SUCCEEDED, done.reason
    assert done.attempt == 2
    notes = [e.detail for e in h.recorder.of(Readiness) if e.step == "resuming"]  # type: ignore[attr-defined]
    assert notes and "could not be restored intact: starting fresh" in notes[0]
    log = (h.world.box.remote_root / "jobs" / job_id / "log.txt").read_text()
    assert "RESUMING" not in log and ".lorabot-restore.tmp" not in os.listdir(
        h.world.box.remote_root / "jobs" / job_id / "output" / f"lora_{job_id}")


async def test_the_retry_restores_the_optimizer_with_its_checkpoint(h: Harness) -> None:
    h.world.box.set_sec_per_step(0.1)
    job_id = await h.submit(steps=40)
    for _ in range(600):
        job = await h.store.require(job_id)
        if job.artifacts.get("optimizer") and job.step >= 15:
            break
        await asyncio.sleep(0.05)
    assert job.artifacts["optimizer_for"] == job.artifacts["checkpoint"]
    h.world.vast.vanish(job.instance_id)
    job_dir = h.world.box.remote_root / "jobs" / job_id
    kill_job_processes(job_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    done = await h.worker.wait(job_id, timeout=120)
    assert done.state == JobState.SUCCEEDED and done.attempt == 2, done.reason
    log = (job_dir / "log.txt").read_text()
    # the newest backed-up checkpoint: step 10, or 20 when the monitor (slow under load) backed that
    # one up before the host died
    found = re.search(r"Found step (\d+) in metadata", log)
    assert found is not None and int(found[1]) in (10, 20, 30), log[-2000:]
    assert "Loading optimizer state from" in log


async def test_the_trainer_commit_is_recorded_at_launch(h: Harness) -> None:
    import subprocess

    head = subprocess.run(["git", "-C", str(h.world.box.aitoolkit_dir), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    job_id = await h.submit(steps=5)
    job = await h.worker.wait(job_id, timeout=90)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.measured["trainer_commit"] == head
    launched = [e.detail for e in h.recorder.of(Readiness) if e.step == "launched"]  # type: ignore[attr-defined]
    assert launched == [f"trainer started (ai-toolkit {head[:12]})"]
    s3 = h.world.s3.client()
    keys = job_keys(job.user_id, job.id, job.name)
    summary = json.loads(s3.get_object(Bucket=h.world.s3.bucket, Key=keys.job)["Body"].read())
    assert summary["measured"]["trainer_commit"] == head
    log_text = s3.get_object(Bucket=h.world.s3.bucket, Key=keys.log)["Body"].read().decode()
    assert log_text.startswith(f"lorabot: ai-toolkit commit {head}")
