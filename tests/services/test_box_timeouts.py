# ruff: noqa: F811  (pytest fixtures imported from tests/sim are shadowed by parameters)
"""Nothing on the box is a wait without end (issue 13, C3) and nothing secret reaches a log (M5).

A FIFO nobody writes stands in for a stalled disk on a host whose sshd still answers: `cat`,
`wc` and `sha256sum` block on it exactly as on a hung file system."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import openssh
from services.remote import upload_presigned
from services.ssh import Box, CommandTimeout, Endpoint
from services.storage import Storage
from tests.sim.s3 import S3Server, s3_server  # noqa: F401  (fixture)
from tests.sim.sshd import SshdServer, sshd  # noqa: F401  (fixture)


async def _box(server: SshdServer, **kw: float) -> Box:
    i = server.info
    return await Box.connect(Endpoint(i.host, i.port, i.user, "direct"), i.client_key_path, i.host_key_pub,
                             python=sys.executable, **kw)


def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    return fifo


async def test_a_hung_command_times_out_by_default(sshd: SshdServer, tmp_path: Path) -> None:
    fifo = _fifo(tmp_path)
    async with await _box(sshd, command_timeout=0.5) as box:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout):
            await box.run(["cat", "--", str(fifo)])
        with pytest.raises(CommandTimeout):
            await box.sha256(str(fifo))
        assert time.monotonic() - t0 < 10
        # an explicit timeout still wins over the default
        assert (await box.run(["sh", "-c", "sleep 0.8; echo ok"], timeout=5)).stdout == "ok\n"


async def test_a_stalled_download_times_out_at_the_floor_rate(sshd: SshdServer, tmp_path: Path) -> None:
    fifo = _fifo(tmp_path)
    async with await _box(sshd, command_timeout=0.5, floor_bytes_s=1e6) as box:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout):
            await box.download(str(fifo), tmp_path / "got" / "lora.safetensors", sha256="0" * 64)
        assert time.monotonic() - t0 < 10
        assert not (tmp_path / "got" / "lora.safetensors.part").exists()
        # a real file at a healthy rate is not affected by the same bounds
        data = os.urandom(3 * 1024 * 1024)
        (tmp_path / "ok.bin").write_bytes(data)
        got = await box.download(str(tmp_path / "ok.bin"), tmp_path / "got" / "ok.bin")
        assert got.read_bytes() == data


def test_transfer_timeout_grows_with_the_bytes(sshd: SshdServer) -> None:
    i = sshd.info
    box = Box(Endpoint(i.host, i.port, i.user, "direct"), i.client_key_path, i.host_key_pub,
              command_timeout=120.0, floor_bytes_s=1e6)
    assert box.transfer_timeout(0) == 120.0
    assert box.transfer_timeout(2_000_000_000) == pytest.approx(2120.0)


async def test_asyncssh_does_not_log_command_lines(
    sshd: SshdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # what `lorabot run` sets on the root logger
    url = "https://bucket.example/obj?X-Amz-Signature=deadbeef"
    async with await _box(sshd) as box:
        await box.run(["echo", url])
    assert not [r for r in caplog.records if r.name.startswith("asyncssh") and "deadbeef" in r.getMessage()]
    assert logging.getLogger("asyncssh").getEffectiveLevel() >= logging.WARNING


async def test_the_uploader_reads_the_presigned_url_from_stdin(s3_server: S3Server, tmp_path: Path) -> None:
    storage = Storage.from_settings(s3_server.settings())
    script = tmp_path / "box" / "upload_presigned.py"
    script.parent.mkdir()
    shutil.copy(upload_presigned.__file__, script)
    data = os.urandom(40_000)
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    key = f"t/{os.urandom(4).hex()}/lora.safetensors"
    put = await storage.presign_put(key, expires_s=600, sha256=digest)
    headers = [arg for name, value in put.headers.items() for arg in ("-H", f"{name}: {value}")]
    argv = [sys.executable, "-I", str(script), "put", str(path), "-", *headers]
    assert not any("Signature" in a or "X-Amz" in a for a in argv)
    out = subprocess.run(argv, input=put.url + "\n", capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(out.stdout)["size"] == 40_000
    await storage.verify(key, 40_000, digest)


@pytest.mark.parametrize("openssh_from", [
    pytest.param(0, id="openssh", marks=pytest.mark.skipif(openssh.available() is None, reason="no OpenSSH client")),
    pytest.param(None, id="asyncssh"),
])
async def test_a_dataset_upload_into_a_hung_box_times_out(
    sshd: SshdServer, tmp_path: Path, openssh_from: int | None
) -> None:
    """The box's end of the upload never reads (a wedged process): the transfer is bounded by its size
    at the floor rate, and the OpenSSH client feeding it is gone afterwards."""
    from tests.services.test_ssh import make_dataset, ssh_children

    wedged = tmp_path / "wedged-python"
    wedged.write_text("#!/bin/sh\nexec sleep 30\n")
    wedged.chmod(0o755)
    manifest = make_dataset(tmp_path / "ds", n=3, size=2 * 1024 * 1024)
    i = sshd.info
    box = Box(Endpoint(i.host, i.port, i.user, "direct"), i.client_key_path, i.host_key_pub, python=str(wedged),
              openssh_from=openssh_from, command_timeout=1.0, floor_bytes_s=10e6)
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout):
        await box.upload_dataset(tmp_path / "ds", manifest, str(tmp_path / "box" / "ds"))
    assert time.monotonic() - t0 < 15
    await box.close()
    assert not ssh_children()
