"""Training from the command line: `lorabot train` and `lorabot launch`.

A second front-end beside Discord, on the same services (intake.draft, Worker, the store, Box, Storage)
and the same Notifier protocol; nothing here decides anything a cog would not. The job is driven in the
foreground (bot/cli/foreground.py); watching and stopping it is bot/cli/watch.py, its shell bot/cli/shell.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console

from bot.cli.common import (
    EXIT_CANCELLED,
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
from bot.cli.foreground import Outcome, drive_job, finish, result_doc
from bot.cli.jobkit import (
    EXIT_DETACHED,
    JsonOpt,
    OnInterrupt,
    cli_user,
    driven_by,
    exit_code_for,
    job_root,
    load_job,
    with_store,
)

if TYPE_CHECKING:
    from services.jobs import Job
    from services.jobs.intake import Draft
    from services.settings import Settings

from bot.cli.progress import CliNotifier
from bot.cli.shell import interactive_shell_command, ssh_argv, write_known_hosts


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
    user_id, user_name = cli_user()
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
        with_store(s, lambda st: decline(st, d.job.id, "not confirmed (no --yes without a terminal)"))
        fail("confirmation needed: pass --yes (no prompts with --json or without a terminal); nothing was rented")
    try:
        confirmed = typer.confirm(f"Rent a {d.offer.gpu_name if d.offer else 'GPU'} and {what}?", default=False,
                                  err=out is err_console)
    except click.exceptions.Abort:  # Ctrl-C or EOF at the prompt
        confirmed = False
    if not confirmed:
        with_store(s, lambda st: decline(st, d.job.id, "declined on the command line"))
        out.print("declined; nothing was rented")
        raise typer.Exit(EXIT_CANCELLED)


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
        job = load_job(s, attach)
        _check_attachable(s, job)
        if job.state.terminal:
            finish(s, Outcome(job, "ended"), as_json=as_json, out=out)
        outcome = drive_job(s, job.id, fresh=False, out=out, show_logs=logs, on_interrupt=on_interrupt,
                             interactive=interactive)
        finish(s, outcome, as_json=as_json, out=out)
    if source is None or not name or not trigger:
        fail("SOURCE, --name and --trigger are needed (or --attach JOB)")
    _require_for_renting(s, r2=True)
    d = _make_draft(s, source, name=name, trigger=trigger, preset=preset, steps=steps, rank=rank, lr=lr,
                    max_price=max_price, train=True)
    _print_draft(d, out)
    if not d.ok:
        if as_json:
            doc = result_doc(s, Outcome(d.job, "ended"), 0)
            doc["exit_code"] = _draft_exit_code(d)
            doc["message"] = d.message
            doc["report"] = d.report.model_dump(mode="json") if d.report else None
            print_json(doc)
            raise typer.Exit(doc["exit_code"])
        fail(f"not started: {d.message}", _draft_exit_code(d))
    out.print(f"job {d.job.id}")
    _confirm(s, d, yes=yes, as_json=as_json, what=f"train {name!r}", out=out)
    outcome = drive_job(s, d.job.id, fresh=True, out=out, show_logs=logs, on_interrupt=on_interrupt,
                         interactive=interactive)
    finish(s, outcome, as_json=as_json, out=out)


def _check_attachable(s: Settings, job: Job) -> None:
    from services.jobs import JobState

    if job.state.terminal:
        return  # nothing to drive: finish reports how it ended
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
    outcome = drive_job(s, d.job.id, fresh=True, out=out, show_logs=False, on_interrupt=on_interrupt,
                         interactive=interactive)
    job = outcome.job
    from services.jobs import JobState

    if outcome.how != "ended" or job.state != JobState.PREPARED:
        finish(s, outcome, as_json=as_json, out=out)
    known_hosts = write_known_hosts(s, job)
    root = job_root(job, s)
    argv = ssh_argv(s, job, known_hosts, interactive_shell_command(root), tty=True)
    cmd = shlex.join(argv)
    if as_json:
        doc = result_doc(s, outcome, None)
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


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("launch")(launch)


__all__ = ["EXIT_DETACHED", "CliNotifier", "register"]
