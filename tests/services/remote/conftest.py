"""Fixtures for the remote-job tests: a real sshd, a fake box laid out behind it, a pinned Box."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from services.remote.driver import RemoteJob
from services.settings import Settings, load_settings
from services.ssh import Box
from tests.sim.box import SimBox, box_for, endpoint_of, job_config
from tests.sim.sshd import SshdServer, sshd  # noqa: F401  (fixture)


@dataclass
class Rig:
    sshd: SshdServer
    sim: SimBox
    settings: Settings
    box: Box
    dataset: Path

    async def connect(self) -> Box:
        i = self.sshd.info
        return await Box.connect(endpoint_of(self.sshd), i.client_key_path, i.host_key_pub,
                                 python=self.sim.python, keepalive_interval=self.settings.ssh_keepalive_s)

    def job(self, job_id: str, box: Box | None = None) -> RemoteJob:
        return RemoteJob(box or self.box, str(self.sim.remote_root / "jobs" / job_id), self.settings)

    def final_path(self, job_id: str) -> str:
        return str(self.sim.remote_root / "jobs" / job_id / "output" / job_id / f"{job_id}.safetensors")

    async def start(
        self, job_id: str, *, env: dict[str, str] | None = None, box: Box | None = None, **cfg: object
    ) -> RemoteJob:
        job = self.job(job_id, box)
        config = job_config(job_id, training_folder=f"{job.job_dir}/output",
                            dataset=str(cfg.pop("dataset", self.dataset)), **cfg)  # type: ignore[arg-type]
        await job.install(json.dumps(config), {"HF_TOKEN": "hf_sim_secret_token"} if env is None else env,
                          config_name="config.json")
        await job.launch()
        return job


def write_images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (i * 40, 10, 10)).save(folder / f"img{i}.jpg")
        (folder / f"img{i}.txt").write_text(f"[trigger] photo {i}")
    return folder


@pytest.fixture
async def rig(sshd: SshdServer) -> AsyncIterator[Rig]:  # noqa: F811
    sim = box_for(sshd)
    settings = load_settings(**sim.settings_overrides())
    dataset = write_images(sim.root / "datasets" / "ds")
    i = sshd.info
    box = await Box.connect(endpoint_of(sshd), i.client_key_path, i.host_key_pub, python=sim.python)
    rig = Rig(sshd, sim, settings, box, dataset)
    try:
        yield rig
    finally:
        await box.close()
        _kill_leftovers(sim)


def _kill_leftovers(sim: SimBox) -> None:
    """Trainers are detached on purpose; a failed test must not leave them running."""
    import os
    import signal

    for status in (sim.remote_root / "jobs").glob("*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("trainer_pid")
            if pid:
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
