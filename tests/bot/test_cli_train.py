"""`lorabot train/launch/ssh/status/cancel/logs` as a user runs them, on the simulator (Vast.ai emulator +
an sshd box with the stand-in trainer + S3), several processes sharing one SQLite store.

What needs separate processes (train, a second process cancelling or attaching, launch, ssh) runs as real
`lorabot` subprocesses; read-only commands and quick refusals run the same app in-process (CliRunner),
which keeps this file's runtime down (each `lorabot` start costs seconds of imports on a busy machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from bot.cli import app
from services.jobs import JobStore
from services.jobs.events import NullNotifier
from services.jobs.worker import Worker
from tests.services.jobs.conftest import dataset_zip
from tests.sim.world import HF_TOKEN, SimWorld


def _env(world: SimWorld) -> dict[str, str]:
    return {**os.environ, **world.env(), "COLUMNS": "200"}


def lorabot(world: SimWorld, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lorabot", *args], env=_env(world), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def cli(world: SimWorld, *args: str) -> Result:
    """The same `lorabot` app in this process (stdout and stderr captured apart)."""
    return CliRunner().invoke(app, list(args), env={**world.env(), "COLUMNS": "200"})


class Background:
    """A `lorabot` process in the background, its output in files (no pipe to fill up)."""

    def __init__(self, world: SimWorld, *args: str) -> None:
        self.out = world.root / f"out-{time.monotonic_ns()}.txt"
        self.err = self.out.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(["lorabot", *args], env=_env(world), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, text=True)

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout)
        return rc, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def jobs_in(world: SimWorld) -> list[dict[str, Any]]:
    """The store's jobs as the bot would see them (a plain reader of the WAL database)."""
    db = Path(world.values()["db_path"])
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        try:
            rows = conn.execute("SELECT doc FROM jobs ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:
            return []
    return [json.loads(r[0]) for r in rows]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, proc: Background | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc is not None and proc.proc.poll() is not None:
            rc, out, err = proc.wait()
            raise AssertionError(f"lorabot exited {rc} while waiting for {what}:\n{out}\n{err[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def training_job(world: SimWorld) -> dict[str, Any] | None:
    for job in jobs_in(world):
        if job["state"] == "training" and job["step"] > 0:
            return job
    return None


def dataset(world: SimWorld, n: int = 4) -> str:
    path = world.root / f"data-{n}.zip"
    path.write_bytes(dataset_zip(n=n, size=256))
    return str(path)


TRAIN = ("--name", "cat lora", "--trigger", "sks", "--yes", "--json")


def test_train_to_success_then_status_logs_and_ssh_refused(world: SimWorld) -> None:
    world.box.set_sec_per_step(0.02)
    p = lorabot(world, "train", dataset(world), *TRAIN, "--steps", "12")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)  # stdout is exactly one JSON document
    assert doc["state"] == "succeeded" and doc["exit_code"] == 0 and doc["detached"] is False
    assert doc["instances_left"] == 0 and world.vast.live_instances() == []
    assert doc["cost_usd"] > 0 and doc["step"] == 12 and doc["loss"] is not None
    body = httpx.get(doc["lora_url"], timeout=10).content
    header_len = int.from_bytes(body[:8], "little")
    assert b"lora" in body[8:8 + header_len]
    assert "succeeded" in p.stderr and "uploaded" in p.stderr  # progress went to stderr
    job_id = doc["job_id"]

    table = cli(world, "status", "--json")
    assert table.exit_code == 0, table.stderr
    rows = json.loads(table.stdout)
    assert [r["job_id"] for r in rows] == [job_id]
    assert {"job_id", "state", "step", "total_steps", "loss", "eta_s", "cost_usd", "lora_url", "driven_by",
            "detached", "instance_id"} <= set(rows[0])
    assert rows[0]["instance_id"] is None and rows[0]["driven_by"] is None

    detail = json.loads(cli(world, "status", job_id, "--json").stdout)
    assert detail["state"] == "succeeded" and detail["lora_url"] == doc["lora_url"]
    assert detail["live_box"] is False and detail["ssh"] is None and detail["progress"] == 1.0
    assert {"reason", "failure_kind", "phase", "quote", "artifacts", "cost_usd", "eta_s"} <= set(detail)

    human = cli(world, "status", job_id)
    assert human.exit_code == 0 and "succeeded" in human.stdout
    assert doc["lora_url"] in human.stdout.replace("\n", "")
    assert job_id in cli(world, "status").stdout
    assert [j["job_id"] for j in json.loads(cli(world, "jobs", "--json").stdout)] == [job_id]

    log = cli(world, "logs", job_id)  # the box is gone: the copy stored in R2
    assert log.exit_code == 0, log.stderr
    assert "12/12" in log.stdout and HF_TOKEN not in log.stdout

    refused = cli(world, "ssh", job_id, "--", "true")
    assert refused.exit_code == 2 and "nothing to ssh into" in refused.stderr

    again = cli(world, "cancel", job_id, "--json")  # an ended job: nothing to do, and it says so
    assert again.exit_code == 0 and json.loads(again.stdout)["already_ended"] is True


def test_cancel_from_a_second_process_while_training(world: SimWorld) -> None:
    world.box.set_sec_per_step(0.1)
    train = Background(world, "train", dataset(world), *TRAIN, "--steps", "400")
    try:
        job = wait_for("training", lambda: training_job(world), proc=train)
        assert len(world.vast.live_instances()) == 1

        live = json.loads(cli(world, "status", job["id"], "--json").stdout)
        assert live["state"] == "training" and live["driven_by"] and live["live_box"] is True
        assert live["ssh"]["host_key_fingerprint"].startswith("SHA256:")
        log = cli(world, "logs", job["id"])  # from the box, over SSH
        assert log.exit_code == 0 and "Loading Flux model" in log.stdout and HF_TOKEN not in log.stdout

        c = lorabot(world, "cancel", job["id"], "--json")
        assert c.returncode == 0, c.stderr
        cancelled = json.loads(c.stdout)
        assert cancelled["state"] == "cancelled" and cancelled["destroyed_instance_id"] == job["instance_id"]
        assert cancelled["cost_usd"] > 0
        rc, out, err = train.wait(60)
    finally:
        train.kill()
    assert rc == 4, err[-3000:]
    doc = json.loads(out)
    assert doc["state"] == "cancelled" and doc["instances_left"] == 0
    followed = cli(world, "status", job["id"], "--follow", "--json")  # an ended job: at once, with its outcome
    assert followed.exit_code == 4 and json.loads(followed.stdout)["state"] == "cancelled"
    assert world.vast.live_instances() == []


def test_sigint_without_a_terminal_detaches_and_attach_finishes(world: SimWorld) -> None:
    world.box.set_sec_per_step(0.1)
    train = Background(world, "train", dataset(world), *TRAIN, "--steps", "50")
    try:
        job = wait_for("training", lambda: training_job(world), proc=train)
        train.proc.send_signal(signal.SIGINT)
        rc, out, err = train.wait(60)
    finally:
        train.kill()
    assert rc == 5, err[-3000:]
    doc = json.loads(out)
    assert doc["detached"] is True and doc["state"] == "training"
    assert doc["attach"] == f"lorabot train --attach {job['id']}" and "lorabot train --attach" in err
    # the machine goes on (and bills); nobody drives the job now (lease released), and the store says so
    assert [i["id"] for i in world.vast.live_instances()] == [job["instance_id"]]
    (stored,) = jobs_in(world)
    assert stored["owner"] is None and stored["detached"] is True
    status = json.loads(cli(world, "status", job["id"], "--json").stdout)
    assert status["driven_by"] is None and status["detached"] is True and status["live_box"] is True
    assert "nothing drives this job" in cli(world, "status", job["id"]).stdout
    assert json.loads(cli(world, "reconcile", "--json").stdout) == []  # a detached job's box is no orphan
    followed = cli(world, "logs", job["id"], "--follow")  # from the box, until its trainer exits
    assert followed.exit_code == 0 and "50/50" in followed.stdout

    attach = lorabot(world, "train", "--attach", job["id"], "--json")
    assert attach.returncode == 0, attach.stderr[-3000:]
    done = json.loads(attach.stdout)
    assert done["state"] == "succeeded" and done["step"] == 50 and done["lora_url"]
    assert done["instances_left"] == 0 and world.vast.live_instances() == []
    (stored,) = jobs_in(world)
    assert stored["detached"] is False and stored["owner"] is None


@contextlib.contextmanager
def bot_worker(world: SimWorld) -> Iterator[str]:
    """The Discord bot's worker without Discord: the same store, adopting jobs nobody drives, with a reaper."""
    settings = world.settings()
    owner = "bot:test"
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def main() -> None:
        async with JobStore(settings.db_path) as store:
            worker = Worker(store, settings, NullNotifier(), owner=owner)
            await worker.start()
            ready.set()
            try:
                while not stop.is_set():
                    await asyncio.sleep(0.1)
            finally:
                await worker.stop()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=thread_main, name="bot-worker")
    thread.start()
    assert ready.wait(30) and not errors, errors
    try:
        yield owner
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


def test_with_the_bot_on_the_same_store_cli_keeps_its_job_and_the_bot_adopts_it_on_detach(
    world: SimWorld,
) -> None:
    world.box.set_sec_per_step(0.1)
    with bot_worker(world) as bot:
        train = Background(world, "train", dataset(world), *TRAIN, "--steps", "60")
        try:
            job = wait_for("training", lambda: training_job(world), proc=train)
            for _ in range(20):  # the bot's worker looks for jobs to adopt every ~1.25 s: it must leave this one
                (now,) = jobs_in(world)
                assert now["owner"] and now["owner"] != bot and f":{train.proc.pid}:" in now["owner"]
                time.sleep(0.1)
            train.proc.send_signal(signal.SIGINT)
            rc, out, err = train.wait(60)
        finally:
            train.kill()
        assert rc == 5 and json.loads(out)["detached"] is True, err[-3000:]
        done = wait_for("the bot to finish the detached job",
                        lambda: [j for j in jobs_in(world) if j["state"] in ("succeeded", "failed")], timeout=90)
    assert done[0]["state"] == "succeeded" and done[0]["id"] == job["id"], done[0]["reason"]
    history = [r[0] for r in sqlite3.connect(world.values()["db_path"]).execute(
        "SELECT dst FROM job_events WHERE job_id = ? ORDER BY seq", (job["id"],))]
    assert history[-3:] == ["training", "collecting", "succeeded"]  # the bot re-attached; nothing re-rented
    assert world.vast.live_instances() == []


def test_launch_ssh_with_the_pinned_key_then_cancel(world: SimWorld) -> None:
    pexpect = pytest.importorskip("pexpect")  # before renting: a skip later would leave the box billing
    p = lorabot(world, "launch", dataset(world), "--name", "cat lora", "--trigger", "sks", "--steps", "30",
                "--yes", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    job_id, root = doc["job_id"], doc["job_root"]
    assert doc["state"] == "prepared" and len(world.vast.live_instances()) == 1
    argv = doc["ssh_argv"]
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv
    assert f"UserKnownHostsFile={doc['known_hosts']}" in argv and doc["ssh_command"].startswith("ssh -F /dev/null ")
    assert Path(doc["known_hosts"]).read_text().split()[1:] == world.sshd.info.host_key_pub.split()[:2]
    # nothing trains on a prepared box: the dataset, config and supervisor wait for the operator
    assert not (world.box.remote_root / "jobs" / job_id / "log.txt").exists()

    cat = lorabot(world, "ssh", job_id, "--", f"pwd && ls dataset | wc -l && cat {root}/config.yaml")
    assert cat.returncode == 0, cat.stderr
    lines = cat.stdout.splitlines()
    assert lines[:2] == [root, "8"]  # run in the job root; 4 images + 4 captions shipped
    assert f"lora_{job_id}" in cat.stdout and "steps: 30" in cat.stdout
    assert cli(world, "ssh", job_id, "--", "exit", "7").exit_code == 7  # the remote status comes back
    shell = pexpect.spawn("lorabot", ["ssh", job_id], env=_env(world), encoding="utf-8", timeout=30)
    try:  # on a terminal: an interactive login shell at the job root
        shell.sendline("echo \"at:$(pwd)\"; exit 3")
        shell.expect(f"at:{root}")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)
    assert shell.exitstatus == 3

    world.sshd.restart(new_host_key=True)  # another machine answers at the same address: refused
    assert cli(world, "ssh", job_id, "--", "true").exit_code == 255

    c = cli(world, "cancel", job_id)
    assert c.exit_code == 0, c.stderr
    assert "cancelled" in c.stdout and f"destroyed instance {doc['instance_id']}" in c.stdout
    assert world.vast.live_instances() == []
    assert cli(world, "ssh", job_id, "--", "true").exit_code == 2


def test_refusals_rent_nothing(world: SimWorld) -> None:
    few = cli(world, "train", dataset(world, n=2), *TRAIN)
    assert few.exit_code == 1
    doc = json.loads(few.stdout)
    assert doc["state"] == "failed" and doc["report"]["ready"] is False and doc["report"]["problems"]

    junk = world.root / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    rejected = cli(world, "train", str(junk), "--name", "x", "--trigger", "sks", "--yes")
    assert rejected.exit_code == 2 and "not started" in rejected.stderr

    unconfirmed = cli(world, "train", dataset(world), "--name", "x", "--trigger", "sks", "--json")
    assert unconfirmed.exit_code == 2 and "--yes" in unconfirmed.stderr
    assert [j["state"] for j in jobs_in(world)] == ["failed", "failed", "cancelled"]

    assert cli(world, "status", "nosuchjob").exit_code == 2
    assert cli(world, "train", "--name", "x").exit_code == 2
    assert cli(world, "logs", jobs_in(world)[0]["id"]).exit_code == 1  # never trained: no log anywhere
    assert world.vast.live_instances() == []


def test_on_a_terminal_confirm_then_ctrl_c_asks_and_cancels(world: SimWorld) -> None:
    pexpect = pytest.importorskip("pexpect")
    world.box.set_sec_per_step(0.1)
    child = pexpect.spawn("lorabot", ["train", dataset(world), "--name", "cat lora", "--trigger", "sks", "--steps",
                                      "400"], env=_env(world), encoding="utf-8", timeout=60, dimensions=(40, 160))
    try:
        child.expect(r"Rent a RTX 4090 and train 'cat lora'\?")
        child.sendline("y")

        def training_while_reading() -> Any:
            with contextlib.suppress(pexpect.TIMEOUT):  # keep reading: a full pty would block the live display
                child.read_nonblocking(1 << 16, timeout=0.05)
            return training_job(world)

        wait_for("training", training_while_reading)
        child.sendintr()
        child.expect(r"\[c\]ancel the job")
        assert len(world.vast.live_instances()) == 1  # still training while the question waits
        child.sendline("c")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 4, child.before
    assert world.vast.live_instances() == []
    (job,) = jobs_in(world)
    assert job["state"] == "cancelled" and job["instance_gone_at"]
