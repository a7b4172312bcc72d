"""A watchdog per running job, independent of the pipeline's monitor loop and of SSH (issue 13, C3).

The pipeline enforces the limits itself while its monitor loop turns; a box that hangs a command, a
stuck transfer or a bug can stop that loop. The watchdog only reads the store and the clock: past
`max_runtime + grace` or `max_job_cost x margin` it cancels the pipeline task, destroys the instance
through the Vast.ai API and fails the job. A limit stop is final: never a retry on a new machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.jobs.model import Job, JobState
from services.jobs.pipeline import Pipeline
from services.settings import Settings

log = logging.getLogger(__name__)
_CANCEL_WAIT_S = 30.0  # how long a cancelled pipeline may take to unwind before the destroy goes ahead


def limit_breached(settings: Settings, job: Job, now: float | None = None) -> tuple[str, str] | None:
    """(kind, message) when the job is past its hard runtime or cost limit, else None."""
    now = now or time.time()
    if job.state.terminal or not job.state.holds_instance or job.state == JobState.PREPARED:
        return None
    hard_runtime = settings.max_runtime_s + settings.watchdog_grace_s
    if job.state == JobState.COLLECTING:
        # a finished, paid-for LoRA is being saved from the box: one more grace before it is given up
        # (the box's own deadline allows the same; collect's commands are bounded by their timeouts)
        hard_runtime += settings.watchdog_grace_s
    if job.started_at is not None and now - job.started_at > hard_runtime:
        return "max_runtime", (f"ran longer than {settings.max_runtime_s / 3600:.1f} h and did not stop by "
                               "itself: the watchdog destroyed the machine")
    hard_cost = settings.max_job_cost * settings.watchdog_cost_margin
    if job.cost_so_far(now) > hard_cost:
        return "max_cost", (f"cost passed the ${settings.max_job_cost:.2f} cap: the watchdog destroyed "
                            "the machine")
    return None


async def watch(pipeline: Pipeline, task: asyncio.Task[Job], *, owner: str) -> Job | None:
    """Watch one job until its pipeline task ends; returns the job when the watchdog ended it."""
    s = pipeline.s
    store = pipeline.d.store
    while not task.done():
        await asyncio.wait({task}, timeout=s.watchdog_interval_s)
        if task.done():
            return None
        try:
            job = await store.get(pipeline.job_id)
        except Exception:  # a store hiccup: look again next round
            log.exception("watchdog: cannot read job %s", pipeline.job_id)
            continue
        if job is None:
            return None
        breach = limit_breached(s, job)
        if breach is None:
            continue
        kind, message = breach
        log.error("watchdog: job %s %s; cancelling its pipeline and destroying instance %s",
                  job.id, kind, job.instance_id)
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_WAIT_S)  # unwinding never holds up the destroy for long
        ended = await pipeline.end_at_limit(kind, message)
        with contextlib.suppress(Exception):
            await store.release(job.id, owner)
        return ended
    return None
