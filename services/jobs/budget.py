"""What a user or the server may still spend (issue 13, "budgets that hold").

Exposure = money billed since the start of the budget day (by billing time: a job rented at 23:59
is billed mostly the next day) + what every confirmed, unfinished job may still spend (its quote's
`cost_high` minus what it has already cost). A queued job that has rented nothing yet therefore
reserves its whole `cost_high`: ten confirms cannot all pass a budget that fits two.

Pure functions over jobs; the store evaluates them inside the transaction that queues a job.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

from services.jobs.model import Job, JobState

S = JobState
# confirmed and not finished: these may still spend money
COMMITTED = frozenset({S.QUEUED, S.RENTING, S.WAITING_READY, S.UPLOADING, S.PREPARED, S.TRAINING, S.COLLECTING})
# drafts: count against LORABOT_MAX_OPEN_DRAFTS_PER_USER
OPEN_DRAFTS = frozenset({S.VALIDATING, S.AWAITING_CONFIRMATION})


def day_start(now: float | None = None) -> float:
    """The start of the budget day (UTC midnight)."""
    d = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return d.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def cost_high(job: Job) -> float:
    return float(job.quote.get("cost_high") or 0.0)


def billed_since(job: Job, since: float, now: float | None = None) -> float:
    """The part of the job's cost billed at or after `since`, spread evenly over its rental time
    (which ends when the instance was gone, or now while it runs)."""
    now = time.time() if now is None else now
    cost = job.cost_so_far(now)
    if cost <= 0:
        return 0.0
    rented = job.rental_seconds(now)
    end = job.instance_gone_at or (now if job.rented_at is not None else job.finished_at or job.updated_at)
    start = end - rented
    if rented <= 0 or start >= since:
        return cost if end >= since else 0.0
    if end <= since:
        return 0.0
    return cost * (end - since) / rented


def remaining(job: Job, now: float | None = None) -> float:
    """What a confirmed, unfinished job may still spend: its high estimate less what it has cost."""
    if job.state not in COMMITTED:
        return 0.0
    return max(0.0, cost_high(job) - job.cost_so_far(now))


def exposure(jobs: Iterable[Job], since: float, now: float | None = None) -> float:
    now = time.time() if now is None else now
    return round(sum(billed_since(j, since, now) + remaining(j, now) for j in jobs), 4)


def refusal(job: Job, jobs: list[Job], *, since: float, user_budget: float, global_budget: float,
            now: float | None = None) -> str | None:
    """Why `job` may not be queued (or start) now, in one line; None when it fits both budgets.
    `jobs` is every job that may count (the store's candidates); `job` itself counts with its
    `cost_high` whatever its current state."""
    others = [j for j in jobs if j.id != job.id]
    mine = max(cost_high(job), job.cost_so_far(now)) if job.state not in COMMITTED else (
        billed_since(job, since, now) + remaining(job, now))
    user_total = exposure((j for j in others if j.user_id == job.user_id), since, now)
    if user_total + mine > user_budget + 1e-9:
        return (f"daily budget reached: ${user_total:.2f} spent or reserved today, this job may cost "
                f"${cost_high(job):.2f}, the limit is ${user_budget:.2f} per user")
    total = exposure(others, since, now)
    if total + mine > global_budget + 1e-9:
        return (f"the server's daily budget (${global_budget:.2f}) would be passed: ${total:.2f} is spent or "
                f"reserved today and this job may cost ${cost_high(job):.2f}; try later")
    return None


def committed_elsewhere(jobs: Iterable[Job], job_id: str, now: float | None = None) -> float:
    """What every other live job may still spend (for the Vast.ai credit check before renting)."""
    return round(sum(remaining(j, now) for j in jobs if j.id != job_id), 4)
