"""Driving a job in the foreground: the worker runs here, Ctrl-C/SIGTERM cancel or detach, the outcome is reported.

Several processes share one store (SQLite in WAL mode). A job is driven by exactly one worker: the
one holding its lease. `lorabot train` and `lorabot launch` drive the job they create in the
foreground with their own Worker (adopt=False, reaper=False: they never take over anybody else's
job). A detached job (Ctrl-C -> detach) keeps its box; its lease is released so the bot's
worker adopts it, or `lorabot train --attach JOB` drives it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console

from bot.cli.common import (
    EXIT_USAGE,
    console,
    err_console,
    fail,
    print_json,
    run,
)
from bot.cli.jobkit import EXIT_DETACHED, OnInterrupt, cli_user, exit_code_for, with_store
from bot.cli.jobs import job_summary

if TYPE_CHECKING:
    from services.jobs import Job, JobStore
    from services.jobs.worker import Worker
    from services.settings import Settings

from bot.cli.progress import CliNotifier


# --- driving a job in the foreground -------------------------------------------------------------
@dataclass
class Outcome:
    job: Job
    how: str  # "ended" | "cancelled" | "detached"
    destroyed_instance_id: int | None = None


async def _ask_interrupt(out: Console) -> OnInterrupt | None:
    """Read a choice from the terminal without blocking the loop (the job goes on meanwhile)."""
    loop = asyncio.get_running_loop()
    out.print("\n[bold]Interrupted.[/] \\[c]ancel the job (destroys the machine), \\[d]etach (it keeps running "
              "and billing without this process), or \\[r]esume watching? \\[c/d/R] ", end="", highlight=False)
    out.file.flush()
    fut: asyncio.Future[str] = loop.create_future()

    def readable() -> None:
        line = sys.stdin.readline()
        if not fut.done():
            fut.set_result(line)

    loop.add_reader(sys.stdin.fileno(), readable)
    try:
        answer = (await fut).strip().lower()
    finally:
        loop.remove_reader(sys.stdin.fileno())
    if answer.startswith("c"):
        return OnInterrupt.CANCEL
    if answer.startswith("d"):
        return OnInterrupt.DETACH
    return None


async def drive(
    store: JobStore,
    worker: Worker,
    job_id: str,
    waiter: Awaitable[Job],
    *,
    out: Console,
    on_interrupt: OnInterrupt,
    interactive: bool,
    pause: Callable[[bool], None] | None = None,
) -> Outcome:
    """Wait for the job while this process drives it; SIGINT/SIGTERM cancel or detach it.

    `pause(True)` hides the live display while a question is asked, `pause(False)` brings it back."""
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    wait_task: asyncio.Task[Job] = asyncio.ensure_future(waiter)
    user_id, _ = cli_user()
    try:
        while True:
            sig_task = asyncio.ensure_future(signals.get())
            done, _ = await asyncio.wait({wait_task, sig_task}, return_when=asyncio.FIRST_COMPLETED)
            if wait_task in done:
                sig_task.cancel()
                return Outcome(wait_task.result(), "ended")
            sig = sig_task.result()
            choice: OnInterrupt | None = on_interrupt
            if choice == OnInterrupt.ASK:
                choice = OnInterrupt.DETACH
                if sig == signal.SIGINT and interactive:
                    if pause is not None:
                        pause(True)
                    ask = asyncio.ensure_future(_ask_interrupt(out))
                    done, _ = await asyncio.wait({wait_task, ask}, return_when=asyncio.FIRST_COMPLETED)
                    if pause is not None:
                        pause(False)
                    if wait_task in done:  # the job ended while we asked
                        ask.cancel()
                        out.print()
                        return Outcome(wait_task.result(), "ended")
                    choice = ask.result()
            if choice is None:
                continue
            if choice == OnInterrupt.CANCEL:
                out.print("[yellow]cancelling: stopping the trainer and destroying the machine…[/]")
                # further signals are ignored: a half-done cancel would leave a machine billing
                result = await worker.cancel(job_id, by=user_id)
                wait_task.cancel()
                return Outcome(result.job, "cancelled", result.destroyed_instance_id)
            wait_task.cancel()
            await worker.stop()  # the pipeline stops here; the box goes on; the lease is released
            await store.release(job_id, worker.owner)  # also when it was still queued here (leased, not running)
            job = await store.require(job_id)
            if not job.state.terminal:
                job = await store.update(job_id, detached=True)
            return Outcome(job, "detached" if not job.state.terminal else "ended")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not wait_task.done():
            wait_task.cancel()
        with contextlib.suppress(BaseException):
            await wait_task


async def _instances_left(s: Settings, job: Job) -> int | None:
    """Live instances labelled for this job (0 once it ended: the proof that nothing bills)."""
    from services.vastai import VastClient, VastError

    prefix = s.label_prefix
    try:
        async with VastClient.from_settings(s) as vast:
            found = await vast.list_instances()
    except VastError:
        return None
    # labels are `<prefix><install>-<job>[-<attempt>]` (older ones `<prefix><job>[-<attempt>]`); a destroyed
    # contract the list still returns (status "gone") bills nothing
    return sum(1 for i in found if i.status != "gone" and i.label and i.label.startswith(prefix)
               and job.id in i.label[len(prefix):].split("-"))


def result_doc(s: Settings, outcome: Outcome, instances_left: int | None) -> dict[str, Any]:
    job = outcome.job
    doc = job_summary(job)
    doc.update({
        "failure_kind": job.failure_kind,
        "link_expires_at": job.link_expires_at,
        "instances_left": instances_left,
        "detached": outcome.how == "detached",
        "exit_code": exit_code_for(job),
    })
    if outcome.how == "cancelled":
        doc["destroyed_instance_id"] = outcome.destroyed_instance_id
    if outcome.how == "detached":
        doc["attach"] = f"lorabot train --attach {job.id}"
    return doc


def _detach_message(job: Job) -> str:
    where = f"instance {job.instance_id} (${job.dph_total or 0:.3f}/h)" if job.instance_id else "its queue slot"
    return (f"detached: job {job.id} ({job.state.value}) keeps {where} without this process. If the Discord bot "
            f"runs on this store it adopts the job within a minute; otherwise nothing collects the LoRA or "
            f"destroys the machine until you run `lorabot train --attach {job.id}` (or `lorabot cancel {job.id}`). "
            f"Watch it with `lorabot status {job.id} --follow`.")


def drive_job(s: Settings, job_id: str, *, fresh: bool, out: Console, show_logs: bool, on_interrupt: OnInterrupt,
               interactive: bool) -> Outcome:
    """Submit (fresh) or re-attach a job, drive it here until it ends (or is prepared), with live output."""
    from services.jobs import JobStore
    from services.jobs.errors import JobRefused
    from services.jobs.worker import Worker

    notifier = CliNotifier(out, show_logs=show_logs)

    async def go() -> Outcome:
        async with JobStore(s.db_path) as store:
            worker = Worker(store, s, notifier, reaper=False, adopt=False)
            await worker.start(recover=False)
            notifier.start()
            try:
                if fresh:
                    # hold the lease before the job is queued: a bot on this store adopts queued jobs nobody holds
                    await store.claim(job_id, worker.owner, s.lease_s)
                    try:
                        await worker.submit(job_id)
                    except JobRefused:
                        await store.release(job_id, worker.owner)
                        raise
                    waiter: Awaitable[Job] = worker.wait(job_id)
                else:
                    await store.update(job_id, detached=False)
                    waiter = worker.run_here(job_id)
                return await drive(store, worker, job_id, waiter, out=out, on_interrupt=on_interrupt,
                                   interactive=interactive, pause=notifier.pause)
            finally:
                notifier.stop()
                await worker.stop()

    try:
        return run(go())
    except JobRefused as exc:
        why = str(exc)
        if fresh:
            from services.jobs.intake import decline

            with_store(s, lambda st: decline(st, job_id, f"refused: {why}"))
        fail(f"not started: {why}", EXIT_USAGE)


def finish(s: Settings, outcome: Outcome, *, as_json: bool, out: Console) -> NoReturn:
    job = outcome.job
    left = run(_instances_left(s, job)) if job.instance_id is not None or job.label else 0
    code = exit_code_for(job) if outcome.how != "detached" else EXIT_DETACHED
    if as_json:
        print_json(result_doc(s, outcome, left))
    elif outcome.how == "detached":
        out.print(_detach_message(job), highlight=False)
    elif job.lora_url:
        console.print(f"[green]LoRA ready[/] ({job.name}, ${job.cost_so_far():.3f}): {job.lora_url}",
                      highlight=False, soft_wrap=True)
    else:
        err_console.print(f"job {job.id}: {job.state.value}: {job.reason} (cost ${job.cost_so_far():.3f})",
                          highlight=False, soft_wrap=True)
    if outcome.how == "detached" and as_json:
        err_console.print(_detach_message(job), highlight=False)
    raise typer.Exit(code)

