"""Issue 13, "the reaper and the store" (the review's H5): the reaper destroys only this
installation's instances, unknown ones only after two sightings some time apart, and it sweeps the
store for finished jobs whose instance was never confirmed gone."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from services.jobs import Job, JobState, JobStore
from services.jobs.worker import find_orphans
from services.vastai import VastClient
from tests.sim.world import SimWorld


def _cli(world: SimWorld, *args: str) -> list[dict[str, object]]:
    p = subprocess.run(["lorabot", *args], env={**os.environ, **world.env(reaper_unknown_grace_s=0)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows: list[dict[str, object]] = json.loads(p.stdout)
    return rows


async def test_the_reaper_touches_only_this_installation(world: SimWorld) -> None:
    settings = world.settings(reaper_unknown_grace_s=0)
    prefix = settings.label_prefix
    async with JobStore(settings.db_path) as store:
        ours = f"{prefix}{store.install_id}-"
        foreign = world.vast.rent_outside("someone-elses-box")
        hand = world.vast.rent_outside(f"{prefix}test")  # `lorabot rent --label lorabot-test`
        other_install = world.vast.rent_outside(f"{prefix}zzzzzz-deadbeef")  # staging on the same account
        unknown = world.vast.rent_outside(f"{ours}deadbeef")  # ours, but its job row was lost
        owned_job = await store.create(Job(user_id="u"))
        await store.transition(owned_job.id, JobState.QUEUED, "x")
        owned = world.vast.rent_outside(f"{ours}{owned_job.id}")
        await store.transition(owned_job.id, JobState.RENTING, "x", label=f"{ours}{owned_job.id}", instance_id=owned)
        finished = await store.create(Job(user_id="u"))
        stale = world.vast.rent_outside(f"{ours}{finished.id}")
        await store.transition(finished.id, JobState.FAILED, "x", label=f"{ours}{finished.id}", instance_id=stale)
        legacy_job = await store.create(Job(user_id="u"))  # rented before labels carried the install id
        legacy = world.vast.rent_outside(f"{prefix}{legacy_job.id}")
        await store.transition(legacy_job.id, JobState.FAILED, "x", label=f"{prefix}{legacy_job.id}",
                               instance_id=legacy)
        # a failed destroy whose label was edited away: only the store knows it
        swept_job = await store.create(Job(user_id="u"))
        swept = world.vast.rent_outside("renamed-by-hand")
        await store.transition(swept_job.id, JobState.FAILED, "x", label=f"{ours}{swept_job.id}", instance_id=swept)

        async with VastClient.from_settings(settings) as vast:
            assert {i.id for i in await find_orphans(store, settings, vast)} == {stale, legacy}
            # the unknown one is an orphan at its second sighting
            assert {i.id for i in await find_orphans(store, settings, vast)} == {stale, legacy, unknown}

        assert {r["id"] for r in _cli(world, "reconcile", "--json")} == {stale, legacy, unknown}
        assert len(world.vast.live_instances()) == 8  # listing destroys nothing

        rows = _cli(world, "reconcile", "--destroy", "--json")
        assert {r["id"] for r in rows} == {stale, legacy, unknown, swept}
        live = {i["id"] for i in world.vast.live_instances()}
        assert live == {owned, foreign, hand, other_install}
        assert (await store.require(swept_job.id)).instance_gone_at is not None
    async with VastClient.from_settings(settings) as vast:  # leave nothing billing
        for iid in live:
            await vast.destroy_instance(iid)


async def test_an_unknown_instance_needs_two_sightings_some_time_apart(world: SimWorld, tmp_path: Path) -> None:
    settings = world.settings(reaper_unknown_grace_s=600)
    async with JobStore(settings.db_path) as store, VastClient.from_settings(settings) as vast:
        iid = world.vast.rent_outside(f"{settings.label_prefix}{store.install_id}-cafe0001")
        assert await find_orphans(store, settings, vast, now=1000.0) == []
        assert await find_orphans(store, settings, vast, now=1300.0) == []  # seen again, too soon
        assert [i.id for i in await find_orphans(store, settings, vast, now=1601.0)] == [iid]
        await vast.destroy_instance(iid)


async def test_the_installation_id_is_made_once_per_store(tmp_path: Path) -> None:
    async with JobStore(tmp_path / "a.sqlite3") as a:
        first = a.install_id
    async with JobStore(tmp_path / "a.sqlite3") as a:
        assert a.install_id == first
    async with JobStore(tmp_path / "b.sqlite3") as b:
        assert b.install_id != first


async def test_one_bad_row_never_stops_the_reaper(world: SimWorld) -> None:
    settings = world.settings(reaper_unknown_grace_s=0)
    async with JobStore(settings.db_path) as store, VastClient.from_settings(settings) as vast:
        ours = f"{settings.label_prefix}{store.install_id}-"
        bad = await store.create(Job(user_id="u"))
        await store.db.execute("UPDATE jobs SET doc = ?, label = ? WHERE id = ?",
                               ('{"id": "' + bad.id + '", "state": "from-the-future"}', f"{ours}{bad.id}", bad.id))
        unreadable = world.vast.rent_outside(f"{ours}{bad.id}")
        done = await store.create(Job(user_id="u"))
        stale = world.vast.rent_outside(f"{ours}{done.id}")
        await store.transition(done.id, JobState.FAILED, "x", label=f"{ours}{done.id}", instance_id=stale)
        # the bad row is skipped (and logged), the rest is reaped as usual
        assert [i.id for i in await find_orphans(store, settings, vast)] == [stale]
        for iid in (unreadable, stale):
            await vast.destroy_instance(iid)
