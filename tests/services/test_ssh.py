# ruff: noqa: F811  (pytest fixtures imported from tests/sim/sshd.py are shadowed by parameters)
"""services.ssh over a real OpenSSH sshd on loopback (tests/sim/sshd.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from services import openssh
from services.dataset.manifest import Manifest, ManifestFile
from services.ssh import (
    OPENSSH_FROM,
    Box,
    Endpoint,
    HostKeyMismatch,
    ReadinessError,
    SSHError,
    VerificationError,
    fingerprint,
    wait_ready,
)
from tests.sim.sshd import SshdServer, free_port, sshd, sshd_stopped  # noqa: F401  (fixtures)

FAST = {"tcp": 0.6, "auth": 0.6, "probe": 0.6}


def ep(server: SshdServer, kind: str = "direct", port: int | None = None) -> Endpoint:
    i = server.info
    return Endpoint(i.host, port or i.port, i.user, "proxy" if kind == "proxy" else "direct")


async def connect(server: SshdServer, **kw: Any) -> Box:
    return await Box.connect(ep(server), server.info.client_key_path, server.info.host_key_pub,
                             python=sys.executable, **kw)


def make_dataset(folder: Path, n: int = 5, size: int = 70_000) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        for name, data in ((f"img {i}.jpg", os.urandom(size + i)), (f"img {i}.txt", f"caption {i}".encode())):
            sub = folder / ("nested" if i % 2 else "") / name
            sub.parent.mkdir(parents=True, exist_ok=True)
            sub.write_bytes(data)
            files.append(ManifestFile(path=str(sub.relative_to(folder)), size=len(data),
                                      sha256=hashlib.sha256(data).hexdigest()))
    return Manifest(files=files, images=n, captions=n)


# --- readiness ------------------------------------------------------------------------------------


async def test_each_stage_fails_with_its_own_name(sshd_stopped: SshdServer) -> None:
    server = sshd_stopped
    key = server.info.client_key_path
    with pytest.raises(ReadinessError) as err:  # port closed
        await wait_ready([ep(server)], key, probe="true", deadlines=FAST)
    assert err.value.stage == "tcp" and str(err.value).startswith("tcp stage failed")

    server.deny_auth()
    server.start()
    with pytest.raises(ReadinessError) as err:  # port open, key not accepted
        await wait_ready([ep(server)], key, probe="true", deadlines=FAST)
    assert err.value.stage == "auth" and "permission denied" in str(err.value)

    server.allow_auth()
    with pytest.raises(ReadinessError) as err:  # logged in, tools not there yet
        await wait_ready([ep(server)], key, probe="test -f /nonexistent/run.py", deadlines=FAST)
    assert err.value.stage == "probe" and "/nonexistent/run.py" in str(err.value)

    ready = await wait_ready([ep(server)], key, probe="true", deadlines=FAST)
    assert ready.host_key == server.info.host_key_pub
    assert fingerprint(ready.host_key).startswith("SHA256:")


async def test_readiness_walks_through_the_stages_as_the_box_comes_up(sshd_stopped: SshdServer) -> None:
    server = sshd_stopped
    seen: list[str] = []

    async def on_stage(stage: str, detail: str) -> None:
        seen.append(stage)

    async def box_boots() -> None:
        await asyncio.sleep(0.4)
        server.deny_auth()
        server.start()  # port opens, keys not installed yet: "Permission denied" is normal
        await asyncio.sleep(0.6)
        server.allow_auth()

    boot = asyncio.create_task(box_boots())
    ready = await wait_ready([ep(server)], server.info.client_key_path, probe="true",
                             deadlines={"tcp": 10, "auth": 10, "probe": 10}, on_stage=on_stage)
    await boot
    assert seen == ["tcp", "auth", "probe", "ready"]
    assert ready.endpoint == ep(server)


async def test_direct_endpoint_first_then_proxy(sshd: SshdServer) -> None:
    key = sshd.info.client_key_path
    both = [ep(sshd, "proxy"), ep(sshd, "direct")]
    assert (await wait_ready(both, key, probe="true", deadlines=FAST)).endpoint.kind == "direct"
    closed_direct = [ep(sshd, "direct", port=free_port()), ep(sshd, "proxy")]
    assert (await wait_ready(closed_direct, key, probe="true", deadlines=FAST)).endpoint.kind == "proxy"


async def test_api_stage_polls_until_the_instance_has_an_endpoint(sshd: SshdServer) -> None:
    calls = 0

    async def poll() -> list[Endpoint] | None:
        nonlocal calls
        calls += 1
        return [ep(sshd)] if calls >= 2 else None

    ready = await wait_ready([], sshd.info.client_key_path, probe="true",
                             deadlines={"api": 5, **FAST}, api_poll=poll)
    assert calls == 2 and ready.endpoint == ep(sshd)

    async def never() -> list[Endpoint] | None:
        return None

    with pytest.raises(ReadinessError) as err:
        await wait_ready([], sshd.info.client_key_path, probe="true", deadlines={"api": 0.2, **FAST},
                         api_poll=never)
    assert err.value.stage == "api"


# --- host key pinning -----------------------------------------------------------------------------


async def test_pinned_host_key_and_a_changed_key(sshd: SshdServer) -> None:
    key = sshd.info.client_key_path
    pinned = sshd.info.host_key_pub
    box = await connect(sshd)
    assert (await box.run(["echo", "ok"])).stdout == "ok\n"
    # wait_ready with the right pin passes
    await wait_ready([ep(sshd)], key, probe="true", deadlines=FAST, known_host_key=pinned)

    sshd.restart(new_host_key=True)  # the box was re-imaged, or someone is in the middle
    assert sshd.info.host_key_pub != pinned
    with pytest.raises(HostKeyMismatch):
        await box.reconnect()
    with pytest.raises(HostKeyMismatch):
        await Box.connect(ep(sshd), key, pinned)
    with pytest.raises(HostKeyMismatch):  # not retried until the deadline: it fails at once
        await wait_ready([ep(sshd)], key, probe="true", deadlines={"tcp": 5, "auth": 30, "probe": 5},
                         known_host_key=pinned)
    await box.close()


# --- commands -------------------------------------------------------------------------------------


async def test_hostile_arguments_are_quoted(sshd: SshdServer, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    hostile = ["a b", f"$(touch {canary})", f"; touch {canary}", "`id`", "'\"", "*", "x\ny", "--help", "|&>"]
    async with await connect(sshd) as box:
        res = await box.run(["printf", "%s\\0", *hostile])
        assert res.stdout.split("\0")[:-1] == hostile
        assert not canary.exists()
        with pytest.raises(TypeError):
            await box.run("echo hi")  # type: ignore[arg-type]  # a shell string is refused
        odd = tmp_path / "dir with $(x) and 'q'"
        await box.put_bytes(b"data", str(odd / "f;1"), 0o600)
        assert (odd / "f;1").read_bytes() == b"data"
        assert await box.exists(str(odd / "f;1")) and not await box.exists(str(odd / "nope"))


async def test_put_tail_download_and_reconnect_after_a_cut(sshd: SshdServer, tmp_path: Path) -> None:
    remote = tmp_path / "box" / "log.txt"
    async with await connect(sshd, keepalive_interval=1.0) as box:
        await box.put_bytes(b"secret=1\n", str(tmp_path / "env"), 0o600)
        assert (tmp_path / "env").stat().st_mode & 0o777 == 0o600
        assert await box.tail(str(remote), 0) == (b"", 0)  # not there yet
        remote.parent.mkdir(exist_ok=True)
        remote.write_bytes(b"line 1\nline 2\r")
        data, off = await box.tail(str(remote), 0)
        assert (data, off) == (b"line 1\nline 2\r", 14)
        with remote.open("ab") as fh:
            fh.write(b"line 3\n")
        assert await box.tail(str(remote), off) == (b"line 3\n", 21)
        assert await box.tail(str(remote), 21) == (b"", 21)
        assert (await box.tail(str(remote), 0, max_bytes=4)) == (b"line", 4)

        assert sshd.cut_connections() >= 1
        await asyncio.sleep(0.2)
        # the link dropped: the next command reconnects (same pinned key) and works
        assert (await box.run(["echo", "back"])).stdout == "back\n"

        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
        await box.put_file(big, str(tmp_path / "box" / "up.bin"))
        got = await box.download(str(tmp_path / "box" / "up.bin"), tmp_path / "dl" / "up.bin",
                                 sha256=hashlib.sha256(big.read_bytes()).hexdigest())
        assert got.read_bytes() == big.read_bytes()
        with pytest.raises(VerificationError) as err:
            await box.download(str(tmp_path / "box" / "up.bin"), tmp_path / "dl" / "bad.bin", sha256="0" * 64)
        assert "up.bin" in str(err.value) and not (tmp_path / "dl" / "bad.bin").exists()


# --- dataset upload -------------------------------------------------------------------------------


BULK = [  # Box(openssh_from=...): 0 streams any dataset through the OpenSSH client, None never
    pytest.param(0, id="openssh", marks=pytest.mark.skipif(openssh.available() is None, reason="no OpenSSH client")),
    pytest.param(None, id="asyncssh"),
]


def unconnected(server: SshdServer, **kw: Any) -> Box:
    return Box(ep(server), server.info.client_key_path, server.info.host_key_pub, python=sys.executable, **kw)


@pytest.mark.parametrize("openssh_from", BULK)
async def test_upload_dataset_extracts_and_verifies(sshd: SshdServer, tmp_path: Path, openssh_from: int | None) -> None:
    manifest = make_dataset(tmp_path / "ds", n=6)
    (tmp_path / "ds" / "not-in-manifest.jpg").write_bytes(b"stray")
    dest = tmp_path / "box" / "data set; $(rm -rf x)"
    seen: list[tuple[int, int]] = []
    box = unconnected(sshd, openssh_from=openssh_from)
    try:
        await box.upload_dataset(tmp_path / "ds", manifest, str(dest), progress=lambda a, b: seen.append((a, b)))
        await asyncio.sleep(0)  # progress from the OpenSSH writer thread arrives through the loop
        # the OpenSSH client carried the stream: the box never needed a connection of its own
        assert box.connected is (openssh_from is None)
    finally:
        await box.close()
    for f in manifest.files:
        assert hashlib.sha256((dest / f.path).read_bytes()).hexdigest() == f.sha256
    assert not (dest / "not-in-manifest.jpg").exists()  # only what the manifest lists is shipped
    assert seen[-1] == (manifest.total_bytes, manifest.total_bytes)


@pytest.mark.parametrize("openssh_from", BULK)
async def test_corrupted_upload_is_caught_and_names_the_file(
    sshd: SshdServer, tmp_path: Path, openssh_from: int | None
) -> None:
    manifest = make_dataset(tmp_path / "ds", n=3)
    dest = tmp_path / "box" / "ds"
    async with await connect(sshd, openssh_from=openssh_from) as box:
        # a hash that cannot match what lands on the box
        bad = manifest.model_copy(deep=True)
        bad.files[1].sha256 = "f" * 64
        with pytest.raises(VerificationError) as err:
            await box.upload_dataset(tmp_path / "ds", bad, str(dest))
        assert err.value.files == [bad.files[1].path]

        # a clean upload, then the box's copy changes between extraction and verification
        await box.upload_dataset(tmp_path / "ds", manifest, str(dest))
        victim = manifest.files[2].path
        (dest / victim).write_bytes(b"tampered")
        (dest / manifest.files[0].path).unlink()
        with pytest.raises(VerificationError) as err:
            await box.verify_dataset(str(dest), manifest)
        assert sorted(err.value.files) == sorted([victim, manifest.files[0].path])
        assert victim in str(err.value)


@pytest.mark.parametrize("openssh_from", BULK)
async def test_upload_fails_cleanly_when_a_local_file_changed(
    sshd: SshdServer, tmp_path: Path, openssh_from: int | None
) -> None:
    manifest = make_dataset(tmp_path / "ds", n=2)
    (tmp_path / "ds" / manifest.files[1].path).write_bytes(b"shorter")
    async with await connect(sshd, openssh_from=openssh_from) as box:
        with pytest.raises(SSHError, match="changed since the manifest"):
            await box.upload_dataset(tmp_path / "ds", manifest, str(tmp_path / "box" / "ds"))
        assert (await box.run(["echo", "still usable"])).exit_status == 0
    assert not ssh_children()


def ssh_children() -> list[int]:
    """OpenSSH clients this process started and that still run (sshd's own children come and go)."""
    import psutil

    alive = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "ssh" and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
    return alive


async def test_a_small_dataset_goes_over_the_open_connection(sshd: SshdServer, tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "ds", n=2)
    assert manifest.total_bytes < OPENSSH_FROM
    box = unconnected(sshd)  # the default threshold
    try:
        await box.upload_dataset(tmp_path / "ds", manifest, str(tmp_path / "box" / "ds"))
        assert box.connected  # no second handshake for a few KB
    finally:
        await box.close()


@pytest.mark.skipif(openssh.available() is None, reason="no OpenSSH client")
async def test_openssh_stream_copies_where_sendfile_cannot_feed_a_pipe(
    sshd: SshdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_sendfile(*_: object) -> int:  # as on systems whose sendfile only writes to sockets
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    manifest = make_dataset(tmp_path / "ds", n=3, size=3 * 1024 * 1024)
    dest = tmp_path / "box" / "ds"
    box = unconnected(sshd, openssh_from=0)
    try:
        await box.upload_dataset(tmp_path / "ds", manifest, str(dest))
        assert not box.connected
    finally:
        await box.close()
    for f in manifest.files:
        assert hashlib.sha256((dest / f.path).read_bytes()).hexdigest() == f.sha256


@pytest.mark.skipif(openssh.available() is None, reason="no OpenSSH client")
async def test_openssh_stream_refuses_a_box_whose_host_key_changed(sshd: SshdServer, tmp_path: Path) -> None:
    import asyncssh

    manifest = make_dataset(tmp_path / "ds", n=2)
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    box = Box(ep(sshd), sshd.info.client_key_path, other, python=sys.executable, openssh_from=0)
    with pytest.raises(HostKeyMismatch):
        await box.upload_dataset(tmp_path / "ds", manifest, str(tmp_path / "box" / "ds"))
    await box.close()
    assert not (tmp_path / "box" / "ds").exists()  # nothing ran on the impostor


@pytest.mark.skipif(openssh.available() is None, reason="no OpenSSH client")
async def test_when_openssh_cannot_ship_the_built_in_client_does(
    sshd: SshdServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = make_dataset(tmp_path / "ds", n=2)
    key = tmp_path / "readable_key"  # OpenSSH refuses a private key others may read; asyncssh does not
    key.write_bytes(sshd.info.client_key_path.read_bytes())
    key.chmod(0o644)
    dest = tmp_path / "box" / "ds"
    box = Box(ep(sshd), key, sshd.info.host_key_pub, python=sys.executable, openssh_from=0)
    try:
        await box.upload_dataset(tmp_path / "ds", manifest, str(dest))
    finally:
        await box.close()
    assert "using the built-in client" in caplog.text
    assert all((dest / f.path).read_bytes() for f in manifest.files)


@pytest.mark.skipif(openssh.available() is None, reason="no OpenSSH client")
async def test_cancelling_an_openssh_stream_stops_ssh_and_the_writer(sshd: SshdServer, tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "ds", n=4, size=40 * 1024 * 1024)
    started = asyncio.Event()
    box = unconnected(sshd, openssh_from=0)
    task = asyncio.create_task(box.upload_dataset(tmp_path / "ds", manifest, str(tmp_path / "box" / "ds"),
                                                  progress=lambda a, b: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    await box.close()
    assert not ssh_children()


# --- lorabot push-dataset -------------------------------------------------------------------------


def test_push_dataset_cli_ships_and_verifies(
    sshd: SshdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from bot.cli import app

    src = tmp_path / "src"
    src.mkdir()
    for n in range(6):
        Image.effect_noise((320, 320), 50).convert("RGB").save(src / f"im{n}.jpg", quality=90)
        (src / f"im{n}.txt").write_text(f"photo {n}")
    i = sshd.info
    dest = i.root_dir / "pushed set"
    args = ["push-dataset", str(src), "--host", i.host, "--port", str(i.port), "--user", i.user,
            "--key", str(i.client_key_path), "--dest", str(dest), "--python", sys.executable]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "SHA256:" in res.output and "verified 12 files" in res.output
    shipped = sorted(p.name for p in dest.iterdir())
    assert shipped == sorted(p.name for p in src.iterdir())

    sshd.deny_auth()
    monkeypatch.setenv("LORABOT_SSH_CONNECT_TIMEOUT_S", "1")  # each readiness stage's deadline here
    res = CliRunner().invoke(app, [*args[:-4], "--dest", str(dest) + "2", "--python", sys.executable])
    assert res.exit_code == 3 and "auth stage failed" in res.output
