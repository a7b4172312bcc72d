"""The supervisor and its driver over real SSH, with the ai-toolkit stand-in as the trainer."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from services.progress import FailureKind, classify_exit
from services.remote.driver import RemoteJob, RemoteStatus
from tests.services.remote.conftest import Rig, write_images


async def until(cond: object, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await cond():  # type: ignore[operator]
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def trainer_processes(config_path: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run.py" in cmd and config_path.encode() in cmd:
                pids.append(int(entry.name))
    return pids


async def read_all(job: RemoteJob, offset: int = 0) -> tuple[bytes, int]:
    out = b""
    while True:
        data, offset = await job.read_log(offset)
        if not data:
            return out, offset
        out += data


async def test_a_run_succeeds_and_the_lora_is_collected(rig: Rig, tmp_path: Path) -> None:
    job = await rig.start("job-ok", steps=20)
    st = await job.wait(30)
    assert st.done and st.exit_code == 0 and st.trainer_pid and not st.trainer_alive
    outcome = await job.outcome(rig.final_path("job-ok"), st)
    assert outcome.success, outcome.reason

    log = (await read_all(job))[0].decode()
    assert "Running 1 job" in log and "20/20 [" in log and "\r" in log
    assert "hf_sim_secret_token" not in log  # HF_TOKEN reaches the trainer only through its env
    assert os.stat(job.path("env")).st_mode & 0o777 == 0o600
    status_file = json.loads(Path(job.path("status.json")).read_text())
    assert "hf_sim_secret_token" not in json.dumps(status_file)
    assert status_file["phase"] == "exited" and status_file["finished_at"] >= status_file["started_at"]

    got = await job.collect(rig.final_path("job-ok"), tmp_path / "out")
    assert [p.name for p in got] == ["job-ok.safetensors"]
    raw = got[0].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["ss_output_name"] == "job-ok"
    lora_a = header["transformer.single_transformer_blocks.0.proj_out.lora_A.weight"]
    assert lora_a["dtype"] == "F16" and lora_a["shape"] == [16, 3072]
    outdir = Path(rig.final_path("job-ok")).parent
    assert sorted(p.name for p in outdir.glob("job-ok_*.safetensors")) == ["job-ok_000000010.safetensors"]
    assert list((outdir / "samples").glob("*__000000020_0.jpg"))
    assert classify_exit(st.exit_code, True, log).success


async def test_launch_twice_starts_one_trainer(rig: Rig) -> None:
    rig.sim.set_sec_per_step(0.05)
    job = await rig.start("job-twice", steps=200)
    again = await asyncio.gather(job.launch(), job.launch())
    first = await job.status()
    assert all(s.launched is False for s in again)
    assert {s.trainer_pid for s in again} == {first.trainer_pid}
    assert trainer_processes(job.config_path) == [first.trainer_pid]
    await job.stop(10)
    # after it exited, a late launch still does not start it again
    late = await job.launch()
    assert late.launched is False and late.phase == "exited"
    assert trainer_processes(job.config_path) == []


async def test_disconnect_mid_training_and_reattach(rig: Rig) -> None:
    rig.sim.set_sec_per_step(0.03)
    job = await rig.start("job-cut", steps=80)
    await until(lambda: _log_has(job, b"/80 ["))
    head, offset = await read_all(job)
    before = await job.status()
    assert before.phase == "running"

    assert rig.sshd.cut_connections() >= 1  # the link drops; the bot may even restart
    await rig.box.close()
    box2 = await rig.connect()
    again = rig.job("job-cut", box2)  # rebuilt from nothing but the job folder
    st = await again.status()
    assert st.phase == "running" and st.trainer_pid == before.trainer_pid and st.trainer_alive
    final = await again.wait(30)
    assert final.exit_code == 0
    tail, _ = await read_all(again, offset)
    assert head + tail == Path(job.log_path).read_bytes()  # read on from the right offset
    assert b"80/80 [" in tail
    assert (await again.outcome(rig.final_path("job-cut"), final)).success
    await box2.close()


async def _log_has(job: RemoteJob, needle: bytes) -> bool:
    return needle in (await read_all(job))[0]


async def test_stop_with_sigint_ends_with_the_job_stopped_banner(rig: Rig) -> None:
    rig.sim.set_sec_per_step(0.05)
    job = await rig.start("job-stop", steps=500)
    await until(lambda: _log_has(job, b"/500 ["))
    st = await job.stop(10)
    assert st.done and st.exit_code == 0 and st.stop_requested and "escalated" not in st.raw
    outcome = await job.outcome(rig.final_path("job-stop"), st)
    assert not outcome.success and outcome.stopped_banner  # exit 0 alone is not success (§4)
    log = (await read_all(job))[0].decode()
    assert classify_exit(st.exit_code, False, log).kind is FailureKind.JOB_STOPPED


@pytest.mark.parametrize(
    ("fault", "exit_code", "escalated"),
    [("ignore_sigint", 143, "SIGTERM"), ("ignore_sigint,ignore_sigterm", 137, "SIGKILL")],
)
async def test_stop_escalates_when_the_trainer_ignores_signals(
    rig: Rig, fault: str, exit_code: int, escalated: str
) -> None:
    rig.sim.set_sec_per_step(0.05)
    rig.sim.set_fault(fault)
    settings = rig.settings.model_copy(update={"remote_stop_grace_s": 0.5, "remote_kill_grace_s": 0.5})
    job = await _start_with(rig, RemoteJob(rig.box, rig.job("job-esc").job_dir, settings))
    await until(lambda: _log_has(job, b"/500 ["))
    st = await job.stop(10)
    assert st.done and st.exit_code == exit_code and st.raw.get("escalated") == escalated
    assert trainer_processes(job.config_path) == []
    assert not (await job.outcome(rig.final_path("job-esc"), st)).success


async def _start_with(rig: Rig, job: RemoteJob) -> RemoteJob:
    from tests.sim.box import job_config

    config = job_config("job-esc", training_folder=f"{job.job_dir}/output", dataset=str(rig.dataset), steps=500)
    await job.install(json.dumps(config), {"HF_TOKEN": "x"}, config_name="config.json")
    await job.launch()
    return job


FAULTS = [
    # (fault, env has HF_TOKEN, empty dataset, exit code, failure kind, a line of the real output)
    ("oom", True, False, 1, FailureKind.CUDA_OOM, "Error running job: CUDA out of memory."),
    ("oom@step3", True, False, 1, FailureKind.CUDA_OOM, "OOM during training step 3 times in a row"),
    ("", False, False, 1, FailureKind.GATED_MODEL, "Cannot access gated repo"),
    ("disk_full", True, False, 1, FailureKind.DISK_FULL, "No space left on device"),
    ("disk_full@step10", True, False, 1, FailureKind.DISK_FULL, "StorageFull"),
    ("", True, True, 1, FailureKind.NO_IMAGES, "no images found in"),
    ("crash@step4", True, False, 137, FailureKind.KILLED, "3/20"),
    ("exception@step2", True, False, 1, FailureKind.UNKNOWN, "Error running job: sim: exception"),
]


@pytest.mark.parametrize(("fault", "token", "empty", "exit_code", "kind", "line"), FAULTS,
                         ids=[f"{f[0] or 'none'}-{f[4].value}" for f in FAULTS])
async def test_failure_modes_end_in_the_right_outcome(
    rig: Rig, fault: str, token: bool, empty: bool, exit_code: int, kind: FailureKind, line: str
) -> None:
    rig.sim.set_fault(fault)
    dataset = rig.sim.root / "datasets" / "empty" if empty else rig.dataset
    dataset.mkdir(parents=True, exist_ok=True)
    job = await rig.start("job-f", steps=20, dataset=dataset, env={"HF_TOKEN": "t"} if token else {})
    st = await job.wait(30)
    assert st.done and st.exit_code == exit_code
    final = await job.box.exists(rig.final_path("job-f"))
    outcome = await job.outcome(rig.final_path("job-f"), st)
    assert not outcome.success and not final
    log = await job.log_tail()
    assert line in log
    classified = classify_exit(st.exit_code, final, log)
    assert classified.kind is kind, classified


async def test_a_hung_trainer_goes_quiet_and_is_stopped(rig: Rig) -> None:
    rig.sim.set_fault("hang@step3")
    job = await rig.start("job-hang", steps=20)
    await until(lambda: _log_has(job, b"2/20 ["))
    _, size = await read_all(job)
    await asyncio.sleep(0.5)
    st = await job.status()
    assert st.phase == "running" and st.trainer_alive and st.log_size == size  # alive, silent
    age = st.heartbeat_age()
    assert age is not None and age < 2  # the supervisor itself is fine
    st = await job.stop(10)
    assert st.done and not (await job.outcome(rig.final_path("job-hang"), st)).success


async def test_status_of_a_job_never_launched(rig: Rig) -> None:
    st = await rig.job("nothing-here").status()
    assert isinstance(st, RemoteStatus) and st.phase == "absent" and not st.done and not st.lost


async def test_uploaded_dataset_trains(rig: Rig, tmp_path: Path) -> None:
    """The pieces together: ship a folder with upload_dataset, train on the box's copy."""
    import hashlib

    from services.dataset.manifest import Manifest, ManifestFile

    local = write_images(tmp_path / "local-ds", n=4)
    files = [ManifestFile(path=p.name, size=p.stat().st_size, sha256=hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(local.iterdir())]
    manifest = Manifest(files=files, images=4, captions=4)
    dest = str(rig.sim.remote_root / "jobs" / "job-up" / "dataset")
    await rig.box.upload_dataset(local, manifest, dest)
    job = await rig.start("job-up", steps=5, dataset=dest)
    st = await job.wait(30)
    assert (await job.outcome(rig.final_path("job-up"), st)).success
    assert "Found 4 images" in await job.log_tail()
