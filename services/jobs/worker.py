"""The worker: a queue with concurrency limits, recovery on start, a reaper, cancel from anywhere.

Several processes may share one store (the Discord bot and `lorabot` commands). A job is driven by
exactly one worker at a time: the one holding its lease (owner + owner_seen_at, renewed every few
seconds). A process that stops gracefully leaves its jobs training on their boxes; whoever starts
next (or notices the lease expire) re-attaches. A cancel asked where the job is not driven is
written to the store (`cancel_requested`) and the driving worker acts on it; when no live worker
drives it, the asking process runs the cancel itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.jobs import budget
from services.jobs.budget import day_start
from services.jobs.errors import JobRefused
from services.jobs.events import Cancelled, Failed, Notifier, Queued
from services.jobs.handover import WarmPool
from services.jobs.model import Job, JobState
from services.jobs.pipeline import Deps, Pipeline, job_id_from_label
from services.jobs.store import JobStore
from services.jobs.watchdog import watch
from services.localfiles import private_dir, warn_on_exposed_key
from services.settings import Settings
from services.storage import Storage
from services.vastai import Instance, InstanceStatus, VastClient, VastError

log = logging.getLogger(__name__)
_OTHER_PROCESS_POLL_S = 0.25  # how often `wait` reads the store for a job another process drives
S = JobState


@dataclass
class CancelResult:
    job: Job
    destroyed_instance_id: int | None
    cost_usd: float


__all__ = ["CancelResult", "Worker", "day_start", "find_orphans"]


class Worker:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        notifier: Notifier,
        *,
        vast_factory: Callable[[], VastClient] | None = None,
        storage: Storage | None = None,
        owner: str | None = None,
        reaper: bool = True,
        adopt: bool = True,
    ) -> None:
        self.store = store
        self.settings = settings
        self.notifier = notifier
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._vast_factory = vast_factory or (lambda: VastClient.from_settings(settings))
        self._storage = storage
        self._reaper_enabled = reaper
        # adopt: pick up other processes' jobs when their lease runs out (the bot does; a
        # foreground `lorabot train` only drives its own job)
        self._adopt = adopt
        self.vast: VastClient | None = None
        self._pending: list[str] = []  # queued job ids, in order
        # queued jobs taken off _pending and not yet launched (a claim, a budget check, a warm handover
        # under way): neither recover() nor submit() may queue them again meanwhile
        self._taking: set[str] = set()
        self._dequeued = asyncio.Event()  # pulsed (set, then replaced) when a job leaves _pending
        self._running: dict[str, tuple[asyncio.Task[Job], Pipeline]] = {}
        self._watchdogs: dict[str, asyncio.Task[Job | None]] = {}  # job id -> its watchdog (issue 13)
        self._users: dict[str, str] = {}  # job id -> user id of running jobs
        self._wake = asyncio.Event()
        self._startups = asyncio.Semaphore(settings.max_concurrent_startups)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._warm = WarmPool(self._take_queued, self._launch_warm, self._put_back, settings, store)  # issue 18

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, recover: bool = True) -> None:
        if self._started:
            return
        await asyncio.to_thread(private_dir, Path(self.settings.work_dir))  # 0700 (review L5)
        warn_on_exposed_key(self.settings.ssh_key_path)
        self.vast = self._vast_factory()
        if self._storage is None and self.settings.r2_bucket:
            self._storage = Storage.from_settings(self.settings)
        self._started = True
        if recover:
            await self.recover()
        self._tasks.append(asyncio.create_task(self._scheduler(), name="lorabot-scheduler"))
        self._tasks.append(asyncio.create_task(self._leases(), name="lorabot-leases"))
        if self._reaper_enabled:
            self._tasks.append(asyncio.create_task(self._reaper_loop(), name="lorabot-reaper"))

    async def stop(self) -> None:
        """Graceful: running jobs keep training on their boxes; their leases are released."""
        for task in self._tasks:
            task.cancel()
        for dog in list(self._watchdogs.values()):  # first: a shutdown is not a limit stop
            dog.cancel()
        await asyncio.gather(*self._watchdogs.values(), return_exceptions=True)
        self._watchdogs.clear()
        for job_task, _ in list(self._running.values()):
            job_task.cancel()
        running = [t for t, _ in self._running.values()]
        driven = list(self._running)  # _drive() forgets its job as its task ends: remember them first
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)
        for job_id in driven:
            with contextlib.suppress(Exception):
                await self.store.release(job_id, self.owner)
        self._running.clear()
        self._tasks.clear()
        if self.vast is not None:
            await self.vast.aclose()
            self.vast = None
        self._started = False

    @property
    def storage(self) -> Storage | None:
        return self._storage

    @property
    def deps(self) -> Deps:
        if self.vast is None:
            raise RuntimeError("the worker is not started")
        return Deps(self.settings, self.store, self.vast, self._storage, self.notifier, self._startups,
                    warm=self._warm if self.settings.warm_reuse else None)

    # --- warm handover (issue 18) ---------------------------------------------------------------
    async def _take_queued(self, fits: Callable[[Job], bool]) -> Job | None:
        """The first queued job that fits a warm machine, taken off the queue and leased to us."""
        for job_id in list(self._pending):
            job = await self.store.get(job_id)
            if job is None or job_id not in self._pending or not fits(job):
                continue
            if await self._take(job_id):  # held in _taking until _launch_warm or _put_back
                return job
        return None

    async def _take(self, job_id: str) -> bool:
        """Take a queued job off the queue and lease it to us; False when another process drives it.

        Off the queue before the first await: the scheduler and a warm machine claim under the same
        owner, so the lease alone cannot keep them from both taking (and launching) one job. Until it
        is launched or put back, the job is in _taking, which recover() and submit() leave alone."""
        self._dequeue(job_id)
        self._taking.add(job_id)
        try:
            claimed = await self.store.claim(job_id, self.owner, self.settings.lease_s)
        except BaseException:
            self._put_back(job_id)  # a store error (or a shutdown): the job stays queued
            raise
        if not claimed:
            self._taking.discard(job_id)
        return claimed

    def _launch_warm(self, job: Job) -> None:
        self._taking.discard(job.id)
        if job.id not in self._running:
            self._launch(job)
        self._wake.set()

    def _put_back(self, job_id: str) -> None:
        """A taken job that was not started after all (its handover failed early, a store error):
        first in the queue again."""
        if job_id in self._taking:
            self._taking.discard(job_id)
            if job_id not in self._pending and job_id not in self._running:
                self._pending.insert(0, job_id)
            self._wake.set()

    # --- queue --------------------------------------------------------------------------------
    async def check_budget(self, job: Job) -> None:
        """Refuse a job that would go past the user's daily or the global budget, counting what is
        spent and what every confirmed, unfinished job may still spend (the job itself included)."""
        s = self.settings
        since = day_start()
        why = budget.refusal(job, await self.store.budget_jobs(since), since=since,
                             user_budget=s.user_daily_budget, global_budget=s.global_daily_budget)
        if why is not None:
            raise JobRefused(why)

    async def submit(self, job_id: str) -> int:
        """Queue a confirmed job; returns its queue position (1 = next). The budget check and the
        move to QUEUED are one transaction in the store (issue 13)."""
        job = await self.store.require(job_id)
        if job.state in (S.VALIDATING, S.AWAITING_CONFIRMATION):
            s = self.settings
            job = await self.store.queue_within_budget(
                job.id, since=day_start(), user_budget=s.user_daily_budget, global_budget=s.global_daily_budget,
                max_queued_per_user=s.max_queued_per_user)
        elif job.state != S.QUEUED:
            raise JobRefused(f"job {job.id} is {job.state.value}, not waiting to start")
        if job.id not in self._pending and job.id not in self._running and job.id not in self._taking:
            self._pending.append(job.id)
        position = self.queue_position(job.id) or 1
        try:
            await self.notifier.notify(job, Queued(position))
        except Exception:
            log.exception("notifier failed")
        self._wake.set()
        return position

    def _dequeue(self, job_id: str) -> None:
        self._pending.remove(job_id)
        self._dequeued.set()
        self._dequeued = asyncio.Event()

    def queue_position(self, job_id: str) -> int | None:
        try:
            return self._pending.index(job_id) + 1
        except ValueError:
            return None

    def running(self) -> list[str]:
        return list(self._running)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:  # noqa: ASYNC109
        """Until the job leaves this worker (terminal, or prepared for `launch`)."""

        async def go() -> Job:
            while True:
                entry = self._running.get(job_id)
                if entry is not None:
                    with contextlib.suppress(Exception):
                        await self._outcome(job_id, entry[0])
                dequeued = self._dequeued  # taken before the read below, so no pulse is missed
                job = await self.store.require(job_id)
                if job.state.terminal or job.state == S.PREPARED:
                    return job
                if job_id in self._pending:
                    await dequeued.wait()  # queued here: it starts or is dropped, no need to poll
                elif job_id not in self._running:
                    await asyncio.sleep(_OTHER_PROCESS_POLL_S)  # driven by another process

        return await asyncio.wait_for(go(), timeout)

    async def _scheduler(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._start_eligible()
            except Exception:  # a store error (a full disk, a locked file): the queue waits, never dies
                log.exception("scheduler: starting queued jobs failed; trying again shortly")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _start_eligible(self) -> None:
        limit = self.settings.max_concurrent_jobs
        for job_id in list(self._pending):
            if len(self._running) >= limit:
                return
            job = await self.store.get(job_id)
            if job_id not in self._pending:
                continue  # taken for a warm machine meanwhile
            if job is None or job.state != S.QUEUED:
                self._dequeue(job_id)
                continue
            per_user = sum(1 for jid in self._running if self._users.get(jid) == job.user_id)
            if per_user >= self.settings.max_jobs_per_user:
                continue  # this user waits; others behind may pass
            if not await self._take(job_id):
                continue
            try:
                if not await self._over_budget(job):  # else failed, with the reason
                    self._launch(job)
            except BaseException:
                self._put_back(job_id)
                raise
            finally:
                self._taking.discard(job_id)
        await self._announce_positions()

    async def _over_budget(self, job: Job) -> bool:
        """The check again before renting: money spent since the job was queued (or a job queued by
        another process) may leave no room now. Such a job fails with the reason; nothing is rented."""
        try:
            await self.check_budget(job)
            return False
        except JobRefused as exc:
            reason = f"not started: {exc}"
        try:
            job = await self.store.transition(job.id, S.FAILED, reason, failure_kind="budget")
        finally:
            with contextlib.suppress(Exception):
                await self.store.release(job.id, self.owner)
        with contextlib.suppress(Exception):
            await self.notifier.notify(job, Failed(reason, "budget"))
        return True

    def _launch(self, job: Job, cancel: asyncio.Event | None = None) -> asyncio.Task[Job]:
        pipeline = Pipeline(self.deps, job.id, cancel=cancel)
        task = asyncio.create_task(self._drive(pipeline), name=f"lorabot-job-{job.id}")
        self._running[job.id] = (task, pipeline)
        self._users[job.id] = job.user_id
        dog = asyncio.create_task(watch(pipeline, task, owner=self.owner), name=f"lorabot-watchdog-{job.id}")
        self._watchdogs[job.id] = dog

        def forget(done: asyncio.Task[Job | None], job_id: str = job.id) -> None:
            if self._watchdogs.get(job_id) is done:
                del self._watchdogs[job_id]

        dog.add_done_callback(forget)
        return task

    async def _outcome(self, job_id: str, task: asyncio.Task[Job]) -> Job:
        """The job a pipeline task ended with; also when its watchdog cancelled it at a limit."""
        await asyncio.wait({task})  # neither raises the task's error nor cancels it if we are cancelled
        if not task.cancelled():
            return task.result()
        dog = self._watchdogs.get(job_id)
        if dog is not None:
            await asyncio.wait({dog})
        return await self.store.require(job_id)

    async def _drive(self, pipeline: Pipeline) -> Job:
        try:
            return await pipeline.run()
        finally:
            self._running.pop(pipeline.job_id, None)
            self._users.pop(pipeline.job_id, None)
            job = await self.store.get(pipeline.job_id)
            if job is not None and (job.state.terminal or job.state == S.PREPARED):
                with contextlib.suppress(Exception):
                    await self.store.release(pipeline.job_id, self.owner)
            self._wake.set()

    async def _announce_positions(self) -> None:
        for n, job_id in enumerate(self._pending, start=1):
            job = await self.store.get(job_id)
            if job is not None:
                with contextlib.suppress(Exception):
                    await self.notifier.notify(job, Queued(n))

    async def _leases(self) -> None:
        """Renew our leases; pick up jobs whose owner died (their lease ran out)."""
        while True:
            await asyncio.sleep(max(1.0, self.settings.lease_s / 4))
            for job_id in list(self._running):
                with contextlib.suppress(Exception):
                    await self.store.claim(job_id, self.owner, self.settings.lease_s)
            if self._adopt:
                with contextlib.suppress(Exception):
                    await self.recover()

    # --- recovery -----------------------------------------------------------------------------
    async def recover(self) -> list[str]:
        """Re-attach jobs that were mid-flight and re-queue queued ones; expire stale drafts."""
        resumed = []
        now = time.time()
        for job in sorted(await self.store.live(), key=lambda j: j.created_at):
            if job.id in self._running or job.id in self._pending or job.id in self._taking:
                continue
            if job.state in (S.VALIDATING, S.AWAITING_CONFIRMATION):
                if now - job.updated_at > self.settings.confirm_timeout_s:
                    with contextlib.suppress(Exception):
                        await self.store.transition(job.id, S.CANCELLED, "not confirmed in time; nothing was rented")
                continue
            if job.state == S.PREPARED and not job.cancel_requested:
                # an operator's box (`lorabot launch`): theirs until cancelled, but never forgotten
                if now - job.updated_at > self.settings.max_runtime_s and await self.store.claim(
                    job.id, self.owner, self.settings.lease_s
                ):
                    self._launch(job)
                    self._running[job.id][1].request_cancel(
                        f"expiry: a launched box unused for {self.settings.max_runtime_s / 3600:.1f} h")
                    resumed.append(job.id)
                continue
            if job.owner and job.owner != self.owner and (job.owner_seen_at or 0) > now - self.settings.lease_s:
                continue  # another live process drives it
            if job.state == S.QUEUED:
                self._pending.append(job.id)
                resumed.append(job.id)
                continue
            if await self.store.claim(job.id, self.owner, self.settings.lease_s):
                log.info("re-attaching job %s in state %s", job.id, job.state.value)
                self._launch(job)
                resumed.append(job.id)
        if resumed:
            self._wake.set()
        return resumed

    # --- cancel -------------------------------------------------------------------------------
    async def cancel(self, job_id: str, *, by: str = "") -> CancelResult:
        job = await self.store.require(job_id)
        instance = job.instance_id if job.instance_gone_at is None else None
        if job.state.terminal:
            return CancelResult(job, None, job.cost_so_far())
        # written before anything else: a restart (or crash) from here on still finishes the cancel
        await self.store.request_cancel(job_id)
        if job_id in self._pending:
            self._dequeue(job_id)
        if job.state in (S.VALIDATING, S.AWAITING_CONFIRMATION, S.QUEUED) and job_id not in self._running:
            job = await self.store.transition(job_id, S.CANCELLED, f"cancelled by {by}" if by else "cancelled")
            with contextlib.suppress(Exception):
                await self.notifier.notify(job, Cancelled(job.cost_so_far()))
            return CancelResult(job, None, job.cost_so_far())
        entry = self._running.get(job_id)
        if entry is not None:
            task, pipeline = entry
            pipeline.request_cancel(by)
            job = await self._outcome(job_id, task)
            return CancelResult(job, instance, job.cost_so_far())
        await self.store.request_cancel(job_id)
        now = time.time()
        live_owner = job.owner and job.owner != self.owner and (job.owner_seen_at or 0) > now - self.settings.lease_s
        if live_owner:
            # the driving process acts on cancel_requested within a monitor interval
            deadline = time.monotonic() + max(60.0, self.settings.monitor_interval_s * 6)
            while time.monotonic() < deadline:
                job = await self.store.require(job_id)
                if job.state.terminal:
                    return CancelResult(job, instance, job.cost_so_far())
                await asyncio.sleep(0.2)
            raise JobRefused(f"job {job_id} is driven by {job.owner}, which has not acted on the cancel yet")
        if not await self.store.claim(job_id, self.owner, self.settings.lease_s):
            raise JobRefused(f"job {job_id} was just taken by another process; try again")
        cancel = asyncio.Event()
        task = self._launch(job, cancel)
        self._running[job_id][1].request_cancel(by)
        job = await self._outcome(job_id, task)
        return CancelResult(job, instance, job.cost_so_far())

    async def run_here(self, job_id: str) -> Job:
        """Drive one job in this process now (the CLI's foreground `train`/`launch`)."""
        if not await self.store.claim(job_id, self.owner, self.settings.lease_s):
            raise JobRefused(f"job {job_id} is driven by another process")
        job = await self.store.require(job_id)
        if job.id in self._pending:
            self._dequeue(job.id)
        task = self._running[job_id][0] if job_id in self._running else self._launch(job)
        return await self._outcome(job_id, task)

    # --- reaper -------------------------------------------------------------------------------
    async def reconcile(self, destroy: bool) -> list[Instance]:
        """This installation's instances that no live job owns; destroyed when `destroy`, together
        with every terminal job's instance never confirmed gone (the store sweep)."""
        vast = self.vast or self._vast_factory()
        try:
            orphans = await find_orphans(self.store, self.settings, vast)
            if destroy:
                for inst in orphans:
                    log.warning("reaper: destroying orphan instance %s (%s)", inst.id, inst.label)
                    await vast.destroy_instance(inst.id)
                await sweep_store(self.store, vast)
            return orphans
        finally:
            if vast is not self.vast:
                await vast.aclose()

    async def _reaper_loop(self) -> None:
        while True:
            try:
                await self.reconcile(destroy=True)
            except VastError as exc:
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper failed")
            await asyncio.sleep(self.settings.reaper_interval_s)


async def find_orphans(
    store: JobStore, settings: Settings, vast: VastClient, *, now: float | None = None
) -> list[Instance]:
    """Instances of this installation that no live job owns (review H5).

    Ours: the label is a job's label in this store, or carries this store's installation id. Another
    deployment's boxes and hand-rented `lorabot-*` boxes are neither, and are never touched. An
    instance labelled for this installation whose job this store does not know (a rent whose job row
    was lost) is an orphan only when seen again `reaper_unknown_grace_s` after its first sighting.
    """
    now = now or time.time()
    orphans = []
    instances = await vast.list_instances()
    # a machine being handed over carries the next job's label before that job records it (issue 18).
    # Read after the listing: the intent is written before the relabel, so a label the listing shows
    # moved is always found here (read before it, a handover in between would look like an orphan).
    # Spared only while the holder still holds that machine: once it let go, the next job owns it
    # by its label, or nobody does and it is reaped.
    moving = {(j.instance_id, h["label"]) for j in await store.live()
              if j.state.holds_instance and j.instance_gone_at is None
              and (h := j.measured.get("handover") or {}).get("label") and h.get("step") != "done"}
    listed: list[int] = []
    for inst in instances:
        if (inst.id, inst.label) in moving:
            continue
        if inst.status == InstanceStatus.GONE:
            continue  # a destroyed contract the list still returns (cur_state "unloaded"): not billing
        listed.append(inst.id)
        try:
            job = await store.by_label(inst.label) if inst.label else None
            job_id = job_id_from_label(settings, inst.label, store.install_id)
            if job is None and job_id is not None:
                job = await store.get(job_id)
        except Exception as exc:  # one bad row never stops the reaper (review L3)
            log.error("reaper: skipping instance %s (%s): its job does not load: %s", inst.id, inst.label, exc)
            continue
        if job is None:
            if job_id is None:
                continue  # not this installation's: never touched
            first, new = await store.sighting(inst.id, inst.label or "", now)
            if not new and now - first >= settings.reaper_unknown_grace_s:
                orphans.append(inst)
            continue
        owned = (
            not job.state.terminal
            and job.state.holds_instance
            and job.label == inst.label
            and job.instance_id in (None, inst.id)
        )
        if not owned:
            orphans.append(inst)
    await store.forget_sightings(listed)
    return orphans


async def sweep_store(store: JobStore, vast: VastClient) -> list[int]:
    """Destroy, by id, the instance of every terminal job whose destroy was never confirmed."""
    destroyed = []
    for job in await store.unconfirmed_gone():
        assert job.instance_id is not None
        try:
            await vast.destroy_instance(job.instance_id)
        except VastError as exc:
            log.error("reaper: instance %s of job %s still not destroyed: %s", job.instance_id, job.id, exc)
            continue
        log.warning("reaper: destroyed instance %s of finished job %s", job.instance_id, job.id)
        await store.update(job.id, instance_gone_at=time.time())
        destroyed.append(job.instance_id)
    return destroyed
