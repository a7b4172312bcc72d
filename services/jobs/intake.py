"""From a request to a quoted job awaiting confirmation: recipe check, dataset QA, best offer, quote.

Shared by every front-end (`/train`, `lorabot train`, `lorabot launch`): they only render the
Draft. Nothing is rented here; a job only reaches the worker once it is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.dataset import DatasetError, DatasetReport, prepare
from services.dataset.prepare import rejected_report
from services.jobcost import plan_for
from services.jobs import phases
from services.jobs.cleanup import drop_job_files
from services.jobs.model import Job, JobState
from services.jobs.store import JobStore
from services.localfiles import free_gb, private_dir
from services.quote import Quote, quote
from services.recipe import FluxRecipe, RecipeError
from services.settings import Settings
from services.vastai import Offer, OfferQuery, VastClient, VastError
from services.vram import check_fits, gpu_vram_gb

DEFAULT_PRESET = "character"
# a front-end's download of the dataset (a Discord attachment): writes the archive to the path given,
# streamed, and raises DatasetError when it cannot. Run under the intake semaphore, after the limits.
Fetch = Callable[[Path], Awaitable[None]]
UPLOAD_NAME = "upload.zip"
RATE_WINDOW_S = 3600.0
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def _intake_slots(n: int) -> asyncio.Semaphore:
    """One semaphore per event loop and size: dataset QA is CPU-bound, a few at a time is enough."""
    per_loop = _SLOTS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(n, asyncio.Semaphore(n))


@dataclass
class Draft:
    job: Job
    report: DatasetReport | None
    quote: Quote | None
    offer: Offer | None
    ok: bool
    message: str = ""


def offer_query(settings: Settings, max_price: float | None = None, exclude: list[int] | None = None) -> OfferQuery:
    """The offers a job may rent: the server's filters under min(user cap, server cap)."""
    return OfferQuery.from_settings(
        settings,
        max_dph=min(max_price or settings.max_price, settings.max_price),
        exclude_machine_ids=exclude,
        limit=max(20, settings.rent_attempts * 2),
    )


def quote_doc(q: Quote) -> dict[str, Any]:
    """The quote as stored with the job; `hours_high` and `cost_high` drive credit and budget checks."""
    doc = q.model_dump(mode="json")
    doc["hours_high"] = q.total_high_s / 3600.0
    doc["cost_high"] = q.cost_high_usd
    return doc


async def measured_speeds(store: JobStore, settings: Settings, inet_down: float) -> tuple[Settings, float | None]:
    """Issue 18: what finished jobs measured (per-GPU s/step, this host class's real download speed),
    for the quote; a LORABOT_SEC_PER_STEP_GPU entry set by the operator wins over a measurement."""
    recent = await store.find(states=[JobState.SUCCEEDED], limit=50)
    cal = phases.calibration(recent)
    if cal["sec_per_step_gpu"]:
        settings = settings.model_copy(update={"sec_per_step_gpu": {**cal["sec_per_step_gpu"],
                                                                     **settings.sec_per_step_gpu}})
    return settings, cal["download_ratio"].get(phases.host_class(inet_down))


async def _fail(store: JobStore, job: Job, reason: str, kind: str, work: Path | None = None) -> Job:
    job = await store.transition(job.id, JobState.FAILED, reason, failure_kind=kind)
    if work is not None:  # a rejected or unready upload's files (no dataset_dir recorded yet)
        await drop_job_files(work)
    return job


async def draft(
    store: JobStore,
    settings: Settings,
    *,
    source: str | Path | bytes | Fetch,
    user_id: str,
    user_name: str = "",
    origin: str = "cli",
    name: str,
    trigger: str,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_price: float | None = None,
    guild_id: int | None = None,
    channel_id: int | None = None,
    vast: VastClient | None = None,
    train: bool = True,
) -> Draft:
    # per-user caps (open drafts, intakes per hour, dry runs included) before any work is done
    job = await store.create_within_limits(
        Job(user_id=user_id, user_name=user_name, source=origin, name=name, trigger_word=trigger,
            guild_id=guild_id, channel_id=channel_id, max_price=max_price, train=train),
        max_open_drafts=settings.max_open_drafts_per_user, max_per_window=settings.train_rate,
        window_s=RATE_WINDOW_S)
    try:
        recipe = FluxRecipe.from_preset(preset or DEFAULT_PRESET, name=name, trigger_word=trigger,
                                        **(overrides or {}))
    except RecipeError as exc:
        job = await _fail(store, job, f"bad training settings: {exc}", "user")
        return Draft(job, None, None, None, False, str(exc))
    too_big = check_fits(recipe, gpu_vram_gb(settings.gpu_name), settings.gpu_name)  # before the dataset work
    if too_big:
        job = await _fail(store, job, f"bad training settings: {too_big}", "user")
        return Draft(job, None, None, None, False, too_big)

    work = Path(settings.work_dir) / job.id
    free = await asyncio.to_thread(free_gb, Path(settings.work_dir))
    if free < settings.min_free_disk_gb:  # refuse before taking anything in (review H1)
        msg = "the bot's disk is nearly full, so no new dataset can be taken in right now; try later"
        job = await _fail(store, job, f"{msg} ({free:.1f} GB free)", "disk_full")
        return Draft(job, None, None, None, False, msg)
    try:
        await asyncio.to_thread(private_dir, Path(settings.work_dir))
        async with _intake_slots(settings.max_concurrent_intakes):
            if callable(source):
                upload = work / UPLOAD_NAME
                await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
                try:
                    await source(upload)
                    prepared = await prepare(upload, work, settings, trigger)
                finally:
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread(upload.unlink, True)
            else:
                prepared = await prepare(source, work, settings, trigger)
    except DatasetError as exc:
        report = rejected_report(exc)
        job = await _fail(store, job, f"dataset rejected: {exc}", "user", work)
        return Draft(job, report, None, None, False, str(exc))
    report = prepared.report
    if not report.ready:
        job = await _fail(store, job, "the dataset is not ready (see the report)", "user", work)
        return Draft(job, report, None, None, False, "the dataset is not ready")
    manifest_path = work / "manifest.json"
    await asyncio.to_thread(manifest_path.write_text, prepared.manifest.model_dump_json(indent=2))

    offer: Offer | None = None
    if vast is not None:
        try:
            # ranked by what this job would cost on each (time, model download, bandwidth)
            plan = plan_for(recipe, settings, prepared.manifest.total_bytes)
            offers = await vast.search_offers(offer_query(settings, max_price), plan)
        except VastError as exc:
            job = await _fail(store, job, f"cannot read the GPU market: {exc}", "provider")
            return Draft(job, report, None, None, False, str(exc))
        if not offers:
            cap = min(max_price or settings.max_price, settings.max_price)
            msg = f"no {settings.gpu_name} is available under ${cap:.2f}/h right now; try later or raise max_price"
            job = await _fail(store, job, msg, "no_offers")
            return Draft(job, report, None, None, False, msg)
        offer = offers[0]
        too_big = check_fits(recipe, gpu_vram_gb(offer.gpu_name, offer.gpu_ram), offer.gpu_name)
        if too_big:
            job = await _fail(store, job, f"bad training settings: {too_big}", "user")
            return Draft(job, report, None, offer, False, too_big)
    dph = offer.dph_total if offer else settings.max_price
    inet = offer.inet_down if offer else settings.min_inet_down or 500.0
    quote_settings, ratio = await measured_speeds(store, settings, inet)
    q = quote(recipe, dph_total=dph, inet_down_mbps=inet, dataset_bytes=prepared.manifest.total_bytes,
              gpu_name=offer.gpu_name if offer else settings.gpu_name, settings=quote_settings,
              inet_down_cost_per_gb=offer.inet_down_cost if offer else 0.0,
              inet_up_cost_per_gb=offer.inet_up_cost if offer else 0.0, download_ratio=ratio)
    job = await store.update(job.id, recipe=recipe.model_dump(mode="json"), dataset_dir=str(prepared.folder),
                            dataset_sha256=prepared.manifest.dataset_sha256,
                            dataset_bytes=prepared.manifest.total_bytes, quote=quote_doc(q),
                            total_steps=recipe.steps)
    if q.cost_high_usd > settings.max_job_cost:
        # it would be stopped at the cap with nothing to show for the money (issue 13, M8)
        msg = (f"this job may cost up to ${q.cost_high_usd:.2f}, above the ${settings.max_job_cost:.2f} limit "
               "per job; use fewer steps or a lower max_price")
        job = await _fail(store, job, msg, "user")
        return Draft(job, report, q, offer, False, msg)
    job = await store.transition(job.id, JobState.AWAITING_CONFIRMATION, q.summary())
    return Draft(job, report, q, offer, True)


async def decline(store: JobStore, job_id: str, reason: str = "declined") -> Job:
    job = await store.require(job_id)
    if job.state.terminal:
        return job
    return await store.transition(job_id, JobState.CANCELLED, f"{reason}; nothing was rented")
