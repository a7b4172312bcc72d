"""Watching and stopping jobs: `lorabot status`, `lorabot cancel`, `lorabot logs`.

`status` and `logs` only read the store (and the box); `cancel` goes through Worker.cancel, which asks
the driving process through the store (`cancel_requested`) or, when nobody drives the job, runs the
cancel itself.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from bot.cli.common import (
    EXIT_INFRA,
    EXIT_NOT_READY,
    EXIT_OK,
    console,
    err_console,
    fail,
    print_json,
    run,
    settings,
)
from bot.cli.jobkit import (
    JobArg,
    JsonOpt,
    cli_user,
    driven_by,
    exit_code_for,
    fmt_s,
    has_live_box,
    job_detail,
    job_root,
    load_job,
    with_store,
)
from bot.cli.jobs import job_summary

if TYPE_CHECKING:
    from services.jobs import Job
    from services.settings import Settings



# --- status --------------------------------------------------------------------------------------
def _status_row(job: Job, s: Settings) -> list[str]:
    prog = f"{job.step}/{job.total_steps}" if job.total_steps else "-"
    driver = driven_by(job, s)
    if job.state.terminal:
        who = ""
    elif driver:
        who = "driven"
    elif job.detached:
        who = "detached"
    else:
        who = "free"
    return [job.id, job.state.value, who, job.name, prog, f"{job.loss:.4f}" if job.loss is not None else "-",
            fmt_s(job.eta_s) if job.state.value == "training" else "-", f"${job.cost_so_far():.3f}",
            str(job.instance_id) if job.instance_id and not job.instance_gone_at else "-"]


def _print_detail(doc: dict[str, Any], *, phases: bool = False) -> None:
    from rich.markup import escape

    lines = [f"[bold]job {doc['job_id']}[/] {escape(doc['name'] or '')}: [bold]{doc['state']}[/]"]
    if doc["reason"]:
        lines.append(f"reason: {escape(doc['reason'])}" + (f" [{doc['failure_kind']}]" if doc["failure_kind"] else ""))
    if doc["total_steps"]:
        loss = f", loss {doc['loss']:.4f}" if doc["loss"] is not None else ""
        lines.append(f"progress: {doc['step']}/{doc['total_steps']} ({doc['progress']:.0%}){loss}, "
                     f"ETA {fmt_s(doc['eta_s'])}" + (f", phase {doc['phase']}" if doc["phase"] else ""))
    rate = f" at ${doc['dph_total']:.3f}/h" if doc["dph_total"] else ""
    lines.append(f"cost: ${doc['cost_usd']:.3f}{rate}")
    if doc["instance_id"]:
        lines.append(f"instance: {doc['instance_id']} ({doc['gpu_name'] or '?'})")
    if doc["ssh"]:
        lines.append(f"ssh: `lorabot ssh {doc['job_id']}` ({doc['ssh']['host']}:{doc['ssh']['port']}, "
                     f"{doc['ssh']['host_key_fingerprint']}), job root {doc['ssh']['job_root']}")
    if doc["lora_url"]:
        lines.append(f"LoRA: {doc['lora_url']}")
    if doc.get("breakdown"):
        lines.append(f"phases: {escape(doc['breakdown']['line'])}")
    if doc["state"] not in ("succeeded", "failed", "cancelled", "prepared"):
        if doc["driven_by"]:
            lines.append(f"driven by {doc['driven_by']}")
        else:
            lines.append(f"[yellow]nothing drives this job now[/]: `lorabot train --attach {doc['job_id']}` "
                         f"(or run the Discord bot), or `lorabot cancel {doc['job_id']}`")
    if phases and doc.get("breakdown"):
        lines.append(escape(doc["breakdown"]["table"]))
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; without it, a table of recent jobs.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch the job until it ends (read-only).")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Rows in the table.")] = 20,
    as_json: JsonOpt = False,
    phase_table: Annotated[bool, typer.Option("--phases", help="The full per-phase table with the quote's estimate.")]
    = False,
) -> None:
    """Jobs in the store (a table), or one job's detail: state, reason, progress, ETA, loss, cost, link.

    Read-only: it never drives a job. --follow watches one until it ends or is prepared.
    Exit status with a JOB: 0, or (with --follow) the job's outcome as for `lorabot train`.
    """
    s = settings()
    if job_id is None:
        if follow:
            fail("--follow needs a JOB")
        found: list[Job] = with_store(s, lambda st: st.find(limit=limit))
        if as_json:
            print_json([{**job_summary(j), "failure_kind": j.failure_kind, "driven_by": driven_by(j, s),
                         "detached": j.detached} for j in found])
            return
        table = Table(title=f"{len(found)} jobs (newest first)")
        for col in ("job", "state", "driver", "name", "progress", "loss", "ETA", "cost", "instance"):
            table.add_column(col, no_wrap=col in ("job", "state"))
        for j in found:
            table.add_row(*_status_row(j, s))
        console.print(table)
        return
    job = load_job(s, job_id)
    if follow:
        job = _follow(s, job, quiet=as_json)
    doc = job_detail(job, s)
    if as_json:
        print_json(doc)
    else:
        _print_detail(doc, phases=phase_table)
    if follow:
        raise typer.Exit(exit_code_for(job))


def _follow(s: Settings, job: Job, *, quiet: bool) -> Job:
    from services.jobs import JobState, JobStore

    out = err_console
    interval = max(0.5, min(s.monitor_interval_s, 5.0))

    async def go() -> Job:
        nonlocal job
        last: tuple[Any, ...] = ()
        warned = False
        async with JobStore(s.db_path) as store:
            while not (job.state.terminal or job.state == JobState.PREPARED):
                key = (job.state, job.step, job.reason)
                if key != last and not quiet:
                    last = key
                    loss = f" loss {job.loss:.4f}" if job.loss is not None else ""
                    prog = f" {job.step}/{job.total_steps}{loss} ETA {fmt_s(job.eta_s)}" if job.step else ""
                    out.print(f"{time.strftime('%H:%M:%S')} {job.state.value}{prog} ${job.cost_so_far():.3f}",
                              highlight=False)
                if not warned and driven_by(job, s) is None and job.state != JobState.QUEUED:
                    warned = True
                    out.print(f"[yellow]nothing drives job {job.id} now[/]: `lorabot train --attach {job.id}` "
                              "drives it (status only watches)", highlight=False)
                await asyncio.sleep(interval)
                job = await store.require(job.id)
        return job

    try:
        return run(go())
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


# --- cancel --------------------------------------------------------------------------------------
def cancel(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Cancel a job wherever it runs: the trainer is stopped, the machine destroyed, the cost settled.

    Works whether this process, another (the Discord bot, a `lorabot train`) or nobody drives the job.
    Exit codes: 0 cancelled (or it had already ended); 2 no such job; 3 the driving process did not act.
    """
    from services.jobs import JobState, JobStore
    from services.jobs.errors import JobRefused
    from services.jobs.events import NullNotifier
    from services.jobs.worker import CancelResult, Worker

    s = settings()
    job = load_job(s, job_id)
    if job.state.terminal:
        result = CancelResult(job, None, job.cost_so_far())
        already = True
    else:
        already = False
        user_id, _ = cli_user()

        async def go() -> CancelResult:
            async with JobStore(s.db_path) as store:
                worker = Worker(store, s, NullNotifier(), reaper=False, adopt=False)
                await worker.start(recover=False)
                try:
                    return await worker.cancel(job_id, by=user_id)
                finally:
                    await worker.stop()

        try:
            result = run(go())
        except JobRefused as exc:
            fail(str(exc), EXIT_INFRA)
    job = result.job
    if as_json:
        print_json({**job_summary(job), "failure_kind": job.failure_kind, "already_ended": already,
                    "destroyed_instance_id": result.destroyed_instance_id, "cost_usd": result.cost_usd})
    elif already:
        console.print(f"job {job.id} had already ended: {job.state.value} (cost ${result.cost_usd:.3f})")
    else:
        gone = (f"destroyed instance {result.destroyed_instance_id}" if result.destroyed_instance_id
                else "no machine was running")
        console.print(f"job {job.id}: {job.state.value}; {gone}; cost ${result.cost_usd:.3f}", highlight=False)
        if job.state == JobState.CANCELLED and "not destroyed" in job.reason:
            err_console.print(f"[red]warning:[/] {job.reason}")
    raise typer.Exit(EXIT_OK)


# --- logs ----------------------------------------------------------------------------------------
def _emit_log(data: bytes, secrets: list[str]) -> None:
    from bot.cli.terminal import strip_controls
    from services.settings import redact

    sys.stdout.write(strip_controls(redact(data.decode(errors="replace"), secrets)))  # box bytes (L2)
    sys.stdout.flush()


async def _box_log(s: Settings, job: Job, *, follow: bool) -> bool:
    """Print the log from the box; False when the box could not be reached."""
    from services.jobs import JobState, JobStore
    from services.remote.driver import RemoteJob
    from services.ssh import Box, Endpoint, SSHError

    assert job.ssh_host and job.ssh_port and job.host_key
    endpoint = Endpoint(job.ssh_host, job.ssh_port, s.ssh_user, "proxy" if job.ssh_kind == "proxy" else "direct")
    secrets = s.secret_values()
    try:
        box = await Box.connect(endpoint, s.ssh_key_path, job.host_key, connect_timeout=s.ssh_connect_timeout_s,
                                python=s.remote_python)
    except SSHError:
        return False
    offset = 0
    async with box, JobStore(s.db_path) as store:
        remote = RemoteJob(box, job_root(job, s), s)
        while True:
            try:
                data, offset = await remote.read_log(offset, 1 << 20)
            except SSHError:
                if follow:
                    err_console.print("[yellow]lost the machine (it was probably destroyed)[/]")
                return True
            if data:
                _emit_log(data, secrets)
                continue
            if not follow:
                return True
            fresh = await store.require(job.id)
            if fresh.state.terminal or fresh.state == JobState.PREPARED or fresh.instance_gone_at:
                return True
            try:
                st = await remote.status()
            except SSHError:
                st = None
            if st is not None and (st.done or st.lost):  # the trainer exited: print the rest and stop
                data, offset = await remote.read_log(offset, 1 << 24)
                _emit_log(data, secrets)
                return True
            await asyncio.sleep(max(0.5, min(s.monitor_interval_s, 5.0)))


def logs(
    job_id: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing while the job runs.")] = False,
) -> None:
    """A job's trainer log: from its machine over SSH while it lives, else the copy stored in R2.

    Exit codes: 0 printed; 1 no log exists (the job never trained); 2 no such job; 3 R2 unreachable.
    """
    s = settings()
    job = load_job(s, job_id)
    if has_live_box(job):
        try:
            if run(_box_log(s, job, follow=follow)):
                raise typer.Exit(EXIT_OK)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_OK) from None
        job = load_job(s, job_id)  # it may have ended meanwhile: try the stored copy
    key = job.artifacts.get("log")
    if not key:
        fail(f"job {job.id} ({job.state.value}) has no stored log and no reachable machine", EXIT_NOT_READY)
    from services.storage import Storage, StorageError

    async def read() -> bytes:
        return await Storage.from_settings(s).read_bytes(key)

    try:
        data = run(read())
    except StorageError as exc:
        fail(f"cannot read the stored log: {exc}", EXIT_INFRA)
    _emit_log(data, s.secret_values())


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("cancel")(cancel)
    app.command("logs")(logs)
