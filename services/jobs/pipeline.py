"""One job through its states: rent -> wait ready -> ship -> train -> collect -> destroy -> report.

The pipeline is a loop over the persisted state, so a restarted process resumes a job from wherever
it was: a job in `training` re-attaches to its box through the pinned SSH endpoint and reads the
supervisor's log on from the stored offset. Every transition is written before the side effect it
guards (the label before the rental, `training` before the launch), and every way out of the loop
(success, failure, cancel) destroys the instance and settles the cost. Only a shutdown of the
process itself (asyncio cancellation) leaves the box running, on purpose: the next start re-attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import posixpath
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services import progress as prog
from services.eta import EtaModel
from services.jobcost import bandwidth_usd, plan_for_job
from services.jobs import budget, handover, phases
from services.jobs.errors import InfraFailure, JobCancelled, JobFailure
from services.jobs.events import (
    Cancelled,
    CheckpointSaved,
    CostUpdate,
    Failed,
    Finished,
    JobEvent,
    LogSnippet,
    Notifier,
    OperatorAlert,
    Progress,
    Readiness,
    SampleImage,
    StateChanged,
)
from services.jobs.intake import offer_query
from services.jobs.model import IllegalTransition, Job, JobState, check_transition
from services.jobs.store import JobStore
from services.recipe import FluxRecipe, expected_outputs, render_config
from services.remote import prefetcher
from services.remote.driver import RemoteJob, RemoteStatus
from services.settings import Settings, redact
from services.ssh import (
    Box,
    CommandTimeout,
    Endpoint,
    HostKeyMismatch,
    ReadinessDeadlines,
    ReadinessError,
    RemoteCommandError,
    SSHError,
    VerificationError,
    wait_ready,
)
from services.storage import Storage, StorageError, job_keys
from services.vastai import Instance, InstanceStatus, NoOffers, VastClient, VastError, rent
from services.vastai.errors import InsufficientCredit, SearchQuotaExceeded, VastAuthError
from services.vastai.guard import schedule_rechecks
from services.vastai.search import JobPlan

log = logging.getLogger(__name__)

UPLOADER = Path(__file__).resolve().parent.parent / "remote" / "upload_presigned.py"
# what this host takes from the untrusted box at most (review M7)
LORA_MAX_BYTES = 2 * 1024**3
LOG_MAX_BYTES = 64 * 1024**2
SAMPLE_MAX_BYTES = 20 * 1024**2
_SAMPLE_NAME = re.compile(r"(?P<ms>\d{1,20})__(?P<step>\d{9})_(?P<i>\d{1,6})\.(?P<ext>jpg|jpeg|png|webp)", re.I)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _local_name(remote_path: str) -> str:
    """A local file name for a box path (box output is untrusted: `..`, control characters)."""
    name = posixpath.basename(remote_path)
    return name if _SAFE_NAME.fullmatch(name) and ".." not in name else "artifact.bin"
S = JobState
_CHECKPOINT_FETCH_S = 1800.0  # a resumed job's checkpoint download from R2 onto the box


def _curl_config(url: str) -> str:
    """A curl config (`-K -`) naming `url`, quoted as curl's config syntax wants."""
    quoted = url.replace("\\", "\\\\").replace('"', '\\"')
    return f'url = "{quoted}"\n'


@dataclass
class Deps:
    """What a pipeline needs from the outside world; one set per worker."""

    settings: Settings
    store: JobStore
    vast: VastClient
    storage: Storage | None
    notifier: Notifier
    # bounds the CPU-heavy start of jobs (SSH handshakes, streaming the dataset) so that many jobs
    # starting at once do not stall the event loop for the ones already running
    startups: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))
    # hands a finished job's machine to a queued job (issue 18); None: every machine is destroyed
    warm: handover.WarmPool | None = None


def job_name(job: Job) -> str:
    """ai-toolkit's `name`: unique per job, or a re-used name silently resumes an old run."""
    return f"lora_{job.id}"


def install_prefix(settings: Settings, install_id: str) -> str:
    """What every label this installation rents under starts with (another deployment's do not)."""
    return f"{settings.label_prefix}{install_id}-"


def _sha256_size(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_size


def label_for(settings: Settings, job: Job, attempt: int, install_id: str) -> str:
    return f"{install_prefix(settings, install_id)}{job.id}" + ("" if attempt <= 1 else f"-{attempt}")


def job_id_from_label(settings: Settings, label: str | None, install_id: str) -> str | None:
    """The job id in a label of this installation; None for anyone else's label."""
    prefix = install_prefix(settings, install_id)
    if not label or not label.startswith(prefix):
        return None
    return label[len(prefix):].split("-", 1)[0] or None


class Pipeline:
    def __init__(self, deps: Deps, job_id: str, *, cancel: asyncio.Event | None = None) -> None:
        self.d = deps
        self.s = deps.settings
        self.job_id = job_id
        self.cancel_event = cancel or asyncio.Event()
        self.cancelled_by = ""
        self._box: Box | None = None
        self._remote: RemoteJob | None = None
        self._parser: prog.ProgressParser | None = None
        self._loss_curve: list[tuple[int, float]] = []
        self._last_failure: prog.Failure | None = None
        self._eta: EtaModel | None = None
        self._saw_download = False  # a download bar: the image prints them, silence is a stall
        self._nan_reported = False
        self._seen_samples: set[str] = set()
        self._last_download_note = 0.0
        self._finishing = False  # carrying out a cancel: remote calls are no longer interrupted by it
        self._work = Path(self.s.work_dir) / job_id
        self._unknown_since: dict[int, float] = {}  # instance id -> first `unknown` seen in a row
        self._downloads: dict[str, int] = {}
        self._phase_timer = phases.PhaseTimer()  # the trainer's phases as the monitor sees them (issue 18)

    # --- plumbing -----------------------------------------------------------------------------
    async def _emit(self, job: Job, event: JobEvent) -> None:
        try:
            await self.d.notifier.notify(job, event)
        except Exception:  # a chat outage never stops a paid job
            log.exception("notifier failed for job %s", job.id)

    async def _to(self, job: Job, dst: JobState, reason: str, **fields: Any) -> Job:
        job = await self.d.store.transition(job.id, dst, reason, **fields)
        await self._emit(job, StateChanged(dst, reason))
        return job

    def request_cancel(self, by: str = "") -> None:
        self.cancelled_by = by
        self.cancel_event.set()

    async def _check_cancel(self, job: Job | None = None) -> None:
        if not self.cancel_event.is_set():
            fresh = job or await self.d.store.require(self.job_id)
            if fresh.cancel_requested:  # asked from another process (`lorabot cancel`)
                self.cancel_event.set()
        if self.cancel_event.is_set():
            raise JobCancelled(self.cancelled_by)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on cancel."""
        try:
            await asyncio.wait_for(self.cancel_event.wait(), timeout=seconds)
        except TimeoutError:
            return

    def _redact(self, text: str) -> str:
        return redact(text, self.s.secret_values())

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> Job:
        job = await self.d.store.require(self.job_id)
        try:
            if not job.state.terminal and (job.measured.get("handover") or {}).get("step") not in (None, "done"):
                return await self._resume_handover(job)
            while not job.state.terminal:
                await self._check_cancel(job)
                if job.state in (S.QUEUED, S.RENTING):
                    job = await self._rent(job)
                elif job.state == S.WAITING_READY:
                    job = await self._wait_ready(job)
                elif job.state == S.UPLOADING:
                    job = await self._ship(job)
                elif job.state == S.TRAINING:
                    job = await self._train(job)
                elif job.state == S.COLLECTING:
                    job = await self._collect(job)
                elif job.state == S.PREPARED:
                    return job  # `lorabot launch`: an operator drives the box; cancel or the reaper end it
                else:
                    raise JobFailure("internal", f"the pipeline cannot run a job in state {job.state}")
            return job
        except JobCancelled as exc:
            return await self._finish_cancelled(exc.by)
        except JobFailure as exc:
            return await self._failed(exc)
        except asyncio.CancelledError:
            raise  # process shutdown: the box keeps training, the next start re-attaches
        except Exception as exc:
            log.exception("job %s crashed", self.job_id)
            return await self._failed(JobFailure("internal", f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            await self._close_box()

    # --- rent ---------------------------------------------------------------------------------
    def _public_key(self) -> str:
        pub = Path(str(self.s.ssh_key_path) + ".pub")
        try:
            return pub.read_text().strip()
        except OSError:
            raise JobFailure("config", f"VASTAI_SSH_KEY_PATH: cannot read the public key {pub}") from None

    async def _rent(self, job: Job) -> Job:
        if job.state == S.QUEUED:
            label = label_for(self.s, job, job.attempt, self.d.store.install_id)
            # the label is stored before the create: a crash after it still finds the machine
            job = await self._to(job, S.RENTING, f"renting (attempt {job.attempt})", label=label,
                                 started_at=job.started_at or time.time())
        assert job.label is not None
        await self._emit(job, Readiness("renting", f"looking for a {self.s.gpu_name}"))
        pub = self._public_key()
        query = offer_query(self.s, job.max_price, job.excluded_machines)
        plan = plan_for_job(job.recipe, self.s, job.dataset_bytes) or JobPlan()
        try:
            offers = await self.d.vast.search_offers(query, plan)
            if not offers:
                raise NoOffers("no offer under the price cap right now")
            hours = float(job.quote.get("hours_high") or 1.0)
            best = offers[0]
            need = (best.dph_total * hours
                    + bandwidth_usd(plan, best.inet_down_cost, best.inet_up_cost)) * self.s.credit_margin
            # the credit must also cover what every other live job may still spend (issue 13, M8)
            others = budget.committed_elsewhere(await self.d.store.live(), job.id)
            credit = (await self.d.vast.balance()).credit
            if credit < need + others:
                raise InsufficientCredit(
                    f"Vast.ai credit ${credit:.2f} is below the ${need:.2f} this job may cost"
                    + (f" plus the ${others:.2f} other running jobs may still spend" if others else ""))
            await self.d.vast.ensure_ssh_key(pub)
            created = time.time()
            result = await rent(self.d.vast, label=job.label, image=self.s.image, disk_gb=self.s.disk_gb,
                                offers=offers, attempts=self.s.rent_attempts,
                                label_watch_s=self.s.vastai_label_watch_s)
        except (NoOffers, InsufficientCredit, VastAuthError) as exc:
            if isinstance(exc, NoOffers) and exc.ambiguous:
                self._guard_label(job.label, None)  # an unanswered create may still rent: look again
            raise JobFailure("no_offers" if isinstance(exc, NoOffers) else "account", str(exc)) from None
        except SearchQuotaExceeded as exc:
            raise JobFailure("provider", str(exc)) from None
        except VastError as exc:
            raise JobFailure("provider", f"Vast.ai: {exc}") from None
        if result.ambiguous:
            self._guard_label(job.label, result.instance_id)
        # the id is stored before anything else can fail: from here on, every exit destroys it
        try:
            job = await self.d.store.update(
                job.id, instance_id=result.instance_id, offer_id=result.offer_id or job.offer_id,
                machine_id=result.machine_id, dph_total=result.dph_total or None,
                gpu_name=result.gpu_name or self.s.gpu_name, rented_at=job.rented_at or time.time(),
                instance_gone_at=None,
                bandwidth_usd=bandwidth_usd(plan, result.inet_down_cost, result.inet_up_cost),
                # the $/GB of this machine: a job it is handed to later pays its own bytes at them
                measured=dict(_rent_marks(job.measured, created, result.offer_id, offers),
                              inet_cost={"down": result.inet_down_cost, "up": result.inet_up_cost}),
            )
        except Exception as exc:  # a full disk: an instance nobody can find again must not bill
            log.error("job %s: storing instance %s failed (%s); destroying it", job.id, result.instance_id, exc)
            await self._destroy_id(result.instance_id)
            raise JobFailure("local_store", f"could not record the rented machine (destroyed it): {exc}") from None
        try:
            inst = await self.d.vast.show_instance(result.instance_id)
        except VastError:
            inst = None
        if inst is not None:
            # bill from the contract's own start (an adopted rental may be older than this process)
            job = await self.d.store.update(
                job.id, rented_at=min(inst.start_date or time.time(), job.rented_at or time.time()),
                dph_total=job.dph_total or inst.dph_total or None,
            )
        try:
            await self.d.vast.attach_ssh_key(result.instance_id, pub)
        except VastError as exc:
            # without our key the box can never be reached: fail now (the instance is destroyed and
            # the job retried elsewhere) instead of waiting out the readiness timeout
            raise InfraFailure("ssh_key", f"could not put lorabot's SSH key on instance {result.instance_id}: "
                               f"{exc}") from None
        where = f" in {result.geolocation}" if result.geolocation else ""
        job = await self._to(job, S.WAITING_READY, f"rented instance {result.instance_id} at ${job.dph_total}/h")
        await self._emit(job, Readiness("rented", f"{job.gpu_name}{where} at ${job.dph_total:.3f}/h"))
        return job

    # --- wait until the box is usable ---------------------------------------------------------
    async def _wait_ready(self, job: Job) -> Job:
        assert job.instance_id is not None
        instance_id = job.instance_id

        async def api_poll() -> list[Endpoint] | None:
            await self._check_cancel()
            try:
                inst = await self.d.vast.show_instance(instance_id)
            except VastAuthError:
                raise
            except VastError as exc:
                log.warning("job %s: instance %s status unknown for now: %s", job.id, instance_id, exc)
                return None  # an API hiccup says nothing about the box; the readiness deadline bounds it
            self._judge(inst, instance_id, " while starting")
            assert inst is not None
            if inst.status == InstanceStatus.RUNNING and "running" not in (job.measured.get("marks") or {}):
                await _mark_running()
            if inst.status == InstanceStatus.RUNNING and inst.endpoints():
                return [Endpoint(e.host, e.port, self.s.ssh_user, e.kind) for e in inst.endpoints()]
            return None

        async def _mark_running() -> None:
            nonlocal job
            job = await self.d.store.update(job.id, measured=phases.mark(job.measured, "running", keep=True))

        async def on_stage(stage: str, detail: str) -> None:
            await self._emit(job, Readiness(stage, detail))

        total = self.s.ready_timeout_s
        deadlines = ReadinessDeadlines(api=total, tcp=total / 2, auth=total / 2, probe=total / 4)
        try:
            ready = await wait_ready(
                [], self.s.ssh_key_path, probe=["sh", "-c", self.s.ready_probe], deadlines=deadlines,
                known_host_key=job.host_key, on_stage=on_stage, api_poll=api_poll,
                connect_timeout=self.s.ssh_connect_timeout_s,
            )
        except ReadinessError as exc:
            raise InfraFailure("not_ready", f"the machine never became usable: {exc}") from None
        ep = ready.endpoint
        job = await self._to(job, S.UPLOADING, f"ready at {ep}", ssh_host=ep.host, ssh_port=ep.port,
                             ssh_kind=ep.kind, host_key=ready.host_key, measured=_ready_phases(job.measured))
        await self._emit(job, Readiness("ready", str(ep)))
        return job

    # --- SSH ----------------------------------------------------------------------------------
    async def _connect(self, job: Job) -> Box:
        if self._box is not None and self._box.connected:
            return self._box
        if not (job.ssh_host and job.ssh_port and job.host_key):
            raise InfraFailure("ssh_lost", "no pinned SSH endpoint for this job")
        kind: Literal["direct", "proxy"] = "proxy" if job.ssh_kind == "proxy" else "direct"
        endpoint = Endpoint(job.ssh_host, job.ssh_port, self.s.ssh_user, kind)
        deadline = time.monotonic() + self.s.ssh_lost_timeout_s
        delay = 0.5
        while True:
            try:
                self._box = await Box.connect(endpoint, self.s.ssh_key_path, job.host_key,
                                              connect_timeout=self.s.ssh_connect_timeout_s,
                                              python=self.s.remote_python,
                                              command_timeout=self.s.box_command_timeout_s,
                                              floor_bytes_s=self.s.transfer_floor_mb_s * 1e6)
                self._remote = None
                return self._box
            except HostKeyMismatch as exc:
                raise JobFailure("host_key", f"the machine's SSH host key changed mid-job: {exc}") from None
            except SSHError as exc:
                await self._ensure_instance_alive(job)
                if time.monotonic() > deadline:
                    raise InfraFailure("ssh_lost", f"lost SSH to the machine for good: {exc}") from None
                await self._check_cancel()
                await self._sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _remote_job(self, job: Job) -> RemoteJob:
        box = await self._connect(job)
        if self._remote is None or self._remote.box is not box:
            self._remote = RemoteJob(box, self._remote_dir(job), self.s)
        return self._remote

    async def _close_box(self) -> None:
        if self._box is not None:
            try:
                await self._box.close()
            except Exception:  # closing a dead connection is not an error worth reporting
                log.debug("closing the SSH connection failed", exc_info=True)
            self._box, self._remote = None, None

    def _guard_label(self, label: str, keep: int | None) -> None:
        """After an unanswered create: look at the label again later and destroy a late second rental."""
        if self.s.vastai_label_rechecks_s:
            schedule_rechecks(self.d.vast, label, lambda: keep, self.s.vastai_label_rechecks_s)

    def _judge(self, inst: Instance | None, instance_id: int, when: str = "", *, ssh_ok: bool = False) -> None:
        """Raise when the instance will never be usable: gone, exited, offline, stopped, an error in
        status_msg, or `unknown` for longer than the grace (Vast: "it will never reach running")."""
        if inst is None or inst.status == InstanceStatus.GONE:
            raise InfraFailure("instance_gone", f"instance {instance_id} disappeared{when}")
        if inst.status == InstanceStatus.UNKNOWN and not ssh_ok:
            now = time.monotonic()
            since = self._unknown_since.setdefault(instance_id, now)
            if now - since >= self.s.vastai_unknown_grace_s:
                raise InfraFailure("instance_failed", f"instance {instance_id} has been in state 'unknown' for "
                                   f"{now - since:.0f}s{when}: it will never run")
            return
        self._unknown_since.pop(instance_id, None)
        if inst.status.failed:
            what = inst.raw_status or inst.status.value
            msg = f": {inst.status_msg}" if inst.status_msg else ""
            raise InfraFailure("instance_failed", f"instance {instance_id} is {what}{when}{msg}")

    async def _ensure_instance_alive(self, job: Job, *, ssh_ok: bool = False) -> None:
        if job.instance_id is None:
            return
        try:
            inst = await self.d.vast.show_instance(job.instance_id)
        except VastError:
            return  # the API being down says nothing about the box
        # a host that stopped reporting while SSH and the trainer still work is left to finish
        self._judge(inst, job.instance_id, ssh_ok=ssh_ok)

    def _attempt_timeout(self, nbytes: int = 0) -> float:
        """The bound of one `_remote_call` attempt: a few commands (a stop waits out both grace
        periods) plus `nbytes` at the floor transfer rate."""
        s = self.s
        commands = max(4 * s.box_command_timeout_s,
                       s.box_command_timeout_s + s.remote_stop_grace_s + s.remote_kill_grace_s + 30.0)
        return commands + nbytes / (s.transfer_floor_mb_s * 1e6)

    async def _attempt(self, call: Any, what: str, limit: float) -> Any:
        """Await one remote call, bounded by `limit`; a cancel interrupts it (except while the cancel
        itself is being carried out), so a hung command never holds up /cancel either."""
        task = asyncio.ensure_future(call)
        waits: set[asyncio.Future[Any]] = {task}
        cancelled = None if self._finishing else asyncio.ensure_future(self.cancel_event.wait())
        if cancelled is not None:
            waits.add(cancelled)
        try:
            done, _ = await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if cancelled is not None:
                cancelled.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task in done:
            return task.result()
        if cancelled is not None and cancelled in done:
            raise JobCancelled(self.cancelled_by)
        raise CommandTimeout(f"{what} took longer than {limit:.0f}s")

    async def _remote_call(self, job: Job, what: str, fn: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Run `fn(remote)`, reconnecting through drops until the SSH-lost deadline. Each attempt is
        bounded (`timeout`, default `_attempt_timeout()`): a box that hangs a command while its sshd
        answers is an infrastructure failure, never a wait."""
        deadline = time.monotonic() + self.s.ssh_lost_timeout_s
        limit = timeout if timeout is not None else self._attempt_timeout()
        while True:
            remote = await self._remote_job(job)
            try:
                return await self._attempt(fn(remote), what, limit)
            except CommandTimeout as exc:
                log.warning("job %s: %s hung on the box: %s", job.id, what, exc)
                await self._close_box()
                await self._ensure_instance_alive(job)
                raise InfraFailure("box_hung", f"the machine stopped answering during {what}: {exc}") from None
            except (RemoteCommandError, VerificationError):
                # the command failed on a working link: reconnecting would not help. A host going
                # away can fail a command in odd ways first (files gone mid-command): blame the host
                # then, so the job gets its infrastructure retry instead of an internal error
                await self._ensure_instance_alive(job)
                raise
            except HostKeyMismatch as exc:
                raise JobFailure("host_key", f"the machine's SSH host key changed mid-job: {exc}") from None
            except SSHError as exc:
                log.info("job %s: %s failed (%s); reconnecting", job.id, what, exc)
                await self._close_box()
                await self._ensure_instance_alive(job)
                if time.monotonic() > deadline:
                    raise InfraFailure("ssh_lost", f"lost SSH to the machine for good during {what}") from None
                await self._check_cancel()
                await self._sleep(1.0)

    def _remote_dir(self, job: Job) -> str:
        return posixpath.join(self.s.remote_root, "jobs", job.id)

    def _paths(self, job: Job) -> tuple[str, str, str]:
        root = self._remote_dir(job)
        return root, f"{root}/dataset", f"{root}/output"

    # --- ship ---------------------------------------------------------------------------------
    def _manifest(self, job: Job) -> Any:
        from services.dataset.manifest import Manifest

        if not job.dataset_dir:
            raise JobFailure("user", "the job has no dataset")
        path = Path(job.dataset_dir).parent / "manifest.json"
        try:
            return Manifest.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise JobFailure("user", f"the dataset manifest is missing or unreadable: {exc}") from None

    def _config_text(self, job: Job) -> str:
        _, dataset, output = self._paths(job)
        recipe = FluxRecipe.model_validate(job.recipe)
        return render_config(recipe, job_name=job_name(job), dataset_dir=dataset, training_folder=output, fmt="yaml")

    async def _ship(self, job: Job) -> Job:
        manifest = self._manifest(job)
        config_text = await asyncio.to_thread(self._config_text, job)  # YAML rendering is slow-ish
        root, dataset_dir, output = self._paths(job)
        assert job.dataset_dir is not None
        folder = Path(job.dataset_dir)
        mb = manifest.total_bytes / 1e6
        await self._emit(job, Readiness("uploading", f"{len(manifest.files)} files, {mb:.1f} MB"))
        t0 = time.monotonic()

        async def ship(remote: RemoteJob) -> None:
            await self._start_prefetch(job, remote)  # the model downloads while the dataset goes up
            await remote.box.upload_dataset(folder, manifest, dataset_dir)
            env = {"HF_TOKEN": self.s.hf_token.get_secret_value()} if self.s.hf_token else {}
            env.update(prefetcher.trainer_env(self.s))
            await remote.install(config_text, env)
            await remote.box.put_file(UPLOADER, f"{root}/upload_presigned.py", 0o755)
            await self._restore_checkpoint(job, remote, output)

        resume_s = _CHECKPOINT_FETCH_S if job.artifacts.get("checkpoint") else 0.0
        bound = self._attempt_timeout(manifest.total_bytes) + resume_s
        try:
            async with self.d.startups:
                await self._remote_call(job, "upload", ship, timeout=bound)
        except SSHError as exc:  # a checksum mismatch after retries: the link corrupts data
            raise InfraFailure("upload", f"dataset upload failed: {exc}") from None
        upload_s = round(time.monotonic() - t0, 3)
        job = await self.d.store.update(job.id, measured=phases.mark(
            phases.add(dict(job.measured, upload_s=upload_s), "dataset_upload", upload_s), "uploaded"))
        job = await self._await_prefetch(job)
        measured = job.measured
        await self._emit(job, Readiness("uploaded", f"{mb:.1f} MB verified on the box"))
        if not job.train:
            return await self._to(job, S.PREPARED, "shipped; not training (launch)", remote_dir=root,
                                  measured=measured)
        job = await self._to(job, S.TRAINING, "launching the trainer", remote_dir=root, measured=measured,
                             log_offset=0)
        return job

    async def _start_prefetch(self, job: Job, remote: RemoteJob) -> None:
        """Issue 18: fetch the base model into the box's HF cache now; a failure only costs the overlap."""
        repo = prefetcher.repo_of(FluxRecipe.model_validate(job.recipe))
        if not (self.s.prefetch_model and job.train and repo):
            return
        try:
            await prefetcher.start(remote.box, self._remote_dir(job), self.s, repo)
            await self._emit(job, Readiness("prefetching", f"{repo} into the box's model cache"))
        except CommandTimeout:
            raise  # the box hangs commands: `_remote_call` makes that the job's infrastructure retry
        except (SSHError, OSError) as exc:
            log.warning("job %s: model prefetch not started (%s); the trainer downloads it", job.id, exc)

    async def _await_prefetch(self, job: Job) -> Job:
        """The trainer starts on a warm cache: wait while the prefetch makes progress (a stalled or
        failed one lets the trainer download the rest itself), then record what it fetched."""
        if "prefetch" in job.measured or not (self.s.prefetch_model and job.train):
            return job
        last_progress, last_bytes, last_note = time.monotonic(), -1, 0.0
        while True:
            await self._check_cancel()
            # a hung status read, SSH lost for good or a machine gone is the machine's failure (raised
            # by `_remote_call` as a JobFailure): never swallowed here, or the job would go on, or wait,
            # on a box that stopped answering
            try:
                doc = await self._remote_call(job, "prefetch status",
                                              lambda r: prefetcher.status(r.box, self._remote_dir(job), self.s))
            except SSHError as exc:
                log.info("job %s: no prefetch status: %s", job.id, exc)
                return job
            if doc.get("state") != "running":
                break
            done_bytes = int(doc.get("bytes_done") or 0)
            now = time.monotonic()
            if done_bytes != last_bytes:
                last_bytes, last_progress = done_bytes, now
            elif now - last_progress > self.s.stall_timeout_s:
                log.warning("job %s: the model prefetch stalled; the trainer takes over", job.id)
                break
            if now - last_note >= 5.0 and doc.get("bytes_total"):
                last_note = now
                await self._emit(job, Readiness("downloading", f"{done_bytes / 1e9:.1f}/"
                                                               f"{int(doc['bytes_total']) / 1e9:.1f} GB"))
            await self._sleep(min(1.0, self.s.monitor_interval_s))
        measured = dict(job.measured, prefetch=doc.get("state"))
        fetched = prefetcher.measured_from(doc)
        if fetched is not None and fetched[1] > 0:  # a warm cache fetched nothing: no download phase
            measured = phases.add(measured, "model_download", fetched[0])
            measured["prefetch_bytes"] = fetched[1]
            # when it ran, in the box's wall clock: what overlapped what, for the phase table's reader
            measured["prefetch_window"] = [round(float(doc["started_at"]), 3), round(float(doc["finished_at"]), 3)]
        return await self.d.store.update(job.id, measured=measured)

    async def _restore_checkpoint(self, job: Job, remote: RemoteJob, output: str) -> None:
        """On a retry, put the last backed-up checkpoint where ai-toolkit resumes from it.

        ai-toolkit resumes from the newest `<name>*` file of any extension and dies on a truncated
        one, so the download goes to a name that does not start with the job name, is checked
        against the size and sha256 recorded at backup, and is renamed only then. A checkpoint that
        cannot be restored intact is dropped: the retry starts fresh and says so. optimizer.pt
        follows its checkpoint, so AdamW8bit resumes with its moments."""
        key = job.artifacts.get("checkpoint")
        if not key or self.d.storage is None:
            return
        name = job_name(job)
        dest_dir = f"{output}/{name}"
        base = posixpath.basename(key)
        await remote.box.run(["mkdir", "-p", "--", dest_dir])
        ok = await self._fetch_verified(remote, key, f"{dest_dir}/{base}", job.artifacts.get("checkpoint_sha256"),
                                        job.artifacts.get("checkpoint_size"))
        if not ok:
            await self._emit(job, Readiness("resuming", f"checkpoint {base} could not be restored intact: "
                                                        "starting fresh from step 0"))
            return
        opt_key = job.artifacts.get("optimizer")
        if opt_key and job.artifacts.get("optimizer_for") == key:
            await self._fetch_verified(remote, opt_key, f"{dest_dir}/optimizer.pt",
                                       job.artifacts.get("optimizer_sha256"), job.artifacts.get("optimizer_size"))
        await self._emit(job, Readiness("resuming", f"from checkpoint {base}"))

    async def _fetch_verified(self, remote: RemoteJob, key: str, dest: str, sha256: str | None,
                              size: str | None) -> bool:
        """R2 -> `dest` on the box through a temporary name outside ai-toolkit's `<name>*` glob."""
        assert self.d.storage is not None
        tmp = posixpath.join(posixpath.dirname(dest), ".lorabot-restore.tmp")
        try:
            link = await self.d.storage.link(key, expires_s=3600)
            # the presigned URL goes in on stdin as a curl config (`-K -`): never in argv, ps or a log
            res = await remote.box.run(["curl", "-fsS", "--retry", "3", "-o", tmp, "-K", "-"], check=False,
                                       input=_curl_config(link.url), timeout=_CHECKPOINT_FETCH_S)
            good = res.exit_status == 0
            if good and sha256 and size:
                check = await remote.box.run([self.s.remote_python, f"{remote.job_dir}/upload_presigned.py",
                                              "sha256", tmp], check=False)
                try:
                    info = json.loads(check.stdout.strip().splitlines()[-1])
                    good = str(info["sha256"]) == sha256 and int(info["size"]) == int(size)
                except (ValueError, KeyError, IndexError):
                    good = False
            if good:
                await remote.box.run(["mv", "-f", "--", tmp, dest])
                return True
            log.warning("restore of %s failed its check; not used", key)
        except (SSHError, StorageError) as exc:
            log.warning("restore of %s failed: %s", key, exc)
        await remote.box.run(["rm", "-f", "--", tmp], check=False)
        return False

    # --- train --------------------------------------------------------------------------------
    async def _train(self, job: Job) -> Job:
        t0 = time.monotonic()
        if "trainer_commit" not in job.measured:
            job = await self._record_trainer_commit(job)
        # the box's own hard deadline: the watchdog's latest (a collect's), so the box never ends itself
        # while the bot may still be saving the LoRA from it
        hard_end = (job.started_at or time.time()) + self.s.max_runtime_s + 2 * self.s.watchdog_grace_s
        deadline_in = max(1.0, hard_end - time.time())
        status: RemoteStatus = await self._remote_call(job, "launch", lambda r: r.launch(deadline_in))
        if status.launched:
            commit = str(job.measured.get("trainer_commit", "unknown"))[:12]
            await self._emit(job, Readiness("launched", f"trainer started (ai-toolkit {commit})"))
        self._parser = prog.ProgressParser(job_name(job), nan_limit=self.s.nan_steps_limit)
        # re-attached after the final save line was read: a late error still leaves a complete LoRA
        self._parser.final_checkpoint = job.measured.get("final_checkpoint")
        self._eta = EtaModel(job.recipe, job.quote)
        offset = job.log_offset
        last_output = time.monotonic()
        last_saved = 0.0
        last_snippet = last_samples = time.monotonic()
        cycles = 0
        last_api_check = time.monotonic()
        started = job.started_at or time.time()
        while True:
            await self._check_cancel()
            data, new_offset = await self._remote_call(job, "read log", lambda r, o=offset: r.read_log(o))
            now = time.monotonic()
            if data:
                last_output = now
                job = await self._handle(job, self._parser.feed(data))
            if new_offset != offset or now - last_saved > 10:
                offset = new_offset
                job = await self.d.store.update(job.id, log_offset=offset, last_output_at=time.time(),
                                                cost_usd=job.cost_usd)
                last_saved = now
            cycles += 1
            # a trainer that just printed is alive: ask the supervisor when the log is quiet (and
            # every 5th cycle), which halves the round trips of a busy job
            if not data or cycles % 5 == 0:
                status = await self._remote_call(job, "status", lambda r: r.status())
                if status.done:
                    data, offset = await self._remote_call(job, "read log",
                                                           lambda r, o=offset: r.read_log(o, 1 << 24))
                    job = await self._handle(job, self._parser.feed(data) + self._parser.close())
                    job = await self.d.store.update(job.id, log_offset=offset)
                    await self._poll_samples(job)
                    break
                if status.lost:
                    raise InfraFailure("supervisor_lost", "the supervisor on the box died (box restarted?)")
            if now - last_samples > max(5.0, self.s.monitor_interval_s):
                last_samples = now
                await self._poll_samples(job)
            if now - last_snippet > self.s.log_snippet_interval_s:
                last_snippet = now
                await self._emit(job, LogSnippet(self._redact("\n".join(self._parser.tail()[-15:]))))
            if now - last_api_check > self.s.instance_check_s:
                last_api_check = now
                await self._ensure_instance_alive(job, ssh_ok=True)
                await self._emit(job, CostUpdate(job.cost_so_far(), job.dph_total or 0.0))
            await self._limits(job, started, now - last_output)
            await self._sleep(self.s.monitor_interval_s)
        measured = dict(self._phase_switch(job, None), train_s=round(time.monotonic() - t0, 3))
        if status.started_at and status.finished_at:  # the trainer's own run time, by the box's clock
            measured["trainer_s"] = round(status.finished_at - status.started_at, 3)
        if job.sec_per_step:
            measured["sec_per_step"] = job.sec_per_step
        out = expected_outputs(job_name(job), self._paths(job)[2])
        tail = "\n".join(self._parser.tail())
        exists = await self._remote_call(job, "check result", lambda r: r.box.exists(out.final_lora))
        # from the live parser's state, never a re-parsed tail (it can start inside the config dump)
        outcome = prog.classify_exit(status.exit_code, exists, self._parser)
        if not outcome.success:
            await self._ensure_instance_alive(job)  # a trainer killed as its host died: the host's fault
            kind = outcome.kind.value if outcome.kind else "unknown"
            error = InfraFailure if outcome.kind is prog.FailureKind.HOST_FAULT else JobFailure
            raise error(kind, f"training failed: {outcome.reason}", last_lines=self._redact(tail[-1500:]))
        if outcome.warning:  # the final LoRA was saved; the final sampling pass (or later) failed
            measured["trainer_warning"] = self._redact(outcome.warning)
            await self._emit(job, LogSnippet(self._redact(f"warning: {outcome.warning}\n{outcome.line or ''}")))
        return await self._to(job, S.COLLECTING, "training finished", measured=measured)

    async def _record_trainer_commit(self, job: Job) -> Job:
        """The ai-toolkit commit that trains this job (the image keeps its .git): its console output
        is what the parser reads, and it changes between versions."""
        try:
            res = await self._remote_call(job, "trainer commit", lambda r: r.box.run(
                ["git", "-C", self.s.aitoolkit_dir, "rev-parse", "HEAD"], check=False))
            commit = res.stdout.strip() if res.exit_status == 0 else ""
        except SSHError:
            commit = ""
        commit = commit if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else "unknown"
        log.info("job %s: ai-toolkit commit %s (image %s)", job.id, commit, self.s.image)
        return await self.d.store.update(job.id, measured=dict(job.measured, trainer_commit=commit))

    async def _limits(self, job: Job, started: float, silent_s: float) -> None:
        async def stop_and_fail(kind: str, message: str) -> None:
            # a limit stop is final (M4): whatever happens to the stop, never a retry on a new machine
            try:
                await self._remote_call(job, "stop", lambda r: r.stop())
            except Exception as exc:
                log.warning("job %s: stopping the trainer at the %s limit failed: %s", job.id, kind, exc)
            tail = "\n".join(self._parser.tail()) if self._parser else ""
            raise JobFailure(kind, message, last_lines=self._redact(tail[-1500:]))

        parser = self._parser
        if parser is not None and parser.failure is not None and parser.failure.kind is prog.FailureKind.NAN_LOSS:
            await stop_and_fail("nan_loss", f"training diverged: {parser.failure.line}: stopped")
        stall = self.s.stall_timeout_s
        if (parser is not None and parser.failure is not None and parser.failure.kind is prog.FailureKind.HOST_FAULT
                and silent_s > min(60.0, stall / 3)):
            # a broken GPU can leave the trainer hung instead of exiting: the machine's fault, so the
            # job gets its retry on another machine rather than waiting out the stall timer
            try:
                await self._remote_call(job, "stop", lambda r: r.stop())
            except (SSHError, JobFailure) as exc:
                log.info("job %s: stop after a host fault failed: %s", job.id, exc)
            raise InfraFailure("host_fault", f"training failed: {parser.failure.line}",
                               last_lines=self._redact("\n".join(parser.tail())[-1500:]))
        if parser is not None and parser.step is None and not self._saw_download:
            # older images print nothing while the base model downloads (before 2026-06-24)
            stall = max(stall, self.s.load_stall_timeout_s)
        if silent_s > stall:
            phase = self._parser.phase.value if self._parser and self._parser.phase else "unknown"
            await stop_and_fail("stalled", f"no output for {silent_s / 60:.0f} min while {phase}: stopped")
        if time.time() - started > self.s.max_runtime_s:
            await stop_and_fail("max_runtime", f"ran longer than {self.s.max_runtime_s / 3600:.1f} h: stopped")
        if job.cost_so_far() > self.s.max_job_cost:
            await stop_and_fail("max_cost", f"cost passed the ${self.s.max_job_cost:.2f} cap: stopped")

    def _phase_switch(self, job: Job, progress_phase: str | None) -> dict[str, Any]:
        ended = self._phase_timer.switch(progress_phase)
        return phases.add(job.measured, *ended) if ended else dict(job.measured)

    async def _handle(self, job: Job, events: list[prog.ProgressEvent]) -> Job:
        last_step: prog.Step | None = None
        if self._eta is not None:
            self._eta.record(events, time.monotonic())
        for ev in events:
            if isinstance(ev, prog.Step):
                if last_step is None and "first_step" not in (job.measured.get("marks") or {}):
                    job = await self.d.store.update(job.id, measured=phases.mark(job.measured, "first_step"))
                last_step = ev
                if ev.loss is not None and (not self._loss_curve or self._loss_curve[-1][0] < ev.step):
                    self._loss_curve.append((ev.step, ev.loss))
            elif isinstance(ev, prog.PhaseChanged):
                job = await self.d.store.update(job.id, phase=ev.phase.value,
                                                measured=self._phase_switch(job, ev.phase.value))
                await self._emit(job, Readiness(ev.phase.value, ev.detail))
            elif isinstance(ev, prog.DownloadProgress):
                self._saw_download = True
                if ev.bytes_total > self._downloads.get(ev.file, 0):  # bars per file: count each once
                    self._downloads[ev.file] = ev.bytes_total
                    job = await self.d.store.update(job.id, measured=dict(
                        job.measured, trainer_download_bytes=sum(self._downloads.values())))
                # download bars redraw ~10 times a second: pass one on every few seconds
                if time.monotonic() - self._last_download_note >= 5.0:
                    self._last_download_note = time.monotonic()
                    done_gb, total_gb = ev.bytes_done / 1e9, ev.bytes_total / 1e9
                    await self._emit(job, Readiness("downloading", f"{done_gb:.1f}/{total_gb:.1f} GB"))
            elif isinstance(ev, prog.CheckpointSaved):
                # the final file too, at once: the final sampling pass (or the host) may still fail
                if ev.final:  # remembered across a restart, which reads the log on from a later offset
                    job = await self.d.store.update(job.id, measured=dict(job.measured, final_checkpoint=ev.path))
                backed = await self._backup_checkpoint(job, ev.path)
                job = await self.d.store.require(job.id)
                if not ev.final:
                    await self._emit(job, CheckpointSaved(ev.step or 0, backed))
            elif isinstance(ev, prog.Notice) and ev.kind is prog.NoticeKind.OPTIMIZER_SAVED:
                job = await self._backup_optimizer(job, ev.line)
            elif isinstance(ev, prog.Notice) and ev.kind is prog.NoticeKind.NAN_LOSS and not self._nan_reported:
                self._nan_reported = True
                step = self._parser.step if self._parser else None
                await self._emit(job, LogSnippet(f"warning: loss is nan (near step {step}): training is diverging; "
                                                 f"the job stops after {self.s.nan_steps_limit} such steps in a row"))
            elif isinstance(ev, prog.SampleWritten):
                await self._fetch_sample(job, ev)
            elif isinstance(ev, prog.Failure):
                self._last_failure = ev
        if last_step is not None:
            # a moving average: one flow-matching step's loss is too noisy to report
            loss = self._parser.smoothed_loss() if self._parser else last_step.loss
            eta = (self._eta.eta(last_step.step, last_step.total, last_step.sec_per_it) if self._eta
                   else last_step.eta_s)
            job = await self.d.store.update(
                job.id, step=last_step.step, total_steps=last_step.total, loss=loss,
                sec_per_step=last_step.sec_per_it, eta_s=eta, phase="training",
            )
            await self._emit(job, Progress("training", last_step.step, last_step.total, loss,
                                           last_step.sec_per_it, eta, job.cost_so_far()))
        return job

    async def _poll_samples(self, job: Job) -> None:
        """ai-toolkit does not print where samples go: list its samples folder for new images."""
        out = expected_outputs(job_name(job), self._paths(job)[2])
        res = await self._remote_call(job, "list samples", lambda r: r.box.run(
            ["find", out.samples_dir, "-maxdepth", "1", "-type", "f", "-name", "*__*_*.*"], check=False))
        for path in sorted(res.stdout.split(), key=posixpath.basename):
            ev = prog.parse_sample_path(path)
            if ev is not None:
                await self._fetch_sample(job, ev)

    async def _fetch_sample(self, job: Job, ev: prog.SampleWritten) -> None:
        out = expected_outputs(job_name(job), self._paths(job)[2])
        m = _SAMPLE_NAME.fullmatch(posixpath.basename(ev.path))
        if m is None:  # the local name is built from the match, never from what the box printed
            return
        name = f"{m['ms']}__{m['step']}_{m['i']}.{m['ext'].lower()}"
        if name in self._seen_samples:
            return
        self._seen_samples.add(name)
        remote = f"{out.samples_dir}/{name}"
        local = self._work / "samples" / name
        try:
            await self._remote_call(job, "download sample", lambda r: r.box.download(
                remote, local, max_bytes=SAMPLE_MAX_BYTES))
        except SSHError as exc:
            log.info("sample %s not fetched: %s", remote, exc)
            return
        await self._emit(job, SampleImage(local, ev.step))

    async def _backup_checkpoint(self, job: Job, path: str) -> bool:
        """Back up a checkpoint (or the final file) with its size and sha256, which a restore checks."""
        if not (self.s.backup_checkpoints and self.d.storage):
            return False
        keys = job_keys(job.user_id or "anonymous", job.id, job_name(job))
        key = keys.checkpoint(posixpath.basename(path))
        try:
            sha, size = await self._upload_from_box(job, path, key)
        except (SSHError, StorageError, JobFailure) as exc:
            log.warning("checkpoint backup of %s failed: %s", path, exc)
            return False
        job = await self.d.store.require(job.id)
        await self.d.store.update(job.id, artifacts={**job.artifacts, "checkpoint": key, "checkpoint_sha256": sha,
                                                     "checkpoint_size": str(size)})
        return True

    async def _backup_optimizer(self, job: Job, path: str) -> Job:
        """optimizer.pt, saved right after its checkpoint: restored with it, AdamW8bit keeps its moments."""
        job = await self.d.store.require(job.id)
        ckpt = job.artifacts.get("checkpoint")
        if not (ckpt and self.s.backup_checkpoints and self.d.storage) or posixpath.basename(path) != "optimizer.pt":
            return job
        keys = job_keys(job.user_id or "anonymous", job.id, job_name(job))
        key = keys.checkpoint("optimizer.pt")
        try:
            sha, size = await self._upload_from_box(job, path, key)
        except (SSHError, StorageError, JobFailure) as exc:
            log.warning("optimizer backup of %s failed: %s", path, exc)
            return job
        job = await self.d.store.require(job.id)
        return await self.d.store.update(job.id, artifacts={
            **job.artifacts, "optimizer": key, "optimizer_for": ckpt, "optimizer_sha256": sha,
            "optimizer_size": str(size)})

    async def _upload_from_box(self, job: Job, path: str, key: str) -> tuple[str, int]:
        """Box -> R2 through a presigned PUT (no keys on the box); else SSH download + upload."""
        storage = self.d.storage
        assert storage is not None
        try:
            return await self._put_from_box(job, path, key)
        except (SSHError, StorageError, ValueError, KeyError) as exc:
            log.warning("direct upload of %s failed (%s); falling back to SSH download", path, exc)
        local = self._work / "collect" / _local_name(path)
        await self._remote_call(job, "download", lambda r: r.box.download(path, local, max_bytes=LORA_MAX_BYTES),
                                timeout=self._attempt_timeout(LORA_MAX_BYTES))
        await storage.upload_file(local, key)
        return await asyncio.to_thread(_sha256_size, local)

    async def _put_from_box(self, job: Job, path: str, key: str) -> tuple[str, int]:
        """The box uploads `path` itself through a presigned PUT; verified by size and sha256."""
        storage = self.d.storage
        assert storage is not None
        root = self._remote_dir(job)

        async def direct(remote: RemoteJob) -> tuple[str, int]:
            res = await remote.box.run([self.s.remote_python, f"{root}/upload_presigned.py", "sha256", path])
            info = json.loads(res.stdout.strip().splitlines()[-1])
            sha, size = str(info["sha256"]), int(info["size"])
            put = await storage.presign_put(key, expires_s=3600, sha256=sha)
            # the URL (a bearer credential) on stdin ("-"): never in argv, ps or asyncssh's log (M5)
            argv = [self.s.remote_python, f"{root}/upload_presigned.py", "put", path, "-"]
            for name, value in put.headers.items():
                argv += ["-H", f"{name}: {value}"]
            await remote.box.run(argv, input=put.url + "\n", timeout=remote.box.transfer_timeout(size))
            await storage.verify(key, size, sha)
            return sha, size

        result: tuple[str, int] = await self._remote_call(job, f"upload {posixpath.basename(path)}", direct,
                                                          timeout=self._attempt_timeout(LORA_MAX_BYTES))
        return result

    # --- collect ------------------------------------------------------------------------------
    # The LoRA is made safe before the box goes (uploaded by the box, or downloaded here over SSH
    # and verified); then the box is destroyed, and the rest goes to R2 from this host, retried
    # with backoff for as long as R2 is down, also after a restart (the job records the local copy).
    async def _collect(self, job: Job) -> Job:
        t0 = time.monotonic()
        name = job_name(job)
        out = expected_outputs(name, self._paths(job)[2])
        lora_name = (job.name or name).replace(" ", "_")
        keys = job_keys(job.user_id or "anonymous", job.id, lora_name)
        if self.d.storage is None:
            raise JobFailure("config", "R2 is not configured (R2_BUCKET and keys): the LoRA cannot be stored")
        storage = self.d.storage
        # the box's dead-man's switch stays fed while the LoRA is being saved from it
        heartbeat = asyncio.create_task(self._heartbeat(job), name=f"lorabot-heartbeat-{job.id}")
        try:
            if not (job.lora_stored or job.local_lora):
                if job.instance_gone_at is not None:
                    raise JobFailure("collect", "the machine was gone before the LoRA could be saved")
                await self._emit(job, Readiness("collecting", "storing the LoRA"))
                job = await self._secure_lora(job, out.final_lora, keys.lora)
            if job.instance_gone_at is None:
                await self._fetch_log(job)
                if not job.lora_stored:  # only a copy here: R2 is failing, stop paying for the machine now
                    job = await self._destroy(job)
        finally:
            heartbeat.cancel()
        link, links, job = await self._store_results(job, keys)
        expires = link.expires_at.timestamp() if link.expires_at else None
        collect_s = round(time.monotonic() - t0, 3)
        measured = phases.add(dict(job.measured, collect_s=collect_s, stored_at=time.time()), "collection", collect_s)
        job = await self.d.store.update(job.id, lora_key=keys.lora, lora_url=link.url, link_expires_at=expires,
                                        artifacts={**job.artifacts, "lora": keys.lora, "log": keys.log,
                                                   "config": keys.config}, measured=measured,
                                        local_lora=None, local_lora_sha256=None)
        await asyncio.to_thread(shutil.rmtree, self._work / "collect", True)
        early = (self.d.warm is not None and job.instance_gone_at is None
                 and handover.may_hand_over(self.s, job))
        if early:  # the link does not wait for the machine's next job
            duration = time.time() - (job.started_at or job.created_at)
            await self._emit(job, Finished(link.url, expires, duration, job.cost_so_far(), job.loss,
                                           list(self._loss_curve), links))
        if job.instance_gone_at is None:  # the LoRA is in R2: hand the machine to a queued job, or destroy it
            job, _successor = await handover.release(self, job)
        summary = {
            "job_id": job.id, "name": job.name, "trigger_word": job.trigger_word, "steps": job.total_steps,
            "final_loss": job.loss, "cost_usd": job.cost_so_far(), "gpu": job.gpu_name, "dph_total": job.dph_total,
            "lora_key": keys.lora, "measured": job.measured, "quote": job.quote,
            "breakdown": phases.summary(job),
        }
        try:
            await storage.upload_bytes(json.dumps(summary, indent=2).encode(), keys.job)
        except StorageError as exc:
            log.warning("job.json not stored: %s", exc)
        job = await self._to(job, S.SUCCEEDED, "LoRA stored", cost_usd=job.cost_so_far())
        duration = (job.finished_at or time.time()) - (job.started_at or job.created_at)
        if not early:
            await self._emit(job, Finished(link.url, expires, duration, job.cost_so_far(), job.loss,
                                           list(self._loss_curve), links))
        return job

    async def _secure_lora(self, job: Job, path: str, key: str) -> Job:
        """Put the LoRA out of the box's reach: in R2 (the box uploads it), else here (verified)."""
        try:
            await self._put_from_box(job, path, key)
            return await self.d.store.update(job.id, lora_stored=True)
        except InfraFailure as exc:  # the box is gone or out of reach for good: no download either
            raise JobFailure("collect", f"the LoRA could not be saved from the machine: {exc}") from None
        except (SSHError, StorageError, ValueError, KeyError) as exc:
            log.warning("job %s: the box could not upload the LoRA (%s); downloading it here", job.id, exc)
        local = self._work / "collect" / "lora.safetensors"
        try:
            sha = await self._remote_call(job, "hash the LoRA", lambda r: r.box.sha256(path))
            await self._remote_call(job, "download the LoRA",
                                    lambda r: r.box.download(path, local, sha256=sha, max_bytes=LORA_MAX_BYTES))
        except (SSHError, OSError, InfraFailure) as exc:
            # never a retry elsewhere (the result is on this box); an unreachable box is given up
            raise JobFailure("collect", f"the LoRA could not be saved from the machine: {exc}") from None
        return await self.d.store.update(job.id, local_lora=str(local), local_lora_sha256=sha)

    async def _fetch_log(self, job: Job) -> None:
        """The trainer's log, kept here before the box goes (best effort: the LoRA matters)."""
        log_local = self._work / "collect" / "log.txt"
        try:
            remote = await self._remote_job(job)
            await self._remote_call(job, "download log", lambda r: r.box.download(
                remote.log_path, log_local, max_bytes=LOG_MAX_BYTES))
        except (SSHError, OSError, JobFailure) as exc:
            log.warning("job %s: the training log was not fetched: %s", job.id, exc)

    async def _store_results(self, job: Job, keys: Any) -> tuple[Any, dict[str, str], Job]:
        """Upload what is kept here to R2, retried with backoff until it is taken."""
        delay = self.s.collect_retry_min_s
        told = False
        while True:
            try:
                return await self._upload_results(job, keys)
            except (StorageError, OSError) as exc:
                log.warning("job %s: storing the results failed (%s); retrying in %.0f s", job.id, exc, delay)
                if job.instance_gone_at is None:  # the LoRA and log are safe: no machine bills while R2 is out
                    job = await self._destroy(job)
                if not told:
                    told = True
                    await self._emit(job, Readiness(
                        "collecting", "storage is unreachable; the LoRA is kept safe and the upload is retried"))
            await self._check_cancel()
            await self._sleep(delay)
            delay = min(delay * 2, self.s.collect_retry_max_s)
            job = await self.d.store.require(job.id)

    async def _upload_results(self, job: Job, keys: Any) -> tuple[Any, dict[str, str], Job]:
        storage = self.d.storage
        assert storage is not None
        if not job.lora_stored:
            if not job.local_lora or not await asyncio.to_thread(Path(job.local_lora).is_file):
                # not worth retrying: R2 coming back would not bring it back
                raise JobFailure("collect", f"the kept copy of the LoRA is gone: {job.local_lora}")
            await storage.upload_file(Path(job.local_lora), keys.lora, sha256=job.local_lora_sha256)
            job = await self.d.store.update(job.id, lora_stored=True)
        config_text = await asyncio.to_thread(self._config_text, job)
        await storage.upload_bytes(config_text.encode(), keys.config)
        log_local = self._work / "collect" / "log.txt"
        if log_local.exists():
            commit = job.measured.get("trainer_commit", "unknown")
            redacted = f"lorabot: ai-toolkit commit {commit}, image {self.s.image}\n" + self._redact(
                await asyncio.to_thread(log_local.read_text, errors="replace"))
            await storage.upload_bytes(redacted.encode(), keys.log)
        samples = sorted((self._work / "samples").glob("*")) if (self._work / "samples").exists() else []
        for sample in samples[-12:]:
            if sample.is_file():
                await storage.upload_file(sample, keys.sample(sample.name))
        if job.dataset_dir:
            manifest_path = Path(job.dataset_dir).parent / "manifest.json"
            if manifest_path.exists():
                await storage.upload_file(manifest_path, keys.manifest)
        link = await storage.link(keys.lora, expires_s=self.s.link_expiry_s)
        return link, {"lora": link.url}, job

    async def _heartbeat(self, job: Job) -> None:
        """Keep the box's dead-man's switch fed while collecting (the monitor loop feeds it before)."""
        while True:
            box = self._box  # only on the collect's own connection: never a second one racing it
            if box is not None and box.connected:
                try:
                    await RemoteJob(box, self._remote_dir(job), self.s).touch()
                except SSHError as exc:
                    log.info("job %s: heartbeat not delivered: %s", job.id, exc)
            await asyncio.sleep(max(1.0, min(self.s.monitor_interval_s * 5, self.s.deadman_s / 4)))

    async def _resume_handover(self, job: Job) -> Job:
        """A restart in the middle of a handover (issue 18): settle the machine, then end the job."""
        job = await handover.recover(self, job)
        if job.lora_url:
            return await self._to(job, S.SUCCEEDED, "LoRA stored (machine settled after a restart)",
                                  cost_usd=job.cost_so_far())
        return await self._to(job, S.FAILED, job.reason or "ended during a machine handover",
                              failure_kind=job.failure_kind or "internal", cost_usd=job.cost_so_far())

    # --- endings ------------------------------------------------------------------------------
    async def _destroy(self, job: Job) -> Job:
        """Destroy the rented machine (verified) and settle its cost; retried, never skipped.

        Every instance under the job's label goes, not only the one whose id the job holds: a create
        whose answer was lost may have rented a second one."""
        t0 = time.monotonic()
        if job.label:
            try:
                found = await self.d.vast.find_by_label(job.label)
            except VastError as exc:
                if job.instance_id is None:
                    raise JobFailure("destroy", f"cannot check label {job.label} for a rental: {exc}") from None
                log.warning("job %s: label %s not listed (%s); destroying the known instance and "
                            "looking at the label again later", job.id, job.label, exc)
                self._guard_label(job.label, None)
                found = []
            # destroy every rental under the label (a lost create may have rented a second one), and the
            # known one, before any store write: with the disk full the write fails, and the machines
            # must be gone by then (review H1)
            ids = [i.id for i in found]
            if job.instance_id is not None and job.instance_gone_at is None and job.instance_id not in ids:
                ids.append(job.instance_id)
            for instance_id in ids:
                if instance_id != job.instance_id:
                    log.warning("job %s: destroying instance %s under label %s", job.id, instance_id, job.label)
                await self._destroy_id(instance_id)
            if found and job.instance_gone_at is None:  # settled already: never bill twice
                now = time.time()
                first = next((i for i in found if i.id == job.instance_id), found[0])
                rented = job.rented_at or first.start_date or now
                job = job.model_copy(update={"instance_id": first.id, "rented_at": rented,
                                             "dph_total": job.dph_total or first.dph_total or None})
                return await self.d.store.update(
                    job.id, instance_id=first.id, instance_gone_at=now, cost_usd=job.cost_so_far(now),
                    billed_s=job.rental_seconds(now), rented_at=None, dph_total=job.dph_total,
                    bandwidth_usd=0.0,  # now inside cost_usd
                    measured=phases.add(job.measured, "teardown", time.monotonic() - t0))
        if job.instance_id is None or job.instance_gone_at is not None:
            return job
        await self._destroy_id(job.instance_id)
        now = time.time()
        cost = job.cost_so_far(now)
        billed = job.rental_seconds(now)
        measured = phases.add(job.measured, "teardown", time.monotonic() - t0)
        return await self.d.store.update(job.id, instance_gone_at=now, cost_usd=cost, billed_s=billed,
                                         rented_at=None, bandwidth_usd=0.0,  # now inside cost_usd
                                         measured=measured)

    async def _destroy_id(self, instance_id: int) -> None:
        last: Exception | None = None
        base = self.s.vastai_backoff_s  # 1 s by default: 1, 2, 4, 8 s between the five tries
        for attempt in range(5):
            try:
                await self.d.vast.destroy_instance(instance_id)
                return
            except VastError as exc:
                last = exc
                if attempt < 4:
                    await asyncio.sleep(min(base * 2**attempt, 10 * base))
        raise JobFailure("destroy", f"instance {instance_id} could not be destroyed: {last}")

    async def _safe_destroy(self, job: Job) -> tuple[Job, str]:
        try:
            return await self._destroy(job), ""
        except Exception as exc:  # a full disk (store write) or the API: the reaper's sweep retries
            log.error("job %s: instance %s NOT destroyed (it may still bill): %s", job.id, job.instance_id, exc)
            await self._emit(job, OperatorAlert(
                f"instance {job.instance_id} of job {job.id} could not be destroyed and may still bill: {exc}. "
                "The reaper retries; check the Vast.ai console."))
            return job, f"; WARNING: instance {job.instance_id} not destroyed yet, the reaper will retry"

    async def _release(self, job: Job, exc: JobFailure) -> tuple[Job, str]:
        try:
            job = await self.d.store.update(job.id, reason=exc.message, failure_kind=exc.kind)
            # no idle wait here: the failure message should not wait for a next job that may not come
            job, _ = await handover.release(self, job, idle_s=0.0)
            return job, ""
        except (JobFailure, VastError, SSHError) as err:
            log.error("job %s: %s", job.id, err)
            return await self._safe_destroy(await self.d.store.require(job.id))

    async def _finish_cancelled(self, by: str) -> Job:
        self._finishing = True
        job = await self.d.store.require(self.job_id)
        if job.state.terminal:
            return job
        partial_url = None
        if job.state == S.TRAINING and job.host_key:
            # bounded, and whatever goes wrong in it (OSError included) the destroy below still runs
            try:
                async with asyncio.timeout(self.s.cancel_save_timeout_s):
                    partial_url = await self._stop_for_cancel(job)
            except Exception as exc:
                log.warning("job %s: stopping / saving the partial LoRA failed: %s: %s", job.id,
                            type(exc).__name__, exc)
            await self._close_box()
            job = await self.d.store.require(self.job_id)
        destroyed = job.instance_id if job.instance_gone_at is None else None
        job, warn = await self._safe_destroy(job)
        reason = (f"cancelled by {by}" if by else "cancelled") + warn
        job = await self._to(job, S.CANCELLED, reason, cost_usd=job.cost_so_far(), failure_kind="cancelled")
        await self._emit(job, Cancelled(job.cost_so_far(), destroyed if not warn else None, partial_url))
        return job

    async def _stop_for_cancel(self, job: Job) -> str | None:
        """Ask the trainer to stop; with save-partial on, store the newest checkpoint."""
        try:
            remote = await asyncio.wait_for(self._remote_job(job), timeout=30)
            status = await remote.status()
            if status.phase != "absent" and not status.done:
                await remote.stop()
            if not (self.s.save_partial_on_cancel and self.d.storage):
                return None
            out = expected_outputs(job_name(job), self._paths(job)[2])
            res = await remote.box.run(["sh", "-c", 'ls -1t -- "$1"/*.safetensors 2>/dev/null | head -n 1',
                                        "sh", out.output_dir], check=False)
            newest = res.stdout.strip()
            if not newest:
                return None
            keys = job_keys(job.user_id or "anonymous", job.id, f"{job.name or job_name(job)}_partial")
            await self._upload_from_box(job, newest, keys.lora)
            link = await self.d.storage.link(keys.lora, expires_s=self.s.link_expiry_s)
            await self.d.store.update(job.id, artifacts={**job.artifacts, "partial": keys.lora})
            return link.url
        except (SSHError, StorageError, JobFailure, TimeoutError) as exc:
            log.warning("job %s: no partial LoRA saved: %s", job.id, exc)
            return None

    async def end_at_limit(self, kind: str, message: str) -> Job:
        """The watchdog's way out: destroy through the API (no SSH) and fail; never a retry (M4)."""
        job = await self.d.store.require(self.job_id)
        if job.state.terminal:
            return job
        self._box, self._remote = None, None  # the cancelled task owned that connection
        job, warn = await self._safe_destroy(job)
        reason = message + warn
        job = await self._to(job, S.FAILED, reason, failure_kind=kind, cost_usd=job.cost_so_far())
        await self._emit(job, Failed(reason, kind, "", job.cost_so_far()))
        return job

    async def _failed(self, exc: JobFailure) -> Job:
        job = await self.d.store.require(self.job_id)
        if job.state.terminal:
            return job
        if exc.retryable and job.attempt < 2 and not self.cancel_event.is_set() and job.state.holds_instance:
            return await self._retry(job, exc)
        if exc.kind in handover.MACHINE_NEUTRAL_FAILURES and not isinstance(exc, InfraFailure):
            job, warn = await self._release(job, exc)  # the machine is fine: the next job may take it
        else:
            job, warn = await self._safe_destroy(job)
        reason = exc.message + warn
        job = await self._to(job, S.FAILED, reason, failure_kind=exc.kind, cost_usd=job.cost_so_far(),
                             failure_announced=job.attempt)
        await self._emit(job, Failed(reason, exc.kind, exc.last_lines, job.cost_so_far()))
        return job

    async def _retry(self, job: Job, exc: JobFailure) -> Job:
        """One more try on another machine; never when the failed one could not be destroyed, and
        never from a state the state machine does not let go back to renting (collecting: the
        result is on that machine)."""
        dst = S.QUEUED if job.state == S.RENTING else S.RENTING
        try:
            check_transition(job.id, job.state, dst)  # before anything is destroyed (review C4)
        except IllegalTransition:
            return await self._failed(JobFailure(exc.kind, exc.message, last_lines=exc.last_lines))
        await self._close_box()
        try:
            job = await self._destroy(job)
        except JobFailure as destroy_error:
            return await self._failed(JobFailure(exc.kind, f"{exc.message}; {destroy_error}"))
        if job.failure_announced < job.attempt:  # one post per failed attempt, whatever restarts
            job = await self.d.store.update(job.id, failure_announced=job.attempt)
            await self._emit(job, Failed(exc.message, exc.kind, exc.last_lines, job.cost_so_far(), retrying=True))
        excluded = [*job.excluded_machines, *([job.machine_id] if job.machine_id else [])]
        attempt = job.attempt + 1
        job = await self._to(
            job, dst, f"retrying on another machine after: {exc.message}", attempt=attempt,
            excluded_machines=excluded, instance_id=None, machine_id=None, offer_id=None, ssh_host=None,
            ssh_port=None, host_key=None, instance_gone_at=None, rented_at=None, log_offset=0, step=0,
            label=label_for(self.s, job, attempt, self.d.store.install_id),
        )
        self._parser = None
        self._saw_download = self._nan_reported = False
        return await self.run()


# --- phase marks (issue 18) -------------------------------------------------------------------
def _rent_marks(measured: dict[str, Any], created: float, offer_id: int | None, offers: list[Any]) -> dict[str, Any]:
    """The create request's time and the rented offer's advertised bandwidth (for the quote's feedback)."""
    out = phases.mark(measured, "created", created)
    marks = dict(out.get("marks") or {})
    marks.pop("running", None)  # a retry's new machine boots anew
    out["marks"] = marks
    offer = next((o for o in offers if o.id == offer_id), None)
    if offer is not None:
        out["inet_down"] = offer.inet_down
    return out


def _ready_phases(measured: dict[str, Any]) -> dict[str, Any]:
    """Close create -> running and running -> SSH at the moment SSH became usable."""
    now = time.time()
    marks = measured.get("marks") or {}
    created, running = marks.get("created"), marks.get("running")
    out = dict(measured)
    if created is not None and running is not None:
        out = phases.add(out, "create_to_running", float(running) - float(created))
    if running is not None:
        out = phases.add(out, "running_to_ssh", now - float(running))
    return phases.mark(out, "ssh", now)
