"""The OpenSSH client binary as a bulk transport: a remote command whose stdin a thread feeds.

asyncssh frames and encrypts every 32 KiB packet in Python on the event loop; for the one big stream
of a job (the dataset) `ssh` does the same work in C, in its own process, and the loop stays free
(benchmarks/ship.py). Everything else still goes through asyncssh. The host key is pinned exactly
as on the asyncssh side: a known_hosts file holding only the job's key, strict checking, and no user
or system ssh configuration, agent, or environment (so no secret of ours reaches the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

HOST_ALIAS = "lorabot-box"  # the name the pinned key is filed under, whatever the endpoint's address
_PIPE_SIZE = 1024 * 1024
_HOST_KEY_FAILURES = ("host key verification failed", "remote host identification has changed")

Feed = Callable[[int, threading.Event], None]  # writes stdin into the fd; stops soon after the event


class OpenSSHUnusable(Exception):
    """`ssh` could not run the command at all (missing, refused the key file, unknown option...)."""


class OpenSSHHostKeyMismatch(Exception):
    """`ssh` refused the box: its host key is not the pinned one."""


def available() -> str | None:
    return shutil.which("ssh")


def argv(
    binary: str,
    *,
    host: str,
    port: int,
    user: str,
    key_path: Path,
    known_hosts: Path,
    remote_command: str,
    connect_timeout: float,
    keepalive_interval: float,
    keepalive_count_max: int,
    ciphers: tuple[str, ...],
) -> list[str]:
    opts = {
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "PreferredAuthentications": "publickey",
        "HostKeyAlias": HOST_ALIAS,
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "CheckHostIP": "no",
        "UpdateHostKeys": "no",
        "ConnectTimeout": str(max(1, round(connect_timeout))),
        "ServerAliveInterval": str(max(0, round(keepalive_interval))),
        "ServerAliveCountMax": str(keepalive_count_max),
        "Ciphers": ",".join(ciphers),
        "Compression": "no",  # images do not compress
        "ControlMaster": "no",
        "ControlPath": "none",
        # -F /dev/null already drops the user's config; said again for argv copied into a shell
        "ForwardAgent": "no",
        "ClearAllForwardings": "yes",
        "PermitLocalCommand": "no",
        "LogLevel": "ERROR",
    }
    out = [binary, "-F", "/dev/null", "-T", "-x", "-a", "-i", str(key_path), "-p", str(port), "-l", user]
    for name, value in opts.items():
        out += ["-o", f"{name}={value}"]
    return [*out, "--", host, remote_command]


async def run_fed(
    binary: str,
    *,
    host: str,
    port: int,
    user: str,
    key_path: Path,
    host_key: str,
    remote_command: str,
    feed: Feed,
    connect_timeout: float,
    keepalive_interval: float,
    keepalive_count_max: int,
    ciphers: tuple[str, ...],
) -> tuple[int, bytes, bytes]:
    """Run `remote_command` on the box with `feed` writing its stdin from a thread.

    Returns (exit status, stdout, stderr) of the remote command. Raises OpenSSHHostKeyMismatch,
    OpenSSHUnusable when ssh failed before the command said anything (the caller may use another
    transport), or whatever `feed` raised (then ssh is killed: the remote side sees a broken stream).
    """
    with tempfile.TemporaryDirectory(prefix="lorabot-ssh-") as tmp:
        known_hosts = Path(tmp) / "known_hosts"
        known_hosts.write_text(f"{HOST_ALIAS} {' '.join(host_key.split()[:2])}\n")
        cmd = argv(binary, host=host, port=port, user=user, key_path=key_path, known_hosts=known_hosts,
                   remote_command=remote_command, connect_timeout=connect_timeout,
                   keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max,
                   ciphers=ciphers)
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux: fewer hand-offs between writer and ssh
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=read_end, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            )
        except OSError as exc:
            os.close(write_end)
            raise OpenSSHUnusable(f"cannot start {binary}: {exc}") from exc
        finally:
            os.close(read_end)
        stop = threading.Event()

        def writer() -> None:
            try:
                feed(write_end, stop)
            finally:
                os.close(write_end)

        fed = asyncio.get_running_loop().run_in_executor(None, writer)
        talk = asyncio.ensure_future(proc.communicate())
        try:
            try:
                await asyncio.shield(fed)
            except (BrokenPipeError, ConnectionResetError):
                pass  # ssh ended early: its status and stderr say why
            out, err = await asyncio.shield(talk)
        except BaseException:
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(BaseException):
                await fed  # the kill broke the pipe: the thread is on its way out
            with contextlib.suppress(BaseException):
                await talk
            raise
    rc = proc.returncode if proc.returncode is not None else 255
    if rc == 255:
        text = err.decode(errors="replace").strip()
        if any(s in text.lower() for s in _HOST_KEY_FAILURES):
            raise OpenSSHHostKeyMismatch(text.splitlines()[0] if text else "host key verification failed")
        if not out:
            raise OpenSSHUnusable(text.splitlines()[-1] if text else "ssh exited 255")
    return rc, out, err
