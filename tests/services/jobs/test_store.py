from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from services.jobs import IllegalTransition, Job, JobState, JobStore
from services.jobs.store import SCHEMA_VERSION


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with JobStore(tmp_path / "jobs.sqlite3") as s:
        yield s


async def test_wal_schema_version_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db" / "jobs.sqlite3"
    async with JobStore(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        job = await s.create(Job(user_id="u1", name="cat"))
    async with JobStore(path) as s:  # migrations are not re-run
        assert (await s.require(job.id)).name == "cat"
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in con.execute("PRAGMA table_info(jobs)")}
    assert {"instance_id", "offer_id", "dph_total", "label", "ssh_host", "ssh_port", "host_key"} <= cols


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer"):
        await JobStore(path).open()


async def test_transitions_are_recorded_with_reason_and_time(store: JobStore) -> None:
    job = await store.create(Job(user_id="u1"))
    for dst in (JobState.AWAITING_CONFIRMATION, JobState.QUEUED, JobState.RENTING):
        job = await store.transition(job.id, dst, f"to {dst}")
    job = await store.transition(job.id, JobState.WAITING_READY, "rented", instance_id=77, label="lorabot-x",
                                 dph_total=0.4, offer_id=5)
    reloaded = await store.require(job.id)
    assert (reloaded.state, reloaded.instance_id, reloaded.label, reloaded.dph_total) == (
        JobState.WAITING_READY, 77, "lorabot-x", 0.4)
    events = await store.events(job.id)
    assert [e.dst for e in events] == ["validating", "awaiting_confirmation", "queued", "renting", "waiting_ready"]
    assert events[-1].reason == "rented" and events[-1].src == "renting"
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))
    assert (await store.by_label("lorabot-x")).id == job.id  # type: ignore[union-attr]


async def test_illegal_transitions_are_refused_and_nothing_changes(store: JobStore) -> None:
    job = await store.create(Job())
    with pytest.raises(IllegalTransition):
        await store.transition(job.id, JobState.TRAINING)
    done = await store.transition(job.id, JobState.FAILED, "bad dataset")
    assert done.finished_at is not None and done.reason == "bad dataset"
    with pytest.raises(IllegalTransition):
        await store.transition(job.id, JobState.QUEUED)
    assert (await store.require(job.id)).state == JobState.FAILED
    assert len(await store.events(job.id)) == 2


async def test_update_validates_and_cannot_change_state(store: JobStore) -> None:
    job = await store.create(Job())
    with pytest.raises(ValueError):
        await store.update(job.id, state=JobState.SUCCEEDED)
    with pytest.raises(ValueError):
        await store.update(job.id, step="many")
    assert (await store.update(job.id, step=5, total_steps=10)).progress == 0.5


async def test_live_lease_and_spend(store: JobStore) -> None:
    a = await store.create(Job(user_id="u1", dph_total=3.6, rented_at=1000.0, instance_gone_at=1100.0))
    b = await store.create(Job(user_id="u2"))
    await store.transition(b.id, JobState.CANCELLED, "user")
    assert [j.id for j in await store.live()] == [a.id]
    assert await store.spent_since(0, "u1") == pytest.approx(0.1)
    assert await store.claim(a.id, "proc-1")
    assert not await store.claim(a.id, "proc-2")
    assert await store.claim(a.id, "proc-1")
    await store.release(a.id, "proc-1")
    assert await store.claim(a.id, "proc-2")


async def test_two_processes_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with JobStore(path) as one, JobStore(path) as two:
        job = await one.create(Job(user_id="u"))
        await two.request_cancel(job.id)
        assert (await one.require(job.id)).cancel_requested


async def test_a_write_cancelled_mid_statement_never_wedges_the_store(store: JobStore) -> None:
    """A detach or shutdown cancels tasks wherever they are: aiosqlite's thread still runs a BEGIN whose
    await was cancelled, and the next transaction must not find the connection stuck inside it."""
    import asyncio
    import contextlib

    job = await store.create(Job(user_id="u1", name="cat"))
    for yields in range(12):  # cancel at every point of the update's awaits in turn
        task = asyncio.create_task(store.update(job.id, step=yields))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.update(job.id, loss=float(yields))  # "cannot start a transaction within a transaction"?
        assert (await store.require(job.id)).loss == float(yields)


async def test_a_file_that_is_not_a_store_is_refused_and_leaves_no_thread(tmp_path: Path) -> None:
    """aiosqlite runs each connection on a non-daemon thread: one left open keeps the process from exiting."""
    import threading

    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(sqlite3.DatabaseError):
        await JobStore(junk).open()
    left = [t for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and "_connection_worker_thread" in t.name]
    for t in left:
        t.join(timeout=2)
    assert [t.name for t in left if t.is_alive()] == []
