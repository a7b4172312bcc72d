"""The box's dead-man's switch (issue 13, H4): the supervisor ends the rental itself when the bot has
gone silent or the job's hard deadline passed, through the instance's own Vast.ai key (the emulator
accepts it for this one instance only), else by stopping the container."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.remote import supervisor
from tests.sim.vast import Quirks, VastEmulator

TRAINER = "import time\nprint('training', flush=True)\ntime.sleep(120)\n"


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    with VastEmulator(quirks=Quirks(loading_s=0.0)) as emu:
        yield emu


def _launch(tmp: Path, vast: VastEmulator, environ: dict[str, str], **extra: Any) -> Path:
    aitk = tmp / "ai-toolkit"
    aitk.mkdir()
    (aitk / "run.py").write_text(TRAINER)
    (tmp / "config.yaml").write_text("job: extension\n")
    env_file = tmp / "container.environ"
    env_file.write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))
    job_dir = tmp / "job"
    args = {"deadman": 1.0, "deadline-in": 0.0, "container-pid": 0, **extra}
    argv = [sys.executable, supervisor.__file__, "launch", "--job-dir", str(job_dir), "--config",
            str(tmp / "config.yaml"), "--python", sys.executable, "--aitoolkit", str(aitk), "--grace-int", "1",
            "--grace-term", "1", "--heartbeat", "0.1", "--vast-api-url", vast.url,
            "--container-environ", str(env_file)]
    for name, value in args.items():
        argv += [f"--{name}", str(value)]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return job_dir


def _status(job_dir: Path) -> dict[str, Any]:
    return dict(json.loads((job_dir / "status.json").read_text()))


def _until(job_dir: Path, ok: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(job_dir)
        if ok(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def test_a_silent_bot_gets_the_rental_destroyed_with_the_instance_key(vast: VastEmulator, tmp_path: Path) -> None:
    inst = vast.rent_outside("lorabot-deadman")
    other = vast.rent_outside("someone-else")
    job_dir = _launch(tmp_path, vast, vast.container_env(inst))
    beat = job_dir / "bot_heartbeat"
    until = time.monotonic() + 2.5
    while time.monotonic() < until:  # the bot is here: nothing happens
        beat.touch()
        time.sleep(0.1)
    assert "deadman" not in _status(job_dir) and _status(job_dir)["phase"] == "running"
    st = _until(job_dir, lambda s: "destroyed" in s.get("deadman_action", ""))
    assert "no word from the bot" in st["deadman"] and st["phase"] == "exited"
    assert vast.destroyed_by_instance_key(inst)
    assert [i["id"] for i in vast.live_instances()] == [other]  # its key reaches no other instance


def test_the_instance_key_cannot_touch_another_instance(vast: VastEmulator) -> None:
    inst = vast.rent_outside("lorabot-a")
    other = vast.rent_outside("lorabot-b")
    key = vast.container_env(inst)["CONTAINER_API_KEY"]
    assert not supervisor._vast("DELETE", f"{vast.url}/api/v0/instances/{other}/", key)
    assert not supervisor._vast("GET", f"{vast.url}/api/v0/instances/", key)
    assert {i["id"] for i in vast.live_instances()} == {inst, other}


def test_where_the_key_may_not_destroy_the_instance_is_stopped(vast: VastEmulator, tmp_path: Path) -> None:
    vast.set_quirks(instance_key_destroys=False)
    inst = vast.rent_outside("lorabot-deadman")
    job_dir = _launch(tmp_path, vast, vast.container_env(inst), **{"deadline-in": 1.0, "deadman": 0.0})
    st = _until(job_dir, lambda s: "stopped" in s.get("deadman_action", ""))
    assert "deadline" in st["deadman"]
    assert vast.live_instances()[0]["stopped"] is True


def test_without_a_usable_key_the_container_is_stopped(vast: VastEmulator, tmp_path: Path) -> None:
    init = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the container's init
    try:
        job_dir = _launch(tmp_path, vast, {"CONTAINER_ID": "12345", "CONTAINER_API_KEY": "revoked"},
                          **{"container-pid": init.pid})
        st = _until(job_dir, lambda s: "SIGTERM" in s.get("deadman_action", ""))
        assert init.wait(10) == -15 and st["phase"] == "exited"
    finally:
        if init.poll() is None:
            init.kill()
            init.wait()
