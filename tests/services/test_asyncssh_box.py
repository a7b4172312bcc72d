"""The in-process asyncssh box (`lorabot demo` without sshd) serves what lorabot asks of a box, as sshd does."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh
import pytest

from tests.sim.asyncssh_box import run_asyncssh_box


async def test_exec_stdin_exit_status_auth_and_host_key(tmp_path: Path) -> None:
    with run_asyncssh_box(tmp_path) as box:
        i = box.info
        key = asyncssh.read_private_key(i.client_key_path)
        known = asyncssh.import_known_hosts(f"[{i.host}]:{i.port} {i.host_key_pub}\n")
        async with asyncssh.connect(i.host, i.port, username=i.user, client_keys=[key], known_hosts=known) as conn:
            data = os.urandom(3 * 1024 * 1024)  # streamed through stdin, back through stdout, as bytes
            r = await conn.run("cat; echo done >&2; exit 3", input=data, encoding=None, check=False)
            assert r.stdout == data and r.stderr == b"done\n" and r.exit_status == 3
            r = await conn.run("pwd; echo $HOME", check=False)
            assert r.stdout is not None and r.stdout.split() == [str(Path.home())] * 2
            # secrets of the bot's environment never reach the box's commands
            os.environ["LORABOT_TEST_SECRET"] = "s3cret"
            try:
                r = await conn.run("env", check=False)
            finally:
                del os.environ["LORABOT_TEST_SECRET"]
            assert r.stdout is not None and "s3cret" not in r.stdout
        box.deny_auth()
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(i.host, i.port, username=i.user, client_keys=[key], known_hosts=known)
        box.allow_auth()
        box.restart(new_host_key=True)  # a re-imaged box: the pinned key no longer matches
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            await asyncssh.connect(i.host, i.port, username=i.user, client_keys=[key], known_hosts=known)
