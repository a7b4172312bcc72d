"""The Job and its state machine.

    validating -> awaiting_confirmation -> queued -> renting -> waiting_ready -> uploading
        -> training -> collecting -> succeeded
    (uploading -> prepared for `lorabot launch`: shipped, no training; an operator takes over)
    any non-terminal state -> failed | cancelled
    waiting_ready | uploading | training -> renting   (one retry on another machine)
    queued -> uploading   (a finished job's warm machine handed over, services/jobs/handover.py)

A job in a state of HOLDS_INSTANCE may own a rented machine; a restarted process re-attaches or
cleans those up. The instance id, offer, price, label and SSH endpoint are columns for that reason.
"""

from __future__ import annotations

import enum
import secrets
import time
from typing import Any

from pydantic import BaseModel, Field


class JobState(enum.StrEnum):
    VALIDATING = "validating"
    AWAITING_CONFIRMATION = "awaiting_confirmation"
    QUEUED = "queued"
    RENTING = "renting"
    WAITING_READY = "waiting_ready"
    UPLOADING = "uploading"
    PREPARED = "prepared"
    TRAINING = "training"
    COLLECTING = "collecting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def holds_instance(self) -> bool:
        return self in HOLDS_INSTANCE


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
HOLDS_INSTANCE = frozenset(
    {JobState.RENTING, JobState.WAITING_READY, JobState.UPLOADING, JobState.PREPARED, JobState.TRAINING,
     JobState.COLLECTING}
)
_END = {JobState.FAILED, JobState.CANCELLED}
S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.VALIDATING: frozenset({S.AWAITING_CONFIRMATION, S.QUEUED, *_END}),
    S.AWAITING_CONFIRMATION: frozenset({S.QUEUED, *_END}),
    S.QUEUED: frozenset({S.RENTING, S.UPLOADING, *_END}),  # uploading: a warm machine handed over (issue 18)
    S.RENTING: frozenset({S.WAITING_READY, S.QUEUED, *_END}),
    S.WAITING_READY: frozenset({S.UPLOADING, S.RENTING, *_END}),
    S.UPLOADING: frozenset({S.TRAINING, S.PREPARED, S.RENTING, *_END}),
    S.PREPARED: frozenset({S.TRAINING, *_END}),
    S.TRAINING: frozenset({S.COLLECTING, S.RENTING, *_END}),
    S.COLLECTING: frozenset({S.SUCCEEDED, *_END}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, job_id: str, src: JobState, dst: JobState) -> None:
        super().__init__(f"job {job_id}: {src.value} -> {dst.value} is not allowed")
        self.src, self.dst = src, dst


def check_transition(job_id: str, src: JobState, dst: JobState) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(job_id, src, dst)


def new_job_id() -> str:
    """Short, unguessable enough, and safe in labels, paths and shell words."""
    return secrets.token_hex(4)


class Job(BaseModel):
    """One training job. Every field is a column of the `jobs` table."""

    id: str = Field(default_factory=new_job_id, pattern=r"^[0-9a-z]{4,32}$")
    state: JobState = JobState.VALIDATING
    reason: str = ""
    failure_kind: str | None = None  # classified: cuda_oom, gated_model, stall, infra, user, ...

    # who and where
    user_id: str = ""
    user_name: str = ""
    source: str = "cli"  # "discord" | "cli"
    guild_id: int | None = None
    channel_id: int | None = None
    status_message_id: int | None = None

    # what
    name: str = ""
    trigger_word: str = ""
    recipe: dict[str, Any] = Field(default_factory=dict)
    dataset_dir: str | None = None
    dataset_sha256: str | None = None
    dataset_bytes: int = 0
    quote: dict[str, Any] = Field(default_factory=dict)
    max_price: float | None = None
    train: bool = True  # False for `lorabot launch`: ship, do not start training

    # the rented machine (known to a restarted process through these columns)
    label: str | None = None
    offer_id: int | None = None
    machine_id: int | None = None
    instance_id: int | None = None
    gpu_name: str | None = None
    dph_total: float | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_kind: str | None = None
    proxy_host: str | None = None
    proxy_port: int | None = None
    host_key: str | None = None
    remote_dir: str | None = None
    rented_at: float | None = None
    instance_gone_at: float | None = None
    excluded_machines: list[int] = Field(default_factory=list)
    attempt: int = 1
    billed_s: float = 0.0  # rental seconds of earlier attempts (a retry rents anew)
    # issue 14: bandwidth is billed per GB; this attempt's expected charge, counted from the rental
    bandwidth_usd: float = 0.0

    # progress
    log_offset: int = 0
    phase: str | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    sec_per_step: float | None = None
    eta_s: float | None = None
    cost_usd: float = 0.0
    last_output_at: float | None = None

    # results
    lora_key: str | None = None
    lora_url: str | None = None
    link_expires_at: float | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)
    measured: dict[str, Any] = Field(default_factory=dict)  # real phase durations, for the quote
    # issue 13 (C4): the LoRA is made safe before its box goes. `lora_stored`: verified in R2;
    # else `local_lora` is a verified SSH download on this host that the upload retries from
    # (also after a restart). `failure_announced`: the attempt whose failure was last posted
    lora_stored: bool = False
    local_lora: str | None = None
    local_lora_sha256: str | None = None
    failure_announced: int = 0
    # issue 15: when and where the result reached its owner (None: retried after a restart), and
    # the samples thread (its id is the status message's id), kept so a restart reuses it
    result_delivered_at: float | None = None
    result_delivered_to: str | None = None  # "channel" | "dm"
    result_owed: bool = False  # set when its status was first posted: jobs from before issue 15 are not re-sent
    samples_thread_id: int | None = None
    confirm_by: float | None = None  # the quote's buttons answer until then (within the 15-min token)

    # ownership and control across processes
    owner: str | None = None
    owner_seen_at: float | None = None
    cancel_requested: bool = False
    detached: bool = False

    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def rental_seconds(self, now: float | None = None) -> float:
        if self.rented_at is None:
            return self.billed_s
        end = self.instance_gone_at or now or time.time()
        return self.billed_s + max(0.0, end - self.rented_at)

    def cost_so_far(self, now: float | None = None) -> float:
        """Per-second billing: $/h times the rental time of every attempt, plus this attempt's
        bandwidth (earlier attempts' is already in cost_usd)."""
        if self.dph_total is None:
            return round(self.cost_usd + self.bandwidth_usd, 4)
        current = 0.0
        if self.rented_at is not None:
            end = self.instance_gone_at or now or time.time()
            current = max(0.0, end - self.rented_at)
        return round(self.cost_usd + self.dph_total * current / 3600.0 + self.bandwidth_usd, 4)

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


class JobEventRow(BaseModel):
    job_id: str
    at: float
    src: str | None
    dst: str
    reason: str
