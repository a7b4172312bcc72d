"""Typed job events and the Notifier protocol: what a front-end (Discord, the CLI) is told.

The pipeline emits these; front-ends render them. Nothing here knows about Discord.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.jobs.model import Job, JobState


@dataclass(frozen=True)
class JobEvent:
    pass


@dataclass(frozen=True)
class StateChanged(JobEvent):
    state: JobState
    reason: str = ""


@dataclass(frozen=True)
class Queued(JobEvent):
    position: int  # 1 = next to start


@dataclass(frozen=True)
class Readiness(JobEvent):
    """A step towards a usable machine: renting, rented, api_running, tcp, auth, probe, uploading,
    uploaded, launched, downloading_model, loading_model, caching_latents, training."""

    step: str
    detail: str = ""


@dataclass(frozen=True)
class Progress(JobEvent):
    phase: str
    step: int
    total: int
    loss: float | None
    sec_per_step: float | None
    eta_s: float | None
    cost_usd: float


@dataclass(frozen=True)
class LogSnippet(JobEvent):
    text: str  # already redacted


@dataclass(frozen=True)
class SampleImage(JobEvent):
    path: Path  # a local copy
    step: int | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class CheckpointSaved(JobEvent):
    step: int
    backed_up: bool = False


@dataclass(frozen=True)
class CostUpdate(JobEvent):
    cost_usd: float
    dph_total: float


@dataclass(frozen=True)
class Finished(JobEvent):
    lora_url: str
    link_expires_at: float | None
    duration_s: float
    cost_usd: float
    final_loss: float | None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed(JobEvent):
    reason: str
    kind: str  # classified failure: cuda_oom, gated_model, disk_full, stall, no_images, infra, user, ...
    last_lines: str = ""
    cost_usd: float = 0.0
    retrying: bool = False


@dataclass(frozen=True)
class Cancelled(JobEvent):
    cost_usd: float
    destroyed_instance_id: int | None = None
    partial_url: str | None = None


@dataclass(frozen=True)
class OperatorAlert(JobEvent):
    """Something only the operator can fix (an instance that could not be destroyed): goes to the
    admin channel (LORABOT_ADMIN_CHANNEL_ID), never to the job's channel."""

    text: str


class Notifier(Protocol):
    async def notify(self, job: Job, event: JobEvent) -> None: ...


class NullNotifier:
    async def notify(self, job: Job, event: JobEvent) -> None:
        return None


class FanOut:
    """Several notifiers as one; a failing front-end never stops a job."""

    def __init__(self, *notifiers: Notifier) -> None:
        self.notifiers = list(notifiers)

    async def notify(self, job: Job, event: JobEvent) -> None:
        for n in self.notifiers:
            try:
                await n.notify(job, event)
            except Exception:  # a chat outage must not kill a paid job
                logging.getLogger(__name__).exception("notifier %r failed", n)
