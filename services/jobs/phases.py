"""Where a job's time and money go: measured seconds per phase, next to the quote's estimate (issue 18).

The pipeline records into `job.measured["phases"]` (seconds per phase name below) and a few marks
(`measured["marks"]`, wall-clock times, so a restarted process can still close a phase that began
before it). Everything here is pure: the store, `job.json`, the final message and `lorabot status`
all format the same dict.

    create_to_running   create request -> the API says running (image pull and boot)
    running_to_ssh      running -> SSH usable (sshd up, probe passes)
    dataset_upload      dataset streamed and verified, config installed
    model_download      the base model into the HF cache (prefetch, or the trainer's own download)
    model_load          load + quantize
    latent_caching      VAE encode of the dataset
    training            the steps themselves
    sampling            sample images (baseline, every sample_every, final)
    saves               checkpoints and the final LoRA
    collection          LoRA, log, samples -> R2
    teardown            destroy request -> confirmed gone
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any

PHASES: tuple[str, ...] = (
    "create_to_running",
    "running_to_ssh",
    "dataset_upload",
    "model_download",
    "model_load",
    "latent_caching",
    "training",
    "sampling",
    "saves",
    "collection",
    "teardown",
)

SHORT: dict[str, str] = {
    "create_to_running": "boot",
    "running_to_ssh": "ssh",
    "dataset_upload": "upload",
    "model_download": "model",
    "model_load": "load",
    "latent_caching": "latents",
    "training": "train",
    "sampling": "samples",
    "saves": "saves",
    "collection": "collect",
    "teardown": "teardown",
}

# the quote's phase (services/quote.PHASES) that estimates each measured one
QUOTE_PHASE: dict[str, str] = {
    "create_to_running": "image_pull",
    "dataset_upload": "dataset_upload",
    "model_download": "model_download",
    "model_load": "model_load",
    "latent_caching": "latent_caching",
    "training": "training",
    "sampling": "sampling",
    "saves": "saving",
    "collection": "artifact_upload",
}

# services.progress.Phase values -> measured phases (loading and quantizing are one phase)
PROGRESS_TO_PHASE: dict[str, str] = {
    "downloading": "model_download",
    "loading": "model_load",
    "quantizing": "model_load",
    "caching_latents": "latent_caching",
    "training": "training",
    "sampling": "sampling",
    "saving": "saves",
}


def add(measured: Mapping[str, Any], phase: str, seconds: float) -> dict[str, Any]:
    """A copy of `measured` with `seconds` added to `phase` (phases repeat: sampling, saves, retries)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    phases = dict(measured.get("phases") or {})
    phases[phase] = round(float(phases.get(phase, 0.0)) + max(0.0, seconds), 3)
    return {**measured, "phases": phases}


def mark(measured: Mapping[str, Any], name: str, at: float | None = None, *, keep: bool = False) -> dict[str, Any]:
    """Remember a wall-clock instant (`keep`: only when not set yet, e.g. across a restart)."""
    marks = dict(measured.get("marks") or {})
    if keep and name in marks:
        return dict(measured)
    marks[name] = round(at if at is not None else time.time(), 3)
    return {**measured, "marks": marks}


def since(measured: Mapping[str, Any], name: str, now: float | None = None) -> float | None:
    at = (measured.get("marks") or {}).get(name)
    return None if at is None else max(0.0, (now or time.time()) - float(at))


class PhaseTimer:
    """Turns the trainer's phase changes (as the monitor sees them) into seconds per phase."""

    def __init__(self, now: float | None = None) -> None:
        self.current: str | None = None
        self.since = now if now is not None else time.monotonic()

    def switch(self, progress_phase: str | None, now: float | None = None) -> tuple[str, float] | None:
        """Enter `progress_phase`; returns the (phase, seconds) that just ended, if it counts."""
        now = now if now is not None else time.monotonic()
        new = PROGRESS_TO_PHASE.get(progress_phase or "")
        if new == self.current:
            return None
        ended = (self.current, now - self.since) if self.current else None
        self.current, self.since = new, now
        return ended


def billed(job: Any, now: float | None = None) -> dict[str, float]:
    """Billed seconds of the job (all attempts; a handed-over machine: this job's own span) and the
    share that was not training."""
    total = float(job.rental_seconds(now))
    training = float((job.measured.get("phases") or {}).get("training", 0.0))
    return {"billed_s": round(total, 1), "billed_outside_training_s": round(max(0.0, total - training), 1)}


def estimate(quote: Mapping[str, Any], phase: str) -> tuple[float, float] | None:
    """The quote's (low, high) seconds for a measured phase, when it has one."""
    name = QUOTE_PHASE.get(phase)
    for p in quote.get("phases") or []:
        if p.get("name") == name:
            return float(p["low_s"]), float(p["high_s"])
    return None


def fmt_s(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        m, s = divmod(round(seconds), 60)
        return f"{m}m{s:02d}s" if m < 10 and s else f"{m}m"
    return f"{seconds / 3600:.1f}h"


def _est(quote: Mapping[str, Any], phase: str) -> str:
    e = estimate(quote, phase)
    return "" if e is None else f"{fmt_s(e[0])}–{fmt_s(e[1])}"


def summary(job: Any, now: float | None = None) -> dict[str, Any]:
    """The breakdown as stored in `job.json`: per phase measured seconds and the quote's range."""
    phases = job.measured.get("phases") or {}
    rows = []
    for name in PHASES:
        if name not in phases and estimate(job.quote, name) is None:
            continue
        e = estimate(job.quote, name)
        rows.append({"phase": name, "seconds": phases.get(name),
                     "estimate_low_s": e[0] if e else None, "estimate_high_s": e[1] if e else None})
    return {
        "phases": rows,
        **billed(job, now),
        "bytes_downloaded": bytes_downloaded(job.measured),
        "quote_total_low_s": job.quote.get("total_low_s"),
        "quote_total_high_s": job.quote.get("total_high_s"),
        "warm": bool(job.measured.get("warm")),
    }


def compact_line(job: Any, now: float | None = None) -> str:
    """One line, e.g. 'boot 2m10s · ssh 9.1s · upload 4.0s · model 9m (est 6m–12m) · … · billed 58m, 18m outside
    training'. Estimates only where the measurement fell outside the quote's range (the line stays short)."""
    phases = job.measured.get("phases") or {}
    parts = []
    for name in PHASES:
        if name not in phases:
            continue
        seconds = float(phases[name])
        part = f"{SHORT[name]} {fmt_s(seconds)}"
        e = estimate(job.quote, name)
        if e is not None and not (e[0] <= seconds <= e[1]):
            part += f" (est {_est(job.quote, name)})"
        parts.append(part)
    b = billed(job, now)
    tail = f"billed {fmt_s(b['billed_s'])}, {fmt_s(b['billed_outside_training_s'])} outside training"
    if job.measured.get("warm"):
        tail += " (warm machine)"
    return " · ".join([*parts, tail]) if parts else tail


def table(job: Any, now: float | None = None) -> str:
    """The full breakdown, fixed-width: phase, measured, the quote's estimate."""
    doc = summary(job, now)
    lines = [f"{'phase':<18} {'measured':>9}  estimate"]
    for row in doc["phases"]:
        measured = "-" if row["seconds"] is None else fmt_s(row["seconds"])
        est = "" if row["estimate_low_s"] is None else f"{fmt_s(row['estimate_low_s'])}–{fmt_s(row['estimate_high_s'])}"
        lines.append(f"{row['phase']:<18} {measured:>9}  {est}")
    lines.append(f"{'billed':<18} {fmt_s(doc['billed_s']):>9}")
    lines.append(f"{'outside training':<18} {fmt_s(doc['billed_outside_training_s']):>9}")
    if doc["bytes_downloaded"]:
        lines.append(f"{'downloaded':<18} {doc['bytes_downloaded'] / 1e9:>8.2f}G")
    return "\n".join(lines)


# --- feedback into the quote ------------------------------------------------------------------
def host_class(inet_down_mbps: float | None) -> str:
    """Hosts grouped by advertised bandwidth (powers of two of 100 Mbit/s): 'le100', 'le200', ... 'gt6400'."""
    if not inet_down_mbps or inet_down_mbps <= 0:
        return "unknown"
    bound = 100
    while bound < 6400:
        if inet_down_mbps <= bound:
            return f"le{bound}"
        bound *= 2
    return "gt6400"


def bytes_downloaded(measured: Mapping[str, Any]) -> int:
    """Model bytes the box really downloaded: by the prefetch, and by the trainer itself."""
    return int(measured.get("prefetch_bytes") or 0) + int(measured.get("trainer_download_bytes") or 0)


def download_mbps(measured: Mapping[str, Any]) -> float | None:
    """The model download's real speed, when the job downloaded (a warm cache measures nothing)."""
    seconds = float((measured.get("phases") or {}).get("model_download") or 0.0)
    nbytes = float(bytes_downloaded(measured))
    if seconds <= 0 or nbytes <= 0:
        return None
    return nbytes * 8 / 1e6 / seconds


def calibration(jobs: Iterable[Any]) -> dict[str, Any]:
    """From finished jobs: the median achieved/advertised download ratio per host class, and the
    median s/step per GPU (the effective one, as `quote(sec_per_step=...)` takes it per recipe scale:
    here normalised to 1024 px batch 1 when the job's quote knows its train_scale)."""
    ratios: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    for job in jobs:
        m = job.measured or {}
        inet = float(m.get("inet_down") or 0.0)
        mbps = download_mbps(m)
        if mbps and inet > 0:
            ratios.setdefault(host_class(inet), []).append(mbps / inet)
        sps = m.get("sec_per_step") or job.sec_per_step
        scale = float(job.quote.get("train_scale") or 0.0)
        if sps and scale > 0 and job.gpu_name:
            steps.setdefault(job.gpu_name, []).append(float(sps) / scale)
    return {
        "download_ratio": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "sec_per_step_gpu": {k: round(statistics.median(v), 3) for k, v in steps.items()},
    }
