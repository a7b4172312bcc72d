"""`lorabot ssh`: a shell (or a command) on a job's machine, with OpenSSH and the job's pinned host key."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bot.cli.common import (
    fail,
    settings,
)
from bot.cli.jobkit import JobArg, has_live_box, job_root, load_job

if TYPE_CHECKING:
    from services.jobs import Job
    from services.settings import Settings



# --- ssh -----------------------------------------------------------------------------------------
def write_known_hosts(s: Settings, job: Job) -> Path:
    """A known_hosts file holding only the job's pinned host key (work_dir/<job>/known_hosts), filed
    under services/openssh.py's host alias, whatever the endpoint's address."""
    from services.openssh import HOST_ALIAS

    assert job.host_key and job.ssh_host and job.ssh_port
    parts = job.host_key.split()
    path = Path(s.work_dir).expanduser() / job.id / "known_hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{HOST_ALIAS} {parts[0]} {parts[1]}\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def interactive_shell_command(root: str) -> str:
    return f'cd {shlex.quote(root)} && exec "${{SHELL:-/bin/sh}}" -l'


def ssh_argv(s: Settings, job: Job, known_hosts: Path, remote_command: str, *, tty: bool) -> list[str]:
    """OpenSSH with services/openssh.py's hardened argv (review H6): no ~/.ssh/config, no agent, X11
    or port forwarding, no multiplexing, `--` before the host; pinned to the job's host key, so a
    changed key is refused, never accepted."""
    from services import openssh
    from services.ssh import CIPHERS

    assert job.ssh_host and job.ssh_port
    argv = openssh.argv(
        "ssh", host=job.ssh_host, port=job.ssh_port, user=s.ssh_user, key_path=s.ssh_key_path,
        known_hosts=known_hosts, remote_command=remote_command, connect_timeout=s.ssh_connect_timeout_s,
        keepalive_interval=15, keepalive_count_max=s.ssh_keepalive_count, ciphers=CIPHERS,
    )
    if tty:  # an interactive shell wants a terminal; everything else stays as hardened
        argv[argv.index("-T")] = "-t"
    return argv


def ssh(
    job_id: JobArg,
    command: Annotated[list[str] | None, typer.Argument(
        help="A command to run instead of a shell (after `--`), in the job root; joined with spaces as ssh does.")]
    = None,
) -> None:
    """A shell (or COMMAND) on a job's machine at its job root, with OpenSSH and the job's pinned host key.

    Exit status: the remote command's (255: ssh itself failed); 2 when the job has no live machine.
    """
    s = settings()
    job = load_job(s, job_id)
    if not has_live_box(job):
        why = "its machine was destroyed" if job.instance_gone_at else "it has no ready machine"
        fail(f"job {job.id} is {job.state.value}: {why}, nothing to ssh into")
    if shutil.which("ssh") is None:
        fail("the OpenSSH client `ssh` is not installed (apt-get install openssh-client)")
    known_hosts = write_known_hosts(s, job)
    root = job_root(job, s)
    if command:
        remote = f"cd {shlex.quote(root)} 2>/dev/null; " + " ".join(command)
        argv = ssh_argv(s, job, known_hosts, remote, tty=False)
    else:
        if not sys.stdin.isatty():
            fail("no terminal for an interactive shell: pass a command after `--`")
        argv = ssh_argv(s, job, known_hosts, interactive_shell_command(root), tty=True)
    proc = subprocess.run(argv, check=False)
    raise typer.Exit(proc.returncode)


def register(app: typer.Typer) -> None:
    app.command("ssh")(ssh)
