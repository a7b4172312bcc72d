"""Time to first training step and billed overhead (issue 18), for a queue of jobs on the simulator.

The simulator models a real job's start-up costs on a compressed clock (--time-factor, default 0.05:
20 real seconds take one): the image pull (12 GB) and the base model's diffusers subfolders (33.7 GB)
take their size / the rented offer's inet_down, load + quantize 240 s on a machine's first load, of
which --cold-read (default 160 s: 34 GB from a network disk) is reading the weights from disk; a
later job on the same machine finds them in the page cache (hosts have >= 48 GB of RAM,
LORABOT_MIN_CPU_RAM_GB) and pays only the rest. Fixed costs (SSH round trips, Python start-up) are
not compressed, so a larger time factor is the fairer test. A queue of N jobs (default 5,
one at a time) runs twice, warm reuse off and on, and prints per job the time to the first training
step (from the job's start: renting, or the handover of a warm machine; and from SSH-ready) and the
billed seconds outside training, then the totals and the goals:

  - prefetch: the first job's SSH-ready -> first step <= (max(dataset upload, model download) + load) x 1.1
  - reuse: every queued job after the first reaches its first step in <= 25 % of the first job's time
    and pays <= 40 % of its non-training seconds

    python benchmarks/first_step.py [--jobs 5] [--steps 20] [--time-factor 0.05] [--cold-read 160]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.jobs import JobStore, phases
from services.jobs.events import NullNotifier
from services.jobs.intake import draft
from services.jobs.model import Job
from services.jobs.worker import Worker
from services.vastai import VastClient
from tests.services.jobs.conftest import dataset_zip
from tests.sim.world import run_world


async def run_queue(root: Path, *, jobs: int, steps: int, time_factor: float, cold_read: float,
                    reuse: bool) -> list[Job]:
    with run_world(root) as world:
        world.model_costs(time_factor=time_factor, image_gb=12.0, load_s=(240 - cold_read) * time_factor,
                          cold_read_s=cold_read * time_factor)
        settings = world.settings(max_concurrent_jobs=1, warm_reuse=reuse, warm_idle_s=30.0,
                                  stall_timeout_s=120.0, ready_timeout_s=120.0)
        async with JobStore(settings.db_path) as store:
            worker = Worker(store, settings, NullNotifier(), reaper=False, adopt=False)
            await worker.start(recover=False)
            try:
                ids = []
                async with VastClient.from_settings(settings) as vast:
                    for i in range(jobs):
                        d = await draft(store, settings, source=dataset_zip(n=8), user_id=f"user{i}",
                                        name=f"job {i}", trigger="sks", vast=vast,
                                        overrides={"steps": steps, "save_every": steps, "sample_every": steps})
                        assert d.ok, d.message
                        ids.append(d.job.id)
                for job_id in ids:
                    await worker.submit(job_id)
                done = [await worker.wait(job_id, timeout=600) for job_id in ids]
            finally:
                await worker.stop()
        left = world.vast.live_instances()
        assert not left, f"instances left behind: {left}"
    return done


def figures(job: Job) -> dict[str, Any]:
    m = job.measured
    marks = m.get("marks") or {}
    p = m.get("phases") or {}
    first = marks.get("first_step")
    return {
        "id": job.id,
        "state": job.state.value,
        "warm": bool(m.get("warm")),
        "ttfs": first - (job.started_at or job.created_at) if first else None,
        "ttfs_ssh": first - marks["ssh"] if first and "ssh" in marks else None,
        "outside": phases.billed(job)["billed_outside_training_s"],
        "billed": phases.billed(job)["billed_s"],
        "upload": p.get("dataset_upload", 0.0),
        "download": p.get("model_download", 0.0),
        "load": p.get("model_load", 0.0),
        "boot": p.get("create_to_running", 0.0) + p.get("running_to_ssh", 0.0),
    }


def report(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'job':<10} {'warm':>4} {'first step':>10} {'from ssh':>9} {'boot':>6} {'upload':>7} {'download':>8} "
          f"{'load':>6} {'billed':>7} {'non-train':>9}")
    for r in rows:
        print(f"{r['id']:<10} {'yes' if r['warm'] else 'no':>4} {r['ttfs']:>9.2f}s {r['ttfs_ssh']:>8.2f}s "
              f"{r['boot']:>5.2f}s {r['upload']:>6.2f}s {r['download']:>7.2f}s {r['load']:>5.2f}s "
              f"{r['billed']:>6.2f}s {r['outside']:>8.2f}s")
    print(f"{'total':<10} {'':>4} {sum(r['ttfs'] for r in rows):>9.2f}s {'':>9} {'':>6} {'':>7} {'':>8} {'':>6} "
          f"{sum(r['billed'] for r in rows):>6.2f}s {sum(r['outside'] for r in rows):>8.2f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--time-factor", type=float, default=0.05)
    ap.add_argument("--cold-read", type=float, default=160.0,
                    help="seconds of the 240 s load that a machine's page cache saves the next job")
    args = ap.parse_args()
    results: dict[bool, list[dict[str, Any]]] = {}
    for reuse in (False, True):
        with tempfile.TemporaryDirectory(prefix="lorabot-first-step-") as tmp:
            jobs = asyncio.run(run_queue(Path(tmp), jobs=args.jobs, steps=args.steps,
                                         time_factor=args.time_factor, cold_read=args.cold_read, reuse=reuse))
        assert all(j.state.value == "succeeded" for j in jobs), [(j.id, j.reason) for j in jobs]
        results[reuse] = [figures(j) for j in jobs]
        report(f"warm reuse {'on' if reuse else 'off'} ({args.jobs} jobs, {args.steps} steps, "
               f"clock x{args.time_factor}, cold read {args.cold_read:.0f} s)", results[reuse])

    ok = True
    first = results[False][0]
    bound = (max(first["upload"], first["download"]) + first["load"]) * 1.1
    good = first["ttfs_ssh"] <= bound
    ok &= good
    print(f"\nprefetch: SSH-ready -> first step {first['ttfs_ssh']:.2f}s <= (max(upload {first['upload']:.2f}, "
          f"download {first['download']:.2f}) + load {first['load']:.2f}) x 1.1 = {bound:.2f}s: "
          f"{'PASS' if good else 'FAIL'}")
    on = results[True]
    head = on[0]
    for r in on[1:]:
        t, o = r["ttfs"] / head["ttfs"], r["outside"] / head["outside"]
        good = t <= 0.25 and o <= 0.40 and r["warm"]
        ok &= good
        print(f"reuse: job {r['id']} first step at {t:.0%} of the first job's (<= 25 %), non-training "
              f"seconds {o:.0%} (<= 40 %), warm={r['warm']}: {'PASS' if good else 'FAIL'}")
    off_total = sum(r["outside"] for r in results[False])
    on_total = sum(r["outside"] for r in on)
    print(f"non-training seconds billed for the queue: {off_total:.2f}s without reuse, {on_total:.2f}s with "
          f"({on_total / off_total:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
