"""The job store: SQLite through aiosqlite, WAL mode, a schema version with migrations.

Every transition is checked against the state machine and written, with a timestamp and a reason,
in the same transaction as the fields it changes, before the side effect it guards. Several
processes (the bot and `lorabot` commands) may open the same file: WAL lets readers run beside
one writer, and ownership of a running job is a lease (owner + owner_seen_at) so that exactly one
worker drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from services.jobs import budget
from services.jobs.cleanup import drop_dataset_of
from services.jobs.errors import JobRefused
from services.jobs.model import TERMINAL, Job, JobEventRow, JobState, check_transition

# Each migration moves the schema one version up; never edit a released one, add a new one.
MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        doc TEXT NOT NULL,
        user_id TEXT NOT NULL DEFAULT '',
        label TEXT,
        instance_id INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        at REAL NOT NULL,
        src TEXT,
        dst TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX job_events_job ON job_events(job_id, seq);
    CREATE INDEX jobs_state ON jobs(state);
    """,
    # v2: first-class columns for what a restarted process must find without parsing documents
    """
    ALTER TABLE jobs ADD COLUMN offer_id INTEGER;
    ALTER TABLE jobs ADD COLUMN dph_total REAL;
    ALTER TABLE jobs ADD COLUMN ssh_host TEXT;
    ALTER TABLE jobs ADD COLUMN ssh_port INTEGER;
    ALTER TABLE jobs ADD COLUMN host_key TEXT;
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN owner_seen_at REAL;
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_user ON jobs(user_id, created_at);
    CREATE UNIQUE INDEX jobs_label ON jobs(label) WHERE label IS NOT NULL;
    """,
    # v3 (issue 13, H5): this installation's id (in every label it rents under), and the reaper's
    # first sightings of instances labelled for this installation but unknown to this store
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE reaper_sightings (instance_id INTEGER PRIMARY KEY, label TEXT NOT NULL, first_seen REAL NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# columns mirrored out of the JSON document (the document stays the source of truth)
_MIRRORED = ["state", "user_id", "label", "instance_id", "created_at", "updated_at", "offer_id", "dph_total",
             "ssh_host", "ssh_port", "host_key", "owner", "owner_seen_at", "cancel_requested"]


S_QUEUED = JobState.QUEUED.value
log = logging.getLogger(__name__)


class JobNotFound(KeyError):
    pass


def _touch_private(path: Path) -> None:
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _owner_only(path: Path) -> None:
    """The store holds presigned links, host keys and user ids: 0600, in a 0700 folder (review L5)."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, 0o600)


class JobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # one connection is shared by the process's tasks: transactions must not interleave
        self._tx_lock = asyncio.Lock()
        self._tx_unsure = False  # a cancel may have left a transaction open on the connection
        self._install_id: str | None = None

    async def open(self) -> JobStore:
        if str(self.path) != ":memory:":
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # created 0600 from the start: SQLite creates the file (and -wal, -shm) with the umask
            await asyncio.to_thread(_touch_private, self.path)
        self._db = await aiosqlite.connect(self.path, timeout=30, isolation_level=None)
        self._db.row_factory = aiosqlite.Row
        try:  # any failure closes the connection: its thread would otherwise keep the process alive
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._db.execute("PRAGMA busy_timeout=30000")
            await self._migrate()
            self._install_id = await self._load_install_id()
        except BaseException:
            await self.close()
            raise
        if str(self.path) != ":memory:":
            await asyncio.to_thread(_owner_only, self.path)
        return self

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> JobStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the job store is not open")
        return self._db

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._tx_lock:
            if self._tx_unsure:
                # a task cancelled mid-statement: aiosqlite's thread still ran its BEGIN (or COMMIT,
                # ROLLBACK) after the cancel. The thread runs statements in order, so once this one
                # returns those are done; a transaction left open is that task's, never committed
                await self.db.execute("SELECT 1")
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                self._tx_unsure = False
            await self._tx_statement("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._tx_statement("ROLLBACK")
                raise
            await self._tx_statement("COMMIT")

    async def _tx_statement(self, sql: str) -> None:
        try:
            await self.db.execute(sql)
        except asyncio.CancelledError:
            self._tx_unsure = True  # the statement may run on: the next transaction looks first
            raise

    async def schema_version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _migrate(self) -> None:
        async with self._transaction():
            version = await self.schema_version()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema v{version}, newer than this lorabot (v{SCHEMA_VERSION}): upgrade lorabot"
                )
            for n in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[n].split(";"):
                    if statement.strip():
                        await self.db.execute(statement)
                await self.db.execute(f"PRAGMA user_version = {n + 1}")

    async def _load_install_id(self) -> str:
        """Made once, on the first open of this store; labels carry it (`lorabot-<install>-<job>`)."""
        async with self._transaction():
            await self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('install_id', ?)",
                                  (secrets.token_hex(3),))
            async with self.db.execute("SELECT value FROM meta WHERE key = 'install_id'") as cur:
                row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    @property
    def install_id(self) -> str:
        if self._install_id is None:
            raise RuntimeError("the job store is not open")
        return self._install_id

    async def sighting(self, instance_id: int, label: str, now: float) -> tuple[float, bool]:
        """When the reaper first saw this unknown instance, and whether that is now (first sighting)."""
        async with self._transaction():
            async with self.db.execute(
                "SELECT first_seen FROM reaper_sightings WHERE instance_id = ? AND label = ?", (instance_id, label)
            ) as cur:
                row = await cur.fetchone()
            if row is not None:
                return float(row[0]), False
            await self.db.execute("INSERT OR REPLACE INTO reaper_sightings (instance_id, label, first_seen) "
                                  "VALUES (?, ?, ?)", (instance_id, label, now))
        return now, True

    async def forget_sightings(self, keep: Iterable[int]) -> None:
        """Drop sightings of instances no longer listed (or now known)."""
        kept = list(keep)
        async with self._transaction():
            marks = ", ".join("?" for _ in kept)
            where = f" WHERE instance_id NOT IN ({marks})" if kept else ""
            await self.db.execute(f"DELETE FROM reaper_sightings{where}", kept)  # noqa: S608

    async def unconfirmed_gone(self) -> list[Job]:
        """Terminal jobs whose instance was never confirmed destroyed (the reaper's store sweep)."""
        wanted = [s.value for s in TERMINAL]
        sql = (f"SELECT id, doc FROM jobs WHERE instance_id IS NOT NULL "  # noqa: S608
               f"AND state IN ({', '.join('?' for _ in wanted)})")
        out = []
        for job in await self._rows(sql, wanted):
            if job.instance_gone_at is None:
                out.append(job)
        return out

    async def _rows(self, sql: str, args: list[Any]) -> list[Job]:
        """Jobs of a query; a row that no longer decodes is logged and skipped (review L3)."""
        async with self.db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        jobs = []
        for r in rows:
            try:
                jobs.append(self._row_to_job(r))
            except ValueError as exc:
                log.error("job store: skipping row %s, it does not decode: %s", r["id"], exc)
        return jobs

    # --- rows <-> jobs ------------------------------------------------------------------------
    @staticmethod
    def _row_to_job(row: aiosqlite.Row) -> Job:
        return Job.model_validate_json(row["doc"])

    def _mirror(self, job: Job) -> dict[str, Any]:
        values = {name: getattr(job, name) for name in _MIRRORED}
        values["state"] = job.state.value
        values["cancel_requested"] = int(job.cancel_requested)
        values["doc"] = job.model_dump_json()
        return values

    async def _write(self, job: Job, *, insert: bool = False) -> None:
        values = self._mirror(job)
        if insert:
            cols = ", ".join(["id", *values])
            marks = ", ".join("?" for _ in range(len(values) + 1))
            await self.db.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", [job.id, *values.values()])  # noqa: S608
        else:
            sets = ", ".join(f"{k} = ?" for k in values)
            await self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*values.values(), job.id])  # noqa: S608

    async def _load(self, job_id: str) -> Job:
        async with self.db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._row_to_job(row)

    # --- API ----------------------------------------------------------------------------------
    async def create(self, job: Job, reason: str = "created") -> Job:
        async with self._transaction():
            await self._write(job, insert=True)
            await self.db.execute(
                "INSERT INTO job_events (job_id, at, src, dst, reason) VALUES (?, ?, NULL, ?, ?)",
                (job.id, job.created_at, job.state.value, reason),
            )
        return job

    async def get(self, job_id: str) -> Job | None:
        try:
            return await self._load(job_id)
        except JobNotFound:
            return None

    async def require(self, job_id: str) -> Job:
        return await self._load(job_id)

    async def transition(self, job_id: str, dst: JobState, reason: str = "", **fields: Any) -> Job:
        """Move a job to `dst`, checked, with its reason and fields, in one transaction."""
        async with self._transaction():
            updated = await self._transition_in_tx(await self._load(job_id), dst, reason, fields)
        if dst.terminal:  # every way a job ends passes here: its photos go (review H1)
            await drop_dataset_of(updated.dataset_dir)
        return updated

    async def _transition_in_tx(self, job: Job, dst: JobState, reason: str, fields: dict[str, Any]) -> Job:
        now = time.time()
        check_transition(job.id, job.state, dst)
        src = job.state
        updated = job.model_copy(update={**fields, "state": dst, "updated_at": now})
        if dst.terminal:
            updated.finished_at = updated.finished_at or now
            updated.reason = reason or updated.reason
        elif reason:
            updated.reason = reason
        updated = Job.model_validate(updated.model_dump())  # validate field updates
        await self._write(updated)
        await self.db.execute(
            "INSERT INTO job_events (job_id, at, src, dst, reason) VALUES (?, ?, ?, ?, ?)",
            (job.id, now, src.value, dst.value, reason),
        )
        return updated

    async def update(self, job_id: str, **fields: Any) -> Job:
        """Change fields without a state change (progress, endpoint, ...)."""
        if "state" in fields:
            raise ValueError("use transition() to change the state")
        async with self._transaction():
            job = await self._load(job_id)
            updated = Job.model_validate({**job.model_dump(), **fields, "updated_at": time.time()})
            await self._write(updated)
        return updated

    async def events(self, job_id: str) -> list[JobEventRow]:
        async with self.db.execute(
            "SELECT job_id, at, src, dst, reason FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,)
        ) as cur:
            rows = await cur.fetchall()
        return [JobEventRow(job_id=r[0], at=r[1], src=r[2], dst=r[3], reason=r[4]) for r in rows]

    async def find(
        self, *, user_id: str | None = None, states: Iterable[JobState] | None = None, limit: int = 100
    ) -> list[Job]:
        sql = "SELECT id, doc FROM jobs WHERE 1=1"
        args: list[Any] = []
        if user_id is not None:
            sql += " AND user_id = ?"
            args.append(user_id)
        if states is not None:
            wanted = [s.value for s in states]
            sql += f" AND state IN ({', '.join('?' for _ in wanted)})"
            args.extend(wanted)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return await self._rows(sql, args)

    async def live(self) -> list[Job]:
        """Jobs not in a terminal state."""
        return await self.find(states=[s for s in JobState if s not in TERMINAL], limit=10_000)

    async def by_label(self, label: str) -> Job | None:
        async with self.db.execute("SELECT doc FROM jobs WHERE label = ?", (label,)) as cur:
            row = await cur.fetchone()
        return self._row_to_job(row) if row else None

    async def budget_jobs(self, since: float, user_id: str | None = None) -> list[Job]:
        """The jobs that may count in a budget since `since`: confirmed and unfinished, or changed
        since then (a job billed after `since` was written at or after its last billed second)."""
        committed = [s.value for s in budget.COMMITTED]
        sql = f"SELECT doc FROM jobs WHERE (state IN ({', '.join('?' for _ in committed)}) OR updated_at >= ?)"  # noqa: S608
        args: list[Any] = [*committed, since]
        if user_id is not None:
            sql += " AND user_id = ?"
            args.append(user_id)
        async with self.db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [self._row_to_job(r) for r in rows]

    async def spent_since(self, since: float, user_id: str | None = None) -> float:
        """Money billed since `since` (by billing time, not by when the job was created)."""
        now = time.time()
        return round(sum(budget.billed_since(j, since, now) for j in await self.budget_jobs(since, user_id)), 4)

    async def exposure(self, since: float, user_id: str | None = None) -> float:
        """Money billed since `since` plus what every confirmed, unfinished job may still spend."""
        return budget.exposure(await self.budget_jobs(since, user_id), since)

    async def queue_within_budget(self, job_id: str, *, since: float, user_budget: float, global_budget: float,
                                  max_queued_per_user: int, reason: str = "confirmed") -> Job:
        """Check the budgets and the user's queue cap and move the draft to QUEUED, in one
        BEGIN IMMEDIATE transaction: two confirms at once (from any process) cannot both pass."""
        async with self._transaction():
            job = await self._load(job_id)
            if job.state not in budget.OPEN_DRAFTS:
                raise JobRefused(f"job {job.id} is {job.state.value}, not waiting to be confirmed")
            queued = await self._count("state = ? AND user_id = ? AND id != ?", S_QUEUED, job.user_id, job.id)
            if queued >= max_queued_per_user:
                raise JobRefused(f"you already have {queued} job(s) waiting in the queue (the limit is "
                                 f"{max_queued_per_user}); wait for one to start or cancel one")
            why = budget.refusal(job, await self.budget_jobs(since), since=since, user_budget=user_budget,
                                 global_budget=global_budget)
            if why is not None:
                raise JobRefused(why)
            return await self._transition_in_tx(job, JobState.QUEUED, reason, {})

    async def create_within_limits(self, job: Job, *, max_open_drafts: int, max_per_window: int,
                                   window_s: float = 3600.0) -> Job:
        """Create a draft unless its user already has `max_open_drafts` open or started
        `max_per_window` intakes within `window_s` (dry runs and refused ones included)."""
        drafts = [s.value for s in budget.OPEN_DRAFTS]
        async with self._transaction():
            open_now = await self._count(f"user_id = ? AND state IN ({', '.join('?' for _ in drafts)})",
                                         job.user_id, *drafts)
            if open_now >= max_open_drafts:
                raise JobRefused(f"you already have {open_now} quote(s) open (the limit is {max_open_drafts}); "
                                 "confirm or cancel one first")
            recent = await self._count("user_id = ? AND created_at >= ?", job.user_id, job.created_at - window_s)
            if recent >= max_per_window:
                raise JobRefused(f"too many training requests: {recent} in the last {window_s / 60:.0f} minutes "
                                 f"(the limit is {max_per_window}); try again later")
            await self._write(job, insert=True)
            await self.db.execute(
                "INSERT INTO job_events (job_id, at, src, dst, reason) VALUES (?, ?, NULL, ?, ?)",
                (job.id, job.created_at, job.state.value, "created"),
            )
        return job

    async def _count(self, where: str, *args: Any) -> int:
        async with self.db.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args) as cur:  # noqa: S608
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def claim(self, job_id: str, owner: str, lease_s: float = 60.0) -> bool:
        """Take (or renew) the lease on a job; False when another live process holds it."""
        now = time.time()
        async with self._transaction():
            job = await self._load(job_id)
            held = job.owner and job.owner != owner and (job.owner_seen_at or 0) > now - lease_s
            if held:
                return False
            job.owner, job.owner_seen_at = owner, now
            await self._write(job)
            return True

    async def release(self, job_id: str, owner: str) -> None:
        job = await self.get(job_id)
        if job is not None and job.owner == owner:
            await self.update(job_id, owner=None, owner_seen_at=None)

    async def request_cancel(self, job_id: str) -> Job:
        return await self.update(job_id, cancel_requested=True)
