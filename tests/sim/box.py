"""Lay out a fake rented box on the local machine, behind the sshd of tests/sim/sshd.py.

    <root>/lorabot          remote_root (job folders land in <root>/lorabot/jobs/<job id>/)
    <root>/ai-toolkit/      aitoolkit_dir, with the stand-in run.py (tests/sim/trainer/run.py)
    <root>/bin/nvidia-smi   a fake nvidia-smi, for probes that want one

`SimBox.settings_overrides()` gives the Settings fields that point the bot at it (short grace periods,
the local Python as the box's Python, a probe that checks the trainer is there).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.ssh import Endpoint
from tests.sim.sshd import SshdServer

TRAINER_SRC = Path(__file__).parent / "trainer" / "run.py"
HUB_SRC = Path(__file__).parent / "trainer" / "huggingface_hub.py"

_FAKE_NVIDIA_SMI = """#!/bin/sh
# lorabot sim: a single RTX 4090
case "$1" in
  -L) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-00000000-sim0-0000-0000-000000000000)";;
  *) echo "NVIDIA-SMI 550.00  Driver Version: 550.00  CUDA Version: 12.4"; echo "  0  NVIDIA GeForce RTX 4090";;
esac
"""


@dataclass
class SimBox:
    root: Path
    remote_root: Path
    aitoolkit_dir: Path
    bin_dir: Path
    python: str

    @property
    def probe(self) -> str:
        return shlex.join(["test", "-f", str(self.aitoolkit_dir / "run.py")])

    def set_fault(self, fault: str | None) -> None:
        """Make every later trainer run fail this way (see run.py's LORABOT_SIM_FAULT), or clear it."""
        path = self.aitoolkit_dir / "sim_fault"
        if fault:
            path.write_text(fault + "\n")
        else:
            path.unlink(missing_ok=True)

    def set_sec_per_step(self, seconds: float) -> None:
        (self.aitoolkit_dir / "sim_sec_per_step").write_text(f"{seconds}\n")

    @property
    def hf_home(self) -> Path:
        return self.root / "hf"

    def set_network(self, *, inet_down_mbps: float = 0.0, time_factor: float = 1.0, load_s: float = 0.0,
                    cold_read_s: float = 0.0, fail_prefetch: bool = False) -> None:
        """The box's real costs on a compressed clock (issue 18): model files take size / inet_down x
        time_factor to download, load + quantize `load_s` (+ `cold_read_s` on a machine's first load,
        before the weights are in its page cache); `fail_prefetch` makes the hub unreachable for the
        prefetch (the trainer still gets its files)."""
        (self.aitoolkit_dir / "sim_net.json").write_text(json.dumps(
            {"inet_down_mbps": inet_down_mbps, "time_factor": time_factor, "load_s": load_s,
             "cold_read_s": cold_read_s, "fail_prefetch": fail_prefetch}))

    def fresh_machine(self, inet_down_mbps: float | None = None) -> None:
        """A newly rented machine: an empty HF cache, at this offer's bandwidth."""
        shutil.rmtree(self.hf_home, ignore_errors=True)
        if inet_down_mbps is not None:
            path = self.aitoolkit_dir / "sim_net.json"
            knobs = json.loads(path.read_text()) if path.exists() else {}
            knobs["inet_down_mbps"] = inet_down_mbps
            path.write_text(json.dumps(knobs))

    def downloads(self) -> list[str]:
        """Files the hub really downloaded, on every machine so far (a warm cache adds none)."""
        log = self.aitoolkit_dir / "sim_downloads.log"
        return log.read_text().split("\n")[:-1] if log.exists() else []

    def settings_overrides(self) -> dict[str, Any]:
        return {
            "remote_root": str(self.remote_root),
            "remote_hf_home": str(self.hf_home),
            "aitoolkit_dir": str(self.aitoolkit_dir),
            "remote_python": self.python,
            "ready_probe": self.probe,
            "remote_stop_grace_s": 2.0,
            "remote_kill_grace_s": 1.0,
            "remote_heartbeat_s": 0.2,
            "ssh_keepalive_s": 2.0,
            # the dead-man's switch of a simulated box never signals this machine's pid 1; its
            # instance key comes from a file a test writes (SimWorld.expose_container_env), and a
            # supervisor left behind by a test ends itself within a minute
            "box_container_pid": 0,
            "box_container_environ": str(self.root / "container.environ"),
            "deadman_s": 60.0,
        }


def make_box(root: Path, *, python: str | None = None) -> SimBox:
    """Create (or refresh) the fake box's folders under `root`."""
    root = Path(root)
    remote_root = root / "lorabot"
    aitk = root / "ai-toolkit"
    bin_dir = root / "bin"
    for d in (remote_root / "jobs", aitk, bin_dir):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TRAINER_SRC, aitk / "run.py")
    shutil.copyfile(HUB_SRC, aitk / "huggingface_hub.py")
    _git_repo(aitk)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(_FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    return SimBox(root=root, remote_root=remote_root, aitoolkit_dir=aitk, bin_dir=bin_dir,
                  python=python or sys.executable)


def _git_repo(folder: Path) -> None:
    """The real image keeps ai-toolkit's .git: the pipeline records `git rev-parse HEAD` at launch."""
    if (folder / ".git").exists() or shutil.which("git") is None:
        return
    env = {**os.environ, "GIT_AUTHOR_NAME": "sim", "GIT_AUTHOR_EMAIL": "sim@example.invalid",
           "GIT_COMMITTER_NAME": "sim", "GIT_COMMITTER_EMAIL": "sim@example.invalid"}
    for argv in (["init", "-q"], ["add", "run.py"], ["commit", "-q", "-m", "sim ai-toolkit"]):
        subprocess.run(["git", "-C", str(folder), *argv], check=True, env=env, capture_output=True)


def box_for(sshd: SshdServer, *, python: str | None = None) -> SimBox:
    return make_box(sshd.info.root_dir, python=python)


def endpoint_of(sshd: SshdServer, kind: str = "direct") -> Endpoint:
    i = sshd.info
    return Endpoint(host=i.host, port=i.port, user=i.user, kind="proxy" if kind == "proxy" else "direct")


def job_config(
    name: str,
    *,
    training_folder: str,
    dataset: str,
    steps: int = 20,
    save_every: int = 10,
    sample_every: int = 10,
    prompts: list[str] | None = None,
    model: str = "black-forest-labs/FLUX.1-dev",
    trigger: str | None = "sks",
) -> dict[str, Any]:
    """A minimal ai-toolkit sd_trainer config following reference §1 (tests render it as JSON)."""
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [
                {
                    "type": "sd_trainer",
                    "training_folder": training_folder,
                    "device": "cuda:0",
                    "trigger_word": trigger,
                    "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
                    "save": {"dtype": "float16", "save_every": save_every, "max_step_saves_to_keep": 2},
                    "datasets": [{"folder_path": dataset, "caption_ext": "txt", "caption_dropout_rate": 0.05,
                                  "cache_latents_to_disk": True, "resolution": [512, 1024]}],
                    "train": {"batch_size": 1, "steps": steps, "gradient_checkpointing": True,
                              "noise_scheduler": "flowmatch", "optimizer": "adamw8bit", "lr": 1e-4,
                              "dtype": "bf16"},
                    "model": {"name_or_path": model, "is_flux": True, "quantize": True},
                    "sample": {"sampler": "flowmatch", "sample_every": sample_every, "width": 1024,
                               "height": 1024, "prompts": prompts if prompts is not None else ["[trigger] a cat"],
                               "seed": 42, "walk_seed": True, "guidance_scale": 4, "sample_steps": 20},
                },
            ],
        },
        "meta": {"name": "[name]", "version": "1.0"},
    }
