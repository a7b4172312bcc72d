"""Budgets that hold (issue 13, C2/M8/L4): exposure counts what confirmed jobs may still spend, the
check and the queueing are one transaction, the scheduler checks again, "today" is billing time,
per-user caps and an intake rate, quotes above the per-job cap and credit shared by live jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.jobs import Job, JobState, JobStore
from services.jobs.budget import billed_since, day_start, exposure
from services.jobs.errors import JobRefused
from services.jobs.events import Failed
from services.jobs.intake import draft
from services.jobs.pipeline import Deps, Pipeline
from services.jobs.worker import Worker
from services.settings import load_settings
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.world import SimWorld

S = JobState
HOUR = 3600.0


def draft_job(user: str, cost_high: float, **extra: Any) -> Job:
    return Job(user_id=user, state=S.AWAITING_CONFIRMATION, quote={"cost_high": cost_high, "hours_high": 1.0},
               **extra)


async def queue(store: JobStore, job_id: str, *, user_budget: float = 10.0, global_budget: float = 50.0,
                max_queued: int = 100) -> Job:
    return await store.queue_within_budget(job_id, since=day_start(), user_budget=user_budget,
                                           global_budget=global_budget, max_queued_per_user=max_queued)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    async with JobStore(tmp_path / "jobs.sqlite3") as s:
        yield s


async def test_ten_confirmed_jobs_cannot_queue_past_a_10_dollar_budget(store: JobStore) -> None:
    jobs = [await store.create(draft_job("u1", 4.9)) for _ in range(10)]
    passed, refused = [], []
    for job in jobs:
        try:
            passed.append(await queue(store, job.id))
        except JobRefused as exc:
            refused.append(str(exc))
    assert len(passed) == 2 and len(refused) == 8  # 2 x 4.90 <= 10 < 3 x 4.90
    assert all("daily budget reached" in r and "$9.80" in r for r in refused)
    assert await store.exposure(day_start(), "u1") == pytest.approx(9.8)
    states = [(await store.require(j.id)).state for j in jobs]
    assert states.count(S.QUEUED) == 2 and states.count(S.AWAITING_CONFIRMATION) == 8
    # the server's budget counts every user's reservations
    other = await store.create(draft_job("u2", 4.9))
    with pytest.raises(JobRefused, match="server's daily budget"):
        await queue(store, other.id, global_budget=12.0)


async def test_two_simultaneous_confirms_cannot_both_pass(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    # two processes on one file (the bot and `lorabot train`), and two tasks on one connection
    async with JobStore(path) as one, JobStore(path) as two:
        a = await one.create(draft_job("u1", 6.0))
        b = await one.create(draft_job("u1", 6.0))
        c = await one.create(draft_job("u1", 6.0))
        results = await asyncio.gather(queue(one, a.id), queue(two, b.id), queue(one, c.id),
                                       return_exceptions=True)
        assert sum(isinstance(r, Job) for r in results) == 1, results
        assert sum(isinstance(r, JobRefused) for r in results) == 2
        assert await one.exposure(day_start(), "u1") == pytest.approx(6.0)


async def test_running_jobs_count_what_they_may_still_spend(store: JobStore) -> None:
    now = time.time()
    # rented an hour ago at $2/h: $2 spent, the quote says up to $5, so $3 more may come
    await store.create(Job(user_id="u1", state=S.TRAINING, dph_total=2.0, rented_at=now - HOUR,
                           quote={"cost_high": 5.0}))
    assert await store.exposure(now - 2 * HOUR, "u1") == pytest.approx(5.0, abs=0.01)
    job = await store.create(draft_job("u1", 6.5))  # over $10 whether or not midnight was within the hour
    with pytest.raises(JobRefused, match="daily budget"):
        await queue(store, job.id)


def test_today_is_billing_time_not_creation_time() -> None:
    midnight = day_start(time.time())
    # created yesterday at 23:00, rented until 01:00 today at $1/h: $1 of it is today's
    late = Job(user_id="u", state=S.SUCCEEDED, created_at=midnight - HOUR, dph_total=1.0, cost_usd=2.0,
               billed_s=2 * HOUR, instance_gone_at=midnight + HOUR, updated_at=midnight + HOUR)
    assert billed_since(late, midnight, now=midnight + 2 * HOUR) == pytest.approx(1.0)
    # created and billed yesterday: nothing today
    old = Job(user_id="u", state=S.SUCCEEDED, created_at=midnight - 5 * HOUR, dph_total=1.0, cost_usd=1.0,
              billed_s=HOUR, instance_gone_at=midnight - 3 * HOUR, updated_at=midnight - 3 * HOUR)
    assert billed_since(old, midnight, now=midnight + 2 * HOUR) == 0.0
    # still running since yesterday 22:00 at $1/h, now 02:00: $2 billed today
    running = Job(user_id="u", state=S.TRAINING, created_at=midnight - 3 * HOUR, dph_total=1.0,
                  rented_at=midnight - 2 * HOUR, quote={"cost_high": 3.0})
    assert billed_since(running, midnight, now=midnight + 2 * HOUR) == pytest.approx(2.0)
    assert exposure([late, old, running], midnight, now=midnight + 2 * HOUR) == pytest.approx(3.0)


async def test_spent_since_reads_only_jobs_that_can_count(store: JobStore) -> None:
    since = time.time() - 60
    await store.create(Job(user_id="u", state=S.SUCCEEDED, cost_usd=7.0, created_at=since - 2 * 86400,
                           updated_at=since - 2 * 86400))
    await store.create(Job(user_id="u", state=S.SUCCEEDED, cost_usd=1.5, created_at=since - 2 * 86400))
    assert await store.spent_since(since, "u") == pytest.approx(1.5)
    assert [j.cost_usd for j in await store.budget_jobs(since, "u")] == [1.5]  # the old row is not read


async def test_per_user_caps_on_drafts_queue_and_intake_rate(store: JobStore) -> None:
    open1 = await store.create_within_limits(Job(user_id="u"), max_open_drafts=2, max_per_window=10)
    await store.create_within_limits(Job(user_id="u"), max_open_drafts=2, max_per_window=10)
    with pytest.raises(JobRefused, match="2 quote"):
        await store.create_within_limits(Job(user_id="u"), max_open_drafts=2, max_per_window=10)
    await store.create_within_limits(Job(user_id="other"), max_open_drafts=2, max_per_window=10)
    # cancelled drafts (dry runs) free a draft slot but still count in the hourly rate
    await store.transition(open1.id, S.CANCELLED, "dry run")
    with pytest.raises(JobRefused, match="too many training requests"):
        await store.create_within_limits(Job(user_id="u"), max_open_drafts=2, max_per_window=2)
    assert len(await store.find(user_id="u")) == 2

    q = [await store.create(draft_job("q", 0.1)) for _ in range(3)]
    await queue(store, q[0].id, max_queued=2)
    await queue(store, q[1].id, max_queued=2)
    with pytest.raises(JobRefused, match="waiting in the queue"):
        await queue(store, q[2].id, max_queued=2)


async def test_intake_enforces_the_rate_and_refuses_quotes_above_the_job_cap(tmp_path: Path) -> None:
    s = load_settings(db_path=str(tmp_path / "db.sqlite3"), work_dir=str(tmp_path / "work"), dataset_min_images=3,
                      train_rate=2, max_open_drafts_per_user=5, max_job_cost=0.01, _env_file=None)
    async with JobStore(s.db_path) as store:
        d = await draft(store, s, source=dataset_zip(3, 256), user_id="u", name="cat", trigger="sks",
                        overrides={"steps": 100})
        assert not d.ok and "above the $0.01 limit per job" in d.message
        assert d.quote is not None and d.quote.cost_high_usd > 0.01
        assert (await store.require(d.job.id)).state is S.FAILED
        await draft(store, s, source=b"not a zip", user_id="u", name="cat", trigger="sks")
        with pytest.raises(JobRefused, match="too many training requests"):
            await draft(store, s, source=dataset_zip(3, 256), user_id="u", name="cat", trigger="sks")


async def test_the_scheduler_checks_again_before_renting(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings(user_daily_budget=10.0, global_daily_budget=10.0)
    async with JobStore(settings.db_path) as store:
        job = await store.create(draft_job("u1", 4.0))
        await queue(store, job.id)
        # then money is spent elsewhere (another process, a job running over its estimate)
        await store.create(Job(user_id="u2", state=S.SUCCEEDED, cost_usd=7.0))
        worker = Worker(store, settings, recorder, reaper=False)
        await worker.start()  # recovery re-queues the job; the scheduler refuses to rent it
        try:
            done = await worker.wait(job.id, timeout=30)
        finally:
            await worker.stop()
    assert done.state is S.FAILED and done.failure_kind == "budget"
    assert "server's daily budget" in done.reason
    assert [e for _, e in recorder.events if isinstance(e, Failed)]
    assert not [r for r in world.vast.requests if r["method"] == "PUT" and "/asks/" in r["path"]]


async def test_credit_check_counts_what_other_live_jobs_may_spend(world: SimWorld, recorder: Recorder) -> None:
    settings = world.settings()
    world.vast.credit = 20.0
    async with JobStore(settings.db_path) as store, VastClient.from_settings(settings) as vast:
        # another job is training and may still spend $19.90 of the $20 credit
        await store.create(Job(user_id="u2", state=S.TRAINING, dph_total=1.0, rented_at=time.time(),
                               quote={"cost_high": 19.9}))
        job = await store.create(Job(user_id="u1", state=S.QUEUED, quote={"cost_high": 1.0, "hours_high": 1.0}))
        deps = Deps(settings, store, vast, None, recorder, asyncio.Semaphore(1))
        done = await Pipeline(deps, job.id).run()
    assert done.state is S.FAILED and done.failure_kind == "account"
    assert "other running jobs may still spend" in done.reason
    assert not [r for r in world.vast.requests if r["method"] == "PUT" and "/asks/" in r["path"]]
