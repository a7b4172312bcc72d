"""`lorabot push-dataset`: check and clean a dataset, stream it over SSH into a folder on a box, verify.

The box's host key is trusted on first use (there is no job to pin it to) and its fingerprint printed.
Exit codes: 0 verified on the box; 1 dataset not ready or verification failed; 2 bad input; 3 SSH failed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from bot.cli.common import EXIT_INFRA, EXIT_NOT_READY, EXIT_USAGE, err_console, fail, run, settings
from services.dataset import DatasetError, PreparedDataset, prepare
from services.settings import Settings
from services.ssh import Box, Endpoint, SSHError, VerificationError, fingerprint, wait_ready


async def _push(
    prepared: PreparedDataset, endpoint: Endpoint, key: Path, dest: str, python: str, cfg: Settings
) -> None:
    t = cfg.ssh_connect_timeout_s
    ready = await wait_ready([endpoint], key, probe=["true"], deadlines={"tcp": t, "auth": t, "probe": t},
                             connect_timeout=t)
    err_console.print(
        f"host key of {endpoint.host}:{endpoint.port}: {fingerprint(ready.host_key)} (trusted on first use)",
        highlight=False, markup=False,
    )
    manifest = prepared.manifest
    started = time.monotonic()
    # not connected up front: the stream goes through the OpenSSH client when there is one, and the
    # box connects on its own only if it has to carry the stream itself
    box = Box(endpoint, key, ready.host_key, python=python, connect_timeout=t, keepalive_interval=cfg.ssh_keepalive_s)
    try:
        if sys.stderr.isatty():
            with Progress(TextColumn("shipping"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=err_console, transient=True) as bar:
                task = bar.add_task("ship", total=manifest.total_bytes)
                await box.upload_dataset(prepared.folder, manifest, dest,
                                         progress=lambda done, _total: bar.update(task, completed=done))
        else:
            await box.upload_dataset(prepared.folder, manifest, dest)
    finally:
        await box.close()
    elapsed = time.monotonic() - started
    err_console.print(
        f"verified {len(manifest.files)} files ({manifest.total_bytes} bytes) in {dest} "
        f"in {elapsed:.1f}s; dataset sha256 {manifest.dataset_sha256}",
        highlight=False, markup=False,
    )


def push_dataset(
    source: Annotated[str, typer.Argument(help="zip file, folder, or https URL")],
    host: Annotated[str, typer.Option("--host", help="SSH host of the box")],
    port: Annotated[int, typer.Option("--port", help="SSH port of the box")],
    dest: Annotated[str, typer.Option("--dest", help="absolute folder on the box to extract into")],
    user: Annotated[str, typer.Option("--user")] = "root",
    key: Annotated[Path | None, typer.Option("--key", help="private key (default VASTAI_SSH_KEY_PATH)")] = None,
    trigger: Annotated[str | None, typer.Option("--trigger", help="the LoRA's trigger word")] = None,
    python: Annotated[str | None, typer.Option("--python", help="Python on the box (hashing)")] = None,
) -> None:
    """Pack a dataset, stream it over SSH into DEST on the box and verify every file's sha256 there."""
    cfg = settings()
    if not dest.startswith("/"):
        fail("--dest must be an absolute path on the box", EXIT_USAGE)
    if not 0 < port < 65536:
        fail("--port must be between 1 and 65535", EXIT_USAGE)
    key_path = (key or cfg.ssh_key_path).expanduser()
    if not key_path.is_file():
        fail(f"SSH key not found: {key_path}", EXIT_USAGE)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="push-", dir=cfg.work_dir) as tmp:
        try:
            prepared = run(prepare(source, Path(tmp), cfg, trigger))
        except DatasetError as exc:
            fail(f"rejected: {exc}", EXIT_USAGE)
        if not prepared.report.ready:
            err_console.print(prepared.report.summary, highlight=False, markup=False)
            fail("not shipped: the dataset is not ready (see `lorabot dataset check`)", EXIT_NOT_READY)
        endpoint = Endpoint(host=host, port=port, user=user)
        try:
            run(_push(prepared, endpoint, key_path, dest, python or cfg.remote_python, cfg))
        except VerificationError as exc:
            fail(str(exc), EXIT_NOT_READY)
        except SSHError as exc:
            fail(str(exc), EXIT_INFRA)


def register(app: typer.Typer) -> None:
    app.command("push-dataset")(push_dataset)
