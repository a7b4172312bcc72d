"""Job commands: jobs, reconcile (train/launch: train.py; ssh: shell.py; status/cancel/logs: watch.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from bot.cli.common import EXIT_INFRA, console, fail, print_json, run, settings
from services.jobs import Job, JobStore
from services.settings import Settings

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "user": job.user_name or job.user_id,
        "name": job.name,
        "step": job.step,
        "total_steps": job.total_steps,
        "loss": job.loss,
        "eta_s": job.eta_s,
        "instance_id": job.instance_id if job.instance_gone_at is None else None,
        "label": job.label,
        "dph_total": job.dph_total,
        "cost_usd": job.cost_so_far(),
        "lora_url": job.lora_url,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


def with_store(s: Settings, fn: Callable[[JobStore], Awaitable[T]]) -> T:
    async def go() -> T:
        async with JobStore(s.db_path) as store:
            return await fn(store)

    return run(go())


def jobs(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Jobs in the store, newest first."""
    s = settings()
    found = with_store(s, lambda st: st.find(limit=limit))
    rows = [job_summary(j) for j in found]
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} jobs")
    for col in ("job", "state", "user", "name", "progress", "cost", "instance"):
        table.add_column(col)
    for r in rows:
        prog = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else "-"
        table.add_row(r["job_id"], r["state"], str(r["user"]), r["name"], prog, f"${r['cost_usd']:.2f}",
                      str(r["instance_id"] or "-"))
    console.print(table)


def reconcile(
    destroy: Annotated[bool, typer.Option("--destroy", help="Destroy the orphans (else only list them).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """This installation's instances that no live job owns (orphans that bill); another deployment's
    and hand-rented boxes are left alone. --destroy also destroys, by id, the instance of every
    finished job whose destroy was never confirmed."""
    from services.jobs.worker import find_orphans, sweep_store
    from services.vastai import VastClient, VastError

    s = settings("vastai_api_key", why="to list instances")

    async def go() -> list[dict[str, Any]]:
        async with JobStore(s.db_path) as store, VastClient.from_settings(s) as vast:
            orphans = await find_orphans(store, s, vast)
            out = []
            for inst in orphans:
                if destroy:
                    await vast.destroy_instance(inst.id)
                out.append({**inst.public(), "destroyed": destroy})
            if destroy:
                for iid in await sweep_store(store, vast):
                    out.append({"id": iid, "label": None, "dph_total": 0.0, "destroyed": True})
            return out

    try:
        rows = run(go())
    except VastError as exc:
        fail(str(exc), EXIT_INFRA)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no orphan instances")
    for r in rows:
        verb = "destroyed" if destroy else "orphan (run with --destroy)"
        console.print(f"instance {r['id']} label {r['label']} ${r['dph_total']:.3f}/h: {verb}")


def register(app: typer.Typer) -> None:
    app.command("jobs")(jobs)
    app.command("reconcile")(reconcile)
