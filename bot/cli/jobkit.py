"""What the job commands share: exit codes, the CLI user, job facts (who drives it, its box), the store."""

from __future__ import annotations

import enum
import getpass
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli.common import (
    EXIT_CANCELLED,
    EXIT_INFRA,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    run,
)
from bot.cli.jobs import job_summary

if TYPE_CHECKING:
    from services.jobs import Job, JobStore
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
def cli_user() -> tuple[str, str]:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return f"cli:{name}", name


def fmt_s(seconds: float | None) -> str:
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

def with_store(s: Settings, fn: Callable[[JobStore], Awaitable[Any]]) -> Any:
    from services.jobs import JobStore

    async def go() -> Any:
        async with JobStore(s.db_path) as store:
            return await fn(store)

    return run(go())


def load_job(s: Settings, job_id: str) -> Job:
    async def get(store: JobStore) -> Job | None:
        return await store.get(job_id)

    job: Job | None = with_store(s, get)
    if job is None:
        fail(f"no job {job_id!r} in {s.db_path} (see `lorabot status`)", EXIT_USAGE)
    return job

