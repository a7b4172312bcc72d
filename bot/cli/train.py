"""Training from the command line: `lorabot train/launch/ssh/status/cancel/logs`.

A second front-end beside Discord, on the same services (intake.draft, Worker, the store, Box, Storage)
and the same Notifier protocol; nothing here decides anything a cog would not.

Several processes share one store (SQLite in WAL mode). A job is driven by exactly one worker: the
one holding its lease. `lorabot train` and `lorabot launch` drive the job they create in the
foreground with their own Worker (adopt=False, reaper=False: they never take over anybody else's
job). `status`, `logs` and `ssh` only read the store; `cancel` goes through Worker.cancel, which asks
the driving process through the store (`cancel_requested`) or, when nobody drives the job, runs the
cancel itself. A detached job (Ctrl-C -> detach) keeps its box; its lease is released so the bot's
worker adopts it, or `lorabot train --attach JOB` drives it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import getpass
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.table import Table

from bot.cli.common import (
    EXIT_CANCELLED,
    EXIT_INFRA,
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_USAGE,
    console,
    err_console,
    fail,
    print_json,
    run,
    settings,
)
from bot.cli.jobs import job_summary

if TYPE_CHECKING:
    from services.jobs import Job, JobStore
    from services.jobs.events import JobEvent
    from services.jobs.intake import Draft
    from services.jobs.worker import Worker
    from services.settings import Settings

EXIT_FAILED = 1  # the job ran and failed (or the dataset is not ready)
EXIT_DETACHED = 5  # the job goes on without this process (Ctrl-C -> detach, SIGTERM)


# failure kinds that are the infrastructure's fault rather than the job's (services/jobs/pipeline.py)
INFRA_KINDS = frozenset({
    "provider", "no_offers", "account", "instance_gone", "instance_failed", "not_ready", "ssh_lost", "upload",
    "supervisor_lost", "collect", "destroy",
})
USAGE_KINDS = frozenset({"config"})

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout; progress goes to stderr.")]
JobArg = Annotated[str, typer.Argument(help="The job id (see `lorabot status`).")]


class OnInterrupt(enum.StrEnum):
    ASK = "ask"
    DETACH = "detach"
    CANCEL = "cancel"


# --- small helpers -------------------------------------------------------------------------------
def _cli_user() -> tuple[str, str]:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return f"cli:{name}", name


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 90 * 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def exit_code_for(job: Job) -> int:
    from services.jobs import JobState

    if job.state in (JobState.SUCCEEDED, JobState.PREPARED):
        return EXIT_OK
    if job.state == JobState.CANCELLED:
        return EXIT_CANCELLED
    if job.state == JobState.FAILED:
        if job.failure_kind in INFRA_KINDS:
            return EXIT_INFRA
        if job.failure_kind in USAGE_KINDS:
            return EXIT_USAGE
        return EXIT_FAILED
    return EXIT_DETACHED  # not finished: it goes on elsewhere


def driven_by(job: Job, s: Settings, now: float | None = None) -> str | None:
    """The live worker holding the job's lease, if any."""
    now = now or time.time()
    if job.owner and (job.owner_seen_at or 0) > now - s.lease_s:
        return job.owner
    return None


def has_live_box(job: Job) -> bool:
    return (job.state.holds_instance and job.instance_id is not None and job.instance_gone_at is None
            and bool(job.ssh_host and job.ssh_port and job.host_key))


def job_root(job: Job, s: Settings) -> str:
    import posixpath

    return job.remote_dir or posixpath.join(s.remote_root, "jobs", job.id)


def job_detail(job: Job, s: Settings) -> dict[str, Any]:
    from services.ssh import fingerprint

    doc = job_summary(job)
    doc.update({
        "phase": job.phase,
        "failure_kind": job.failure_kind,
        "progress": round(job.progress, 4),
        "sec_per_step": job.sec_per_step,
        "gpu_name": job.gpu_name,
        "train": job.train,
        "quote": {k: job.quote.get(k) for k in ("total_low_s", "total_high_s", "cost_low_usd", "cost_high_usd")}
        if job.quote else None,
        "driven_by": driven_by(job, s),
        "detached": job.detached,
        "cancel_requested": job.cancel_requested,
        "link_expires_at": job.link_expires_at,
        "artifacts": job.artifacts,
        "live_box": has_live_box(job),
        "ssh": None,
        "breakdown": _breakdown(job),
    })
    if has_live_box(job):
        assert job.host_key is not None
        doc["ssh"] = {"host": job.ssh_host, "port": job.ssh_port, "user": s.ssh_user, "job_root": job_root(job, s),
                      "host_key_fingerprint": fingerprint(job.host_key)}
    return doc


def _breakdown(job: Job) -> dict[str, Any] | None:
    """Issue 18: measured seconds per phase beside the quote's estimate, billed seconds, bytes downloaded."""
    from services.jobs import phases

    if not job.measured.get("phases"):
        return None
    return {**phases.summary(job), "line": phases.compact_line(job), "table": phases.table(job)}


def _with_store(s: Settings, fn: Callable[[JobStore], Awaitable[Any]]) -> Any:
    from services.jobs import JobStore

    async def go() -> Any:
        async with JobStore(s.db_path) as store:
            return await fn(store)

    return run(go())


def _load_job(s: Settings, job_id: str) -> Job:
    async def get(store: JobStore) -> Job | None:
        return await store.get(job_id)

    job: Job | None = _with_store(s, get)
    if job is None:
        fail(f"no job {job_id!r} in {s.db_path} (see `lorabot status`)", EXIT_USAGE)
    return job


# --- live progress: the CLI's Notifier -----------------------------------------------------------
class CliNotifier:
    """Renders job events on a console: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, out: Console, *, show_logs: bool = False, line_every_s: float = 5.0) -> None:
        self.out = out
        self.show_logs = show_logs
        self.line_every_s = line_every_s
        self.live = out.is_terminal
        self._progress: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._held: list[tuple[str, str]] | None = None  # lines kept back while a question is asked

    def start(self) -> None:
        if not self.live or self._progress is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[info]}"), console=self.out,
                                  transient=False)
        self._task = self._progress.add_task("starting", total=None, info="")
        self._progress.start()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def pause(self, paused: bool) -> None:
        """Hold output back while a question is asked; then show what was held and the live display."""
        if paused:
            self._held = []
            if self._progress is not None:
                self._progress.stop()
            return
        held, self._held = self._held or [], None
        if self._progress is not None:
            self._progress.start()
        for text, style in held:
            self.say(text, style)

    def say(self, text: str, style: str = "") -> None:
        if self._held is not None:
            self._held.append((text, style))
            return
        target = self._progress.console if self._progress is not None else self.out
        stamp = time.strftime("%H:%M:%S")
        target.print(f"[dim]{stamp}[/] " + (f"[{style}]{text}[/]" if style else text), highlight=False,
                     soft_wrap=True)

    def _describe(self, phase: str, info: str, step: int | None = None, total: int | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=phase, info=info,
                                  **({"completed": step, "total": total or None} if step is not None else {}))

    async def notify(self, job: Job, event: JobEvent) -> None:
        from rich.markup import escape

        from services.jobs import events as ev

        cost = f"${job.cost_so_far():.3f}"
        if isinstance(event, ev.StateChanged):
            self.say(f"job {job.id}: {event.state.value}" + (f" — {escape(event.reason)}" if event.reason else ""),
                     "bold")
            self._describe(event.state.value, cost)
        elif isinstance(event, ev.Queued):
            self.say(f"job {job.id}: queued (position {event.position})")
        elif isinstance(event, ev.Readiness):
            self.say(f"{event.step}" + (f": {escape(event.detail)}" if event.detail else ""))
            self._describe(event.step, cost)
        elif isinstance(event, ev.Progress):
            loss = f"loss {event.loss:.4f}" if event.loss is not None else "loss -"
            info = f"{loss} · ETA {_fmt_s(event.eta_s)} · {f'${event.cost_usd:.3f}' if event.cost_usd else cost}"
            self._describe(event.phase, info, event.step, event.total)
            now = time.monotonic()
            if not self.live and (now - self._last_line >= self.line_every_s or event.step >= event.total):
                self._last_line = now
                self.say(f"{event.phase} step {event.step}/{event.total} · {info}")
        elif isinstance(event, ev.LogSnippet):
            if self.show_logs:
                self.say("log:\n" + escape(event.text), "dim")
        elif isinstance(event, ev.SampleImage):
            self.say(f"sample{f' at step {event.step}' if event.step is not None else ''}: {event.path}")
        elif isinstance(event, ev.CheckpointSaved):
            self.say(f"checkpoint at step {event.step}" + (" (backed up to R2)" if event.backed_up else ""))
        elif isinstance(event, ev.CostUpdate):
            self._describe("training", f"${event.cost_usd:.3f} at ${event.dph_total:.3f}/h")
        elif isinstance(event, ev.Finished):
            self.say(f"finished in {_fmt_s(event.duration_s)} for ${event.cost_usd:.3f}; "
                     f"final loss {event.final_loss if event.final_loss is not None else '-'}", "green")
        elif isinstance(event, ev.Failed):
            what = "failed (retrying on another machine)" if event.retrying else "failed"
            self.say(f"{what}: [{event.kind}] {escape(event.reason)}", "red")
            if event.last_lines and not event.retrying:
                self.say("last lines:\n" + escape(event.last_lines[-1200:]), "dim")
        elif isinstance(event, ev.Cancelled):
            gone = f"; destroyed instance {event.destroyed_instance_id}" if event.destroyed_instance_id else ""
            self.say(f"cancelled, cost ${event.cost_usd:.3f}{gone}", "yellow")
            if event.partial_url:
                self.say(f"partial LoRA: {event.partial_url}")


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
    user_id, _ = _cli_user()
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


def _result_doc(s: Settings, outcome: Outcome, instances_left: int | None) -> dict[str, Any]:
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


# --- draft and confirmation ----------------------------------------------------------------------
def _require_for_renting(s: Settings, *, r2: bool) -> None:
    from services.settings import SettingsError

    try:
        s.require("vastai_api_key", why="to rent a GPU")
        if r2:
            s.require("r2_bucket", "r2_access_key_id", "r2_secret_access_key", why="to store the LoRA")
    except SettingsError as exc:
        fail(str(exc))
    key = s.ssh_key_path
    if not key.is_file() or not Path(str(key) + ".pub").is_file():
        fail(f"VASTAI_SSH_KEY_PATH: {key} and {key}.pub must both exist (the key the rented machine trusts)")


def _print_draft(d: Draft, out: Console) -> None:
    from rich.markup import escape

    if d.report is not None:
        out.print(escape(d.report.render_summary()), highlight=False)
        for p in d.report.problems[:30]:
            out.print(f"  [red]{escape(p.code)}[/] {escape(p.path or '')}: {escape(p.message)}", highlight=False)
        if len(d.report.problems) > 30:
            out.print(f"  … and {len(d.report.problems) - 30} more")
    if d.offer is not None:
        o = d.offer
        out.print(f"best offer: {o.gpu_name} in {o.geolocation or '?'} at ${o.dph_total:.3f}/h "
                  f"(reliability {o.reliability:.3f}, {o.inet_down:.0f} Mbit/s down)", highlight=False)
    if d.quote is not None:
        out.print(f"quote: {escape(d.quote.summary())}", highlight=False)
        for note in d.quote.notes:
            out.print(f"  note: {escape(note)}", highlight=False)


def _draft_exit_code(d: Draft) -> int:
    if d.report is not None and not d.report.ready:
        return EXIT_USAGE if d.report.summary.startswith("rejected") else EXIT_NOT_READY
    return exit_code_for(d.job) if d.job.failure_kind not in (None, "user") else EXIT_USAGE


def _make_draft(s: Settings, source: str, *, name: str, trigger: str, preset: str | None, steps: int | None,
                rank: int | None, lr: float | None, max_price: float | None, train: bool) -> Draft:
    from services.jobs import JobStore
    from services.jobs.intake import draft
    from services.vastai import VastClient

    overrides = {k: v for k, v in {"steps": steps, "rank": rank, "learning_rate": lr}.items() if v is not None}
    user_id, user_name = _cli_user()
    src: str | Path = Path(source) if Path(source).exists() else source

    async def go() -> Draft:
        async with JobStore(s.db_path) as store, VastClient.from_settings(s) as vast:
            return await draft(store, s, source=src, user_id=user_id, user_name=user_name, origin="cli", name=name,
                               trigger=trigger, preset=preset, overrides=overrides, max_price=max_price, vast=vast,
                               train=train)

    from services.jobs.errors import JobRefused

    try:
        return run(go())
    except JobRefused as exc:  # a per-user cap or the intake rate (issue 13)
        fail(f"not started: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        fail("interrupted while checking the dataset; nothing was rented", EXIT_CANCELLED)


def _confirm(s: Settings, d: Draft, *, yes: bool, as_json: bool, what: str, out: Console) -> None:
    from services.jobs.intake import decline

    if yes:
        return
    if as_json or not sys.stdin.isatty():
        _with_store(s, lambda st: decline(st, d.job.id, "not confirmed (no --yes without a terminal)"))
        fail("confirmation needed: pass --yes (no prompts with --json or without a terminal); nothing was rented")
    try:
        confirmed = typer.confirm(f"Rent a {d.offer.gpu_name if d.offer else 'GPU'} and {what}?", default=False,
                                  err=out is err_console)
    except click.exceptions.Abort:  # Ctrl-C or EOF at the prompt
        confirmed = False
    if not confirmed:
        _with_store(s, lambda st: decline(st, d.job.id, "declined on the command line"))
        out.print("declined; nothing was rented")
        raise typer.Exit(EXIT_CANCELLED)


def _drive_job(s: Settings, job_id: str, *, fresh: bool, out: Console, show_logs: bool, on_interrupt: OnInterrupt,
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

            _with_store(s, lambda st: decline(st, job_id, f"refused: {why}"))
        fail(f"not started: {why}", EXIT_USAGE)


def _finish(s: Settings, outcome: Outcome, *, as_json: bool, out: Console) -> NoReturn:
    job = outcome.job
    left = run(_instances_left(s, job)) if job.instance_id is not None or job.label else 0
    code = exit_code_for(job) if outcome.how != "detached" else EXIT_DETACHED
    if as_json:
        print_json(_result_doc(s, outcome, left))
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


# --- commands ------------------------------------------------------------------------------------
SourceArg = Annotated[str | None, typer.Argument(help="A zip file, a folder, or an https URL of images + captions.")]
NameOpt = Annotated[str | None, typer.Option("--name", help="The LoRA's name.")]
TriggerOpt = Annotated[str | None, typer.Option("--trigger", help="The trigger word, put in every caption.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Training steps (preset default otherwise).")]
RankOpt = Annotated[int | None, typer.Option("--rank", min=1, help="LoRA rank.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Recipe preset (character, style, ...).")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate.")]
PriceOpt = Annotated[float | None, typer.Option("--max-price", help="Highest $/h to pay (capped by the server's).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Skip the confirmation prompt.")]
InterruptOpt = Annotated[OnInterrupt, typer.Option(
    "--on-interrupt", help="What Ctrl-C/SIGTERM do: ask (on a terminal; else detach), detach, or cancel.")]


def train(
    source: SourceArg = None,
    name: NameOpt = None,
    trigger: TriggerOpt = None,
    steps: StepsOpt = None,
    rank: RankOpt = None,
    preset: PresetOpt = None,
    lr: LrOpt = None,
    max_price: PriceOpt = None,
    yes: YesOpt = False,
    logs: Annotated[bool, typer.Option("--logs", help="Show log snippets while training.")] = False,
    attach: Annotated[str | None, typer.Option(
        "--attach", metavar="JOB", help="Drive an existing job whose lease is free (after a detach).")] = None,
    on_interrupt: InterruptOpt = OnInterrupt.ASK,
    as_json: JsonOpt = False,
) -> None:
    """Train a LoRA: dataset check, quote, confirmation, then rent, train and store it, in the foreground.

    Ctrl-C asks: cancel the job (its machine is destroyed) or detach (it keeps running, and billing).
    Without a terminal, Ctrl-C and SIGTERM detach (unless --on-interrupt cancel).
    `lorabot train --attach JOB` drives a detached job again; `lorabot status` lists them.

    Exit codes:
    0 succeeded (the link is printed);
    1 the job failed, or the dataset is not ready;
    2 usage error, rejected archive, or refused (budget; --yes needed);
    3 infrastructure failure (Vast.ai, the machine, SSH, R2);
    4 cancelled or declined;
    5 detached: the job goes on without this process.
    """
    s = settings()
    out = err_console if as_json else console
    interactive = sys.stdin.isatty() and not as_json
    if attach is not None:
        if source is not None:
            fail("give either SOURCE or --attach JOB, not both")
        _require_for_renting(s, r2=True)
        job = _load_job(s, attach)
        _check_attachable(s, job)
        if job.state.terminal:
            _finish(s, Outcome(job, "ended"), as_json=as_json, out=out)
        outcome = _drive_job(s, job.id, fresh=False, out=out, show_logs=logs, on_interrupt=on_interrupt,
                             interactive=interactive)
        _finish(s, outcome, as_json=as_json, out=out)
    if source is None or not name or not trigger:
        fail("SOURCE, --name and --trigger are needed (or --attach JOB)")
    _require_for_renting(s, r2=True)
    d = _make_draft(s, source, name=name, trigger=trigger, preset=preset, steps=steps, rank=rank, lr=lr,
                    max_price=max_price, train=True)
    _print_draft(d, out)
    if not d.ok:
        if as_json:
            doc = _result_doc(s, Outcome(d.job, "ended"), 0)
            doc["exit_code"] = _draft_exit_code(d)
            doc["message"] = d.message
            doc["report"] = d.report.model_dump(mode="json") if d.report else None
            print_json(doc)
            raise typer.Exit(doc["exit_code"])
        fail(f"not started: {d.message}", _draft_exit_code(d))
    out.print(f"job {d.job.id}")
    _confirm(s, d, yes=yes, as_json=as_json, what=f"train {name!r}", out=out)
    outcome = _drive_job(s, d.job.id, fresh=True, out=out, show_logs=logs, on_interrupt=on_interrupt,
                         interactive=interactive)
    _finish(s, outcome, as_json=as_json, out=out)


def _check_attachable(s: Settings, job: Job) -> None:
    from services.jobs import JobState

    if job.state.terminal:
        return  # nothing to drive: _finish reports how it ended
    if job.state in (JobState.VALIDATING, JobState.AWAITING_CONFIRMATION):
        fail(f"job {job.id} was never confirmed ({job.state.value}); start a new one with `lorabot train`")
    if job.state == JobState.PREPARED:
        fail(f"job {job.id} is a `lorabot launch` box (prepared): use `lorabot ssh {job.id}`, and "
             f"`lorabot cancel {job.id}` when done")
    owner = driven_by(job, s)
    if owner is not None:
        fail(f"job {job.id} is driven by {owner}; watch it with `lorabot status {job.id} --follow` (if that "
             f"process died, its lease runs out within {s.lease_s:.0f} s)")


def launch(
    source: Annotated[str, typer.Argument(help="A zip file, a folder, or an https URL of images + captions.")],
    name: Annotated[str, typer.Option("--name", help="The LoRA's name.")],
    trigger: Annotated[str, typer.Option("--trigger", help="The trigger word.")],
    steps: StepsOpt = None,
    rank: RankOpt = None,
    preset: PresetOpt = None,
    lr: LrOpt = None,
    max_price: PriceOpt = None,
    yes: YesOpt = False,
    shell: Annotated[bool, typer.Option("--shell/--no-shell", help="Open a shell at the job root (on a terminal).")]
    = True,
    on_interrupt: InterruptOpt = OnInterrupt.ASK,
    as_json: JsonOpt = False,
) -> None:
    """Rent a GPU and prepare a job without training: dataset, rendered config and supervisor shipped.

    The job stops in state `prepared`; on a terminal you get a shell at the job root, and the ssh command.
    The machine bills until `lorabot cancel JOB` (the reaper covers it once the job ends).

    Exit codes:
    0 prepared;
    1 failed, or the dataset is not ready;
    2 usage error or rejected archive;
    3 infrastructure failure;
    4 cancelled;
    5 detached while preparing.
    """
    s = settings()
    out = err_console if as_json else console
    interactive = sys.stdin.isatty() and not as_json
    _require_for_renting(s, r2=False)
    d = _make_draft(s, source, name=name, trigger=trigger, preset=preset, steps=steps, rank=rank, lr=lr,
                    max_price=max_price, train=False)
    _print_draft(d, out)
    if not d.ok:
        fail(f"not started: {d.message}", _draft_exit_code(d))
    out.print(f"job {d.job.id}")
    _confirm(s, d, yes=yes, as_json=as_json, what=f"prepare {name!r} (no training)", out=out)
    outcome = _drive_job(s, d.job.id, fresh=True, out=out, show_logs=False, on_interrupt=on_interrupt,
                         interactive=interactive)
    job = outcome.job
    from services.jobs import JobState

    if outcome.how != "ended" or job.state != JobState.PREPARED:
        _finish(s, outcome, as_json=as_json, out=out)
    known_hosts = write_known_hosts(s, job)
    root = job_root(job, s)
    argv = ssh_argv(s, job, known_hosts, interactive_shell_command(root), tty=True)
    cmd = shlex.join(argv)
    if as_json:
        doc = _result_doc(s, outcome, None)
        doc.update({"job_root": root, "ssh_command": cmd, "ssh_argv": argv, "known_hosts": str(known_hosts)})
        print_json(doc)
        raise typer.Exit(EXIT_OK)
    console.print(f"[green]prepared[/]: job {job.id} on instance {job.instance_id} at ${job.dph_total or 0:.3f}/h; "
                  f"files in {root}", highlight=False, soft_wrap=True)
    console.print(f"ssh: {cmd}", highlight=False, soft_wrap=True)
    console.print(f"(or `lorabot ssh {job.id}`; stop billing with `lorabot cancel {job.id}`)", highlight=False)
    if shell and sys.stdin.isatty() and sys.stdout.isatty():
        subprocess.run(argv, check=False)
        console.print(f"[yellow]the machine is still running (${job.dph_total or 0:.3f}/h):[/] "
                      f"`lorabot cancel {job.id}` when you are done", highlight=False)
    raise typer.Exit(EXIT_OK)


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
    job = _load_job(s, job_id)
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
            _fmt_s(job.eta_s) if job.state.value == "training" else "-", f"${job.cost_so_far():.3f}",
            str(job.instance_id) if job.instance_id and not job.instance_gone_at else "-"]


def _print_detail(doc: dict[str, Any], *, phases: bool = False) -> None:
    from rich.markup import escape

    lines = [f"[bold]job {doc['job_id']}[/] {escape(doc['name'] or '')}: [bold]{doc['state']}[/]"]
    if doc["reason"]:
        lines.append(f"reason: {escape(doc['reason'])}" + (f" [{doc['failure_kind']}]" if doc["failure_kind"] else ""))
    if doc["total_steps"]:
        loss = f", loss {doc['loss']:.4f}" if doc["loss"] is not None else ""
        lines.append(f"progress: {doc['step']}/{doc['total_steps']} ({doc['progress']:.0%}){loss}, "
                     f"ETA {_fmt_s(doc['eta_s'])}" + (f", phase {doc['phase']}" if doc["phase"] else ""))
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
        found: list[Job] = _with_store(s, lambda st: st.find(limit=limit))
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
    job = _load_job(s, job_id)
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
                    prog = f" {job.step}/{job.total_steps}{loss} ETA {_fmt_s(job.eta_s)}" if job.step else ""
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
    job = _load_job(s, job_id)
    if job.state.terminal:
        result = CancelResult(job, None, job.cost_so_far())
        already = True
    else:
        already = False
        user_id, _ = _cli_user()

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
    job = _load_job(s, job_id)
    if has_live_box(job):
        try:
            if run(_box_log(s, job, follow=follow)):
                raise typer.Exit(EXIT_OK)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_OK) from None
        job = _load_job(s, job_id)  # it may have ended meanwhile: try the stored copy
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
    app.command("train")(train)
    app.command("launch")(launch)
    app.command("ssh")(ssh)
    app.command("status")(status)
    app.command("cancel")(cancel)
    app.command("logs")(logs)


__all__ = ["EXIT_DETACHED", "CliNotifier", "register"]
