"""`lorabot demo`: one whole job on the built-in local simulator.

It starts the stand-ins of tests/sim (a Vast.ai emulator whose instances are a loopback OpenSSH sshd
with the stand-in ai-toolkit trainer, and moto's S3 server for R2), makes a small dataset, and runs
the same intake, worker and pipeline as the bot, printing what the channel would show. Nothing
outside this machine is contacted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bot.cli.common import EXIT_INFRA, EXIT_NOT_READY, EXIT_OK, fail, print_json

DEMO_STEPS = 40
DEMO_TIME_FACTOR = 0.0005  # the simulated clock: 2000 real seconds take one


# test-only: "asyncssh" forces the in-process box even where sshd is installed
BOX_ENV = "LORABOT_SIM_BOX"


def box_server() -> str:
    """Which SSH server plays the rented box: OpenSSH's sshd when installed, else asyncssh in-process."""
    from tests.sim.sshd import find_sshd

    forced = os.environ.get(BOX_ENV, "").strip().lower()
    if forced in ("sshd", "asyncssh"):
        return forced
    return "sshd" if find_sshd() is not None else "asyncssh"


def _missing() -> str | None:
    """What the simulator needs that this machine lacks, said plainly."""
    if box_server() == "sshd":
        from tests.sim.sshd import find_sshd

        if find_sshd() is None:
            return f"{BOX_ENV}=sshd but OpenSSH's sshd is not installed: apt-get install openssh-server"
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        return "the demo stores the LoRA in a local S3 server: pip install 'moto[server]' (or pip install -e '.[dev]')"
    return None


def demo_dataset(n: int = 5, size: int = 320) -> bytes:
    """A tiny captioned dataset (a zip, as people upload it)."""
    from PIL import Image, ImageDraw

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img = Image.new("RGB", (size, size), (30 + 40 * i, 80, 150))
            ImageDraw.Draw(img).ellipse((40 + 10 * i, 40, size - 40, size - 40 - 10 * i), fill=(230, 200, 60))
            out = io.BytesIO()
            img.save(out, "PNG")
            zf.writestr(f"demo/sun_{i}.png", out.getvalue())
            zf.writestr(f"demo/sun_{i}.txt", f"a drawing of a yellow sun, variant {i}")
    return buf.getvalue()


async def _run(root: Path, out: Console, steps: int) -> dict[str, Any]:
    from bot.cli.progress import CliNotifier
    from services.jobs import JobStore, phases
    from services.jobs.intake import draft
    from services.jobs.worker import Worker
    from services.vastai import VastClient
    from tests.sim.world import run_world

    server = box_server()
    if server == "asyncssh":
        out.print("note: the box is an asyncssh server in this process (OpenSSH's sshd is used when installed)",
                  highlight=False, soft_wrap=True)
    with run_world(root / "sim", box_server=server) as world:
        # a real job's costs (12 GB image, 34 GB of weights at the offer's bandwidth, load + quantize)
        # on a clock compressed 2000x, so the phase breakdown shows where the time goes
        world.model_costs(time_factor=DEMO_TIME_FACTOR, image_gb=12.0, load_s=240 * DEMO_TIME_FACTOR)
        settings = world.settings()
        out.print(f"simulator up: Vast.ai emulator {world.vast.url}, box ssh {world.sshd.info.host}:"
                  f"{world.sshd.info.port}, S3 {world.s3.endpoint_url}")
        notifier = CliNotifier(out)
        async with JobStore(settings.db_path) as store:
            async with VastClient.from_settings(settings) as vast:
                d = await draft(store, settings, source=demo_dataset(), user_id="demo", user_name="demo",
                                origin="cli", name="demo sun", trigger="sunstyle", preset="fast",
                                overrides={"steps": steps, "save_every": max(1, steps // 2),
                                           "sample_every": max(1, steps // 2)}, vast=vast)
            report = d.report
            if report is not None:
                out.print(f"dataset: {report.images} images, {report.captioned} captioned, ready={report.ready}")
            if not d.ok:
                return {"job_id": d.job.id, "state": d.job.state.value, "lora_url": None,
                        "instances_left": len(world.vast.live_instances()), "cost_usd": 0.0, "reason": d.message}
            if d.quote is not None:
                out.print(f"quote: {d.quote.summary()}")
            worker = Worker(store, settings, notifier, reaper=False, adopt=False)
            await worker.start(recover=False)
            t0 = time.monotonic()
            try:
                notifier.start()
                await worker.submit(d.job.id)
                job = await worker.wait(d.job.id, timeout=600)
            finally:
                notifier.stop()
                await worker.stop()
            return {
                "job_id": job.id,
                "state": job.state.value,
                "lora_url": job.lora_url,
                "instances_left": len(world.vast.live_instances()),
                "cost_usd": round(job.cost_so_far(), 6),
                "reason": job.reason,
                "steps": job.step,
                "final_loss": job.loss,
                "wall_s": round(time.monotonic() - t0, 2),
                "phases": phases.summary(job),
                "phase_line": phases.compact_line(job),
                "phase_table": phases.table(job),
                "time_factor": DEMO_TIME_FACTOR,
            }


def demo(
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON summary line on stdout.")] = False,
    steps: Annotated[int, typer.Option("--steps", min=1, max=2000, help="Training steps of the job.")] = DEMO_STEPS,
) -> None:
    """Run one whole job on the built-in local simulator (no account, no GPU, no network)."""
    missing = _missing()
    if missing:
        fail(missing, EXIT_INFRA)
    out = Console(stderr=True) if as_json else Console()
    with tempfile.TemporaryDirectory(prefix="lorabot-demo-") as tmp:
        summary = asyncio.run(_run(Path(tmp), out, steps))
    if as_json:
        sys.stdout.flush()
        print_json(summary)
    else:
        out.print(f"\n[bold]{summary['state']}[/]: {summary['reason']}")
        if summary.get("lora_url"):
            out.print(f"LoRA: {summary['lora_url']} (the local S3 server is gone now that the demo ended)")
        out.print(f"cost ${summary['cost_usd']:.4f}, instances left: {summary['instances_left']}")
        if summary.get("phase_table"):
            out.print(f"\ntime per phase, measured on the simulator (pull, download and load on a clock "
                      f"{1 / summary['time_factor']:.0f}x compressed); the estimate is the quote for a real GPU:",
                      highlight=False)
            out.print(summary["phase_table"], highlight=False, markup=False)
    raise typer.Exit(EXIT_OK if summary["state"] == "succeeded" and summary["instances_left"] == 0 else EXIT_NOT_READY)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
