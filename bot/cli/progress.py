"""The CLI's Notifier: job events rendered on a console (a rich progress bar on a terminal, lines otherwise)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console

from bot.cli.jobkit import fmt_s

if TYPE_CHECKING:
    from services.jobs import Job
    from services.jobs.events import JobEvent



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
            info = f"{loss} · ETA {fmt_s(event.eta_s)} · {f'${event.cost_usd:.3f}' if event.cost_usd else cost}"
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
            self.say(f"finished in {fmt_s(event.duration_s)} for ${event.cost_usd:.3f}; "
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

