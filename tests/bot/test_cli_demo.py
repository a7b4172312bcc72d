"""`lorabot demo` as a new user runs it: one whole job on the local simulator."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.sim.sshd import find_sshd


@pytest.mark.skipif(find_sshd() is None, reason="OpenSSH sshd not installed (.ci/run installs it)")
def test_demo_json_runs_a_whole_job_and_leaves_nothing_behind() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VASTAI_", "R2_", "LORABOT_", "DISCORD_"))}
    p = subprocess.run(["lorabot", "demo", "--json", "--steps", "20"], capture_output=True, text=True, timeout=240,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"job_id", "state", "lora_url", "instances_left", "cost_usd"} <= set(summary)
    assert summary["state"] == "succeeded" and summary["instances_left"] == 0
    assert summary["lora_url"].startswith("http://127.0.0.1:") and summary["cost_usd"] > 0
    assert "training" in p.stderr and "collecting" in p.stderr  # what the channel would show
    # issue 18: the breakdown per phase, with a real download on the compressed clock
    rows = {r["phase"]: r for r in summary["phases"]["phases"]}
    assert rows["model_download"]["seconds"] > 0 and rows["create_to_running"]["seconds"] > 0
    assert summary["phases"]["bytes_downloaded"] > 30e9 and "outside training" in summary["phase_line"]


def test_demo_without_sshd_uses_the_in_process_asyncssh_box() -> None:
    """Where sshd is missing (a laptop, the Docker image) the box is an asyncssh server in the demo's process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VASTAI_", "R2_", "LORABOT_", "DISCORD_"))}
    env["LORABOT_SIM_BOX"] = "asyncssh"  # as if sshd were not installed
    p = subprocess.run(["lorabot", "demo", "--json", "--steps", "12"], capture_output=True, text=True, timeout=240,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: the box is an asyncssh server in this process (OpenSSH's sshd is used when installed)" in p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["state"] == "succeeded" and summary["instances_left"] == 0 and summary["steps"] == 12
    assert "dataset" in p.stderr and "collecting" in p.stderr
