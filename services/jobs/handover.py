"""Warm handover (issue 18): a finished job's machine goes to a queued job instead of being destroyed.

When job A ends well (succeeded, or failed for a reason that is not the machine's) and a queued job B
can use the same machine (same base model, price within B's cap, machine not excluded by B, enough
free disk), A's pipeline hands it over:

    1. intent     A.measured["handover"] = {to, label, step}: written first, so a restart knows;
                  then the API must still report the machine alive, and its disk must have room
    2. wipe       A's job folder (dataset, latents, outputs, samples, log, env) removed, A's leftover
                  processes killed, and both verified gone
    3. relabel    the instance's label becomes B's (the reaper honours A's recorded intent meanwhile)
    4. adopt      B: queued -> uploading in one write, with A's instance, pinned SSH endpoint and a
                  warm quote (no rent, pull or model download); B pays from this moment
    5. close      A: instance released at this moment (A paid its span, the idle wait included)

Every failure in steps 2-4 destroys the machine; B, untouched or put back in the queue, rents a fresh
one. A restart finds A not terminal with a recorded intent: before step 4 it destroys the machine
(B is still queued); after it, it only closes A (B drives the machine). The idle wait for a queued job
is at most LORABOT_WARM_IDLE_S; a machine serves at most LORABOT_WARM_MAX_JOBS jobs and is never handed
over once older than LORABOT_WARM_MAX_AGE_S.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from services.jobs.model import Job, JobState
from services.jobs.store import JobStore
from services.recipe import FluxRecipe
from services.settings import Settings

if TYPE_CHECKING:
    from services.jobs.pipeline import Pipeline

log = logging.getLogger(__name__)
S = JobState

# failures that say nothing against the machine (the recipe's, the dataset's, the account's)
MACHINE_NEUTRAL_FAILURES = frozenset({"user", "gated_model", "no_images", "cuda_oom"})
DISK_MARGIN_BYTES = 5_000_000_000  # latents, checkpoints, samples of the next job beside its dataset


class HandoverError(Exception):
    pass


def machine_of(job: Job) -> dict[str, Any]:
    """The machine's history as it travels from job to job: first rental start, jobs served."""
    m = job.measured.get("machine") or {}
    return {"started_at": float(m.get("started_at") or job.rented_at or time.time()), "jobs": int(m.get("jobs") or 1)}


def may_hand_over(settings: Settings, job: Job, now: float | None = None) -> bool:
    if not settings.warm_reuse or job.instance_id is None or job.instance_gone_at is not None or not job.host_key:
        return False
    m = machine_of(job)
    return m["jobs"] < settings.warm_max_jobs and (now or time.time()) - m["started_at"] < settings.warm_max_age_s


def compatible(settings: Settings, holder: Job, queued: Job) -> bool:
    """Can `queued` run on `holder`'s machine? (the disk is checked on the box, after the pick)"""
    if queued.state != S.QUEUED or not queued.train or queued.cancel_requested or queued.attempt > 1:
        return False
    if holder.machine_id is not None and holder.machine_id in queued.excluded_machines:
        return False
    cap = min(queued.max_price or settings.max_price, settings.max_price)
    if holder.dph_total is not None and holder.dph_total > cap:
        return False
    try:
        mine = FluxRecipe.model_validate(holder.recipe).model_name_or_path
        theirs = FluxRecipe.model_validate(queued.recipe).model_name_or_path
    except ValueError:
        return False
    return mine == theirs


class WarmPool:
    """The worker's side: hands a compatible queued job (dequeued, leased) to a machine holder."""

    def __init__(self, take: Callable[[Callable[[Job], bool]], Awaitable[Job | None]],
                 launch: Callable[[Job], None], put_back: Callable[[str], None],
                 settings: Settings, store: JobStore) -> None:
        self._take = take
        self._launch = launch
        self._put_back = put_back
        self.settings = settings
        self.store = store

    async def wait_for_successor(self, holder: Job, *, idle_s: float, poll_s: float = 0.1,
                                 stop: asyncio.Event | None = None) -> Job | None:
        """A compatible queued job, waiting up to `idle_s` for one, but only while one may come: a
        job is queued or a quote awaits its user's confirmation (else the machine would idle for naught)."""
        deadline = time.monotonic() + idle_s
        while True:
            job = await self._take(lambda q: compatible(self.settings, holder, q))
            if job is not None or time.monotonic() >= deadline:
                return job
            if stop is not None and stop.is_set():  # a cancel: the machine goes now
                return None
            if not await self.store.find(states=[S.QUEUED, S.AWAITING_CONFIRMATION], limit=1):
                return None
            await asyncio.sleep(poll_s)

    def start(self, job: Job) -> None:
        self._launch(job)

    def put_back(self, job_id: str) -> None:
        """A taken job that was neither handed the machine nor started: back to the queue's head."""
        self._put_back(job_id)


# runs on the box with its Python: kill what still runs from the old job's folder (argv naming it, but
# not this script or its callers), remove the folder, then verify neither is left
_WIPE = r"""
import os, shutil, sys, time
d = sys.argv[1]
me = os.getpid()
mine = set()
pid = me
while pid > 1:
    mine.add(pid)
    try:
        pid = int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        break
def procs():
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        try:
            cmd = open("/proc/%s/cmdline" % name, "rb").read().decode("utf-8", "replace")
            state = open("/proc/%s/stat" % name).read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        args = cmd.split("\0")
        if state != "Z" and (d in args or any(a.startswith(d + "/") for a in args)):
            out.append(int(name))
    return out
for p in procs():
    try:
        os.kill(p, 9)
    except OSError:
        pass
time.sleep(0.2)
shutil.rmtree(d, ignore_errors=True)
left = procs()
if left:
    print("processes of the old job still run: %s" % left)
    sys.exit(4)
if os.path.exists(d):
    print("still there: %s" % d)
    sys.exit(3)
"""


async def wipe(p: Pipeline, job: Job) -> None:
    """Remove the old job's folder and processes from the box, and verify both are gone."""
    root = p._remote_dir(job)
    if posixpath.dirname(root) != posixpath.join(p.s.remote_root, "jobs") or not job.id:
        raise HandoverError(f"refusing to wipe {root!r}")
    res = await p._remote_call(job, "wipe", lambda r: r.box.run([p.s.remote_python, "-c", _WIPE, root],
                                                                check=False, timeout=120))
    if res.exit_status != 0:
        raise HandoverError(f"the old job's data could not be wiped: {(res.stdout + res.stderr).strip()[-300:]}")


async def free_disk_bytes(p: Pipeline, job: Job) -> int:
    res = await p._remote_call(job, "df", lambda r: r.box.run(
        ["sh", "-c", 'mkdir -p -- "$1" && df -Pk -- "$1" | tail -n 1', "sh", p.s.remote_root], check=False))
    try:
        return int(res.stdout.split()[3]) * 1024
    except (IndexError, ValueError):
        return 0


def inet_cost(holder: Job) -> tuple[float, float]:
    """The machine's $/GB in and out, as recorded when it was rented (0 when unknown)."""
    c = holder.measured.get("inet_cost") or {}
    return float(c.get("down") or 0.0), float(c.get("up") or 0.0)


def warm_quote(settings: Settings, holder: Job, successor: Job) -> dict[str, Any]:
    from services.jobs.intake import quote_doc
    from services.quote import quote

    recipe = FluxRecipe.model_validate(successor.recipe)
    down, up = inet_cost(holder)
    q = quote(recipe, dph_total=holder.dph_total or 0.0, inet_down_mbps=float(holder.measured.get("inet_down") or 0),
              dataset_bytes=successor.dataset_bytes, gpu_name=holder.gpu_name or settings.gpu_name,
              settings=settings, warm=True, inet_down_cost_per_gb=down, inet_up_cost_per_gb=up)
    return quote_doc(q)


async def hand_over(p: Pipeline, job: Job, successor: Job) -> Job:
    """Steps 1-5 of the module doc. Raises HandoverError (or SSH/Vast errors) before step 4 only when
    the machine must be destroyed; the caller destroys it and puts `successor` back in the queue."""
    from services.jobs import phases
    from services.jobs.pipeline import label_for

    store = p.d.store
    label = label_for(p.s, successor, successor.attempt, store.install_id)
    job = await store.update(job.id, measured=dict(job.measured, handover={"to": successor.id, "label": label,
                                                                            "step": "wipe"}))
    if job.instance_id is None:
        raise HandoverError("the machine's instance id is gone")
    inst = await p.d.vast.show_instance(job.instance_id)
    if inst is None or inst.status.failed:  # a machine the API gave up on is nobody's next machine
        raise HandoverError(f"instance {job.instance_id} is {'gone' if inst is None else inst.status}")
    need = successor.dataset_bytes * 3 + DISK_MARGIN_BYTES
    free = await free_disk_bytes(p, job)
    if free < need:
        raise HandoverError(f"{free / 1e9:.1f} GB free on the machine, the next job needs {need / 1e9:.1f} GB")
    await wipe(p, job)
    job = await store.update(job.id, measured=dict(job.measured, handover={"to": successor.id, "label": label,
                                                                            "step": "relabel"}))
    if job.instance_id is None:
        raise HandoverError("the machine's instance id is gone")
    await p.d.vast.set_label(job.instance_id, label)
    now = time.time()
    machine = machine_of(job)
    # its own bytes at this machine's $/GB: its dataset in, its results out (the model is already there)
    quote = warm_quote(p.s, job, successor)
    measured = phases.mark({"warm": True, "warm_from": job.id, "inet_down": job.measured.get("inet_down"),
                            "inet_cost": job.measured.get("inet_cost"),
                            "machine": {"started_at": machine["started_at"], "jobs": machine["jobs"] + 1}},
                           "ssh", now)
    successor = await store.transition(
        successor.id, S.UPLOADING, f"warm machine {job.instance_id} handed over by job {job.id}",
        label=label, instance_id=job.instance_id, offer_id=job.offer_id, machine_id=job.machine_id,
        gpu_name=job.gpu_name, dph_total=job.dph_total, ssh_host=job.ssh_host, ssh_port=job.ssh_port,
        ssh_kind=job.ssh_kind, host_key=job.host_key, rented_at=now, instance_gone_at=None,
        started_at=successor.started_at or now, quote=quote, measured=measured,
        bandwidth_usd=float(quote["bandwidth_usd"]))
    return await close(p, job, now)


async def close(p: Pipeline, job: Job, at: float) -> Job:
    """A's side of a finished handover: the machine is no longer A's from `at` on."""
    handover = dict(job.measured.get("handover") or {}, step="done")
    billed = job.rental_seconds(at)
    return await p.d.store.update(job.id, instance_gone_at=at, cost_usd=job.cost_so_far(at), billed_s=billed,
                                  rented_at=None, bandwidth_usd=0.0,  # now inside cost_usd: never billed twice
                                  measured=dict(job.measured, handover=handover, handed_over_to=handover.get("to")))


async def release(p: Pipeline, job: Job, *, idle_s: float | None = None) -> tuple[Job, str | None]:
    """Hand the machine to a queued job when one comes within the idle limit, else destroy it.
    Returns the job (instance released either way) and the successor's id, if any."""
    pool = p.d.warm
    if pool is None or not may_hand_over(p.s, job):
        return await p._destroy(job), None
    wait = p.s.warm_idle_s if idle_s is None else idle_s
    job = await p.d.store.update(job.id, measured=dict(job.measured, handover={"step": "waiting"}))
    try:
        successor = await pool.wait_for_successor(job, idle_s=wait, stop=p.cancel_event)
    except Exception:  # the job's LoRA is stored: a fault here costs the handover, never the job
        log.exception("job %s: looking for a queued job failed; destroying the machine", job.id)
        successor = None
    if successor is None:
        return await p._destroy(job), None
    started = False
    try:
        try:
            job = await hand_over(p, job, successor)
        except Exception as exc:  # every failure in a handover destroys the machine
            log.warning("job %s: handover to %s failed (%s); destroying the machine", job.id, successor.id, exc)
            job = await p.d.store.require(job.id)
            job, warn = await p._safe_destroy(job)  # never raises: alerts the operator; the sweep retries
            # a machine that may still live (destroy failed) may carry the next job's label already: the
            # next job rents under a new label, or rent() would adopt that machine and its old user's data
            await requeue(p, successor.id, job.instance_id, new_label=bool(warn))
            pool.start(await p.d.store.require(successor.id))
            started = True
            return job, None
        pool.start(await p.d.store.require(successor.id))
        started = True
        return job, successor.id
    finally:
        if not started:  # cancelled, or the store failed mid-way: the successor must not be lost
            pool.put_back(successor.id)


async def requeue(p: Pipeline, job_id: str, instance_id: int | None, *, new_label: bool = False) -> None:
    """Put a job that was to get `instance_id` back in the queue with no machine (it rents a fresh one;
    with `new_label`, under a label the failed machine cannot carry)."""
    job = await p.d.store.require(job_id)
    if job.state.terminal:
        return
    if new_label:
        job = await p.d.store.update(job_id, attempt=job.attempt + 1)
    if job.state == S.QUEUED or job.instance_id != instance_id:
        return
    clear: dict[str, Any] = dict(instance_id=None, offer_id=None, machine_id=None, ssh_host=None, ssh_port=None,
                                 host_key=None, rented_at=None, instance_gone_at=None, label=None,
                                 measured={k: v for k, v in job.measured.items() if k not in ("warm", "warm_from")})
    if job.state != S.RENTING:
        job = await p.d.store.transition(job_id, S.RENTING, "the warm handover failed")
    await p.d.store.transition(job_id, S.QUEUED, "the warm handover failed: a fresh machine instead", **clear)


async def recover(p: Pipeline, job: Job) -> Job:
    """A restart found `job` mid-handover: roll forward when the successor took the machine, else
    destroy the machine (the successor is still queued, or is put back)."""
    h = job.measured.get("handover") or {}
    succ = await p.d.store.get(h["to"]) if h.get("to") else None
    if succ is not None and succ.instance_id == job.instance_id and not succ.state.terminal \
            and succ.state != S.QUEUED:
        if job.instance_id is not None and h.get("label"):
            await p.d.vast.set_label(job.instance_id, h["label"])
        return await close(p, job, succ.rented_at or time.time())
    job = await p._destroy(job)
    if succ is not None:
        await requeue(p, succ.id, job.instance_id)
    return job
