"""Issue 14: the client against an emulator that misbehaves the way the real Vast.ai does.

Durations are the real ones (60 s creates, the 120 s create timeout, minutes of list lag) on a
compressed clock: the emulator's `time_scale` and the client's timeouts shrink by the same factor.
"""

from __future__ import annotations

import time

import httpx
import pytest

from services.vastai import (
    InstanceStatus,
    NoOffers,
    OfferQuery,
    SearchQuotaExceeded,
    VastClient,
    VastError,
    rent,
)
from services.vastai.client import redirect_allowed
from services.vastai.guard import recheck_label
from tests.sim.vast import Quirks, VastEmulator

SCALE = 0.02  # 60 s -> 1.2 s
Q = OfferQuery(gpu_name="RTX 4090", max_dph=1.0, min_reliability=0.9, min_disk_gb=40)
LABEL = "lorabot-x-j1-1"


def client_for(emu: VastEmulator, *, timeout_s: float = 30 * SCALE, create_timeout_s: float = 120 * SCALE,
               min_interval_s: float = 0.0) -> VastClient:
    return VastClient(emu.api_key, emu.url, timeout_s=max(timeout_s, 0.5), max_retries=4, backoff_s=0.01,
                      backoff_max_s=0.05, min_interval_s=min_interval_s, create_timeout_s=create_timeout_s)


async def _rent(c: VastClient, **kw: object) -> tuple[int, int]:
    r = await rent(c, label=LABEL, image="img", disk_gb=40, query=Q, attempts=4, label_lookup_delay_s=0.05,
                   label_watch_s=180 * SCALE, **kw)  # type: ignore[arg-type]
    return r.instance_id, r.offer_id


async def test_slow_create_of_60s_is_waited_out_and_rents_exactly_once() -> None:
    quirks = Quirks(slow_creates=1, create_delay_s=60, time_scale=SCALE, list_lag_s=30)
    with VastEmulator(quirks=quirks) as emu:
        async with client_for(emu) as c:  # the client's 30 s timeout would cut this create short
            iid, offer_id = await _rent(c)
        assert emu.instances_ever(LABEL) == [iid]
        assert [x["offer_id"] for x in emu.creates] == [offer_id]


async def test_lost_create_that_surfaces_minutes_late_is_adopted_not_rented_twice() -> None:
    # the answer is lost; the rental shows in the list 2 minutes later (inside the 180 s watch)
    quirks = Quirks(lost_creates=1, list_lag_s=120, time_scale=SCALE)
    with VastEmulator(quirks=quirks) as emu:
        async with client_for(emu) as c:
            iid, offer_id = await _rent(c)
        assert emu.instances_ever(LABEL) == [iid]
        assert len(emu.creates) == 1
        # the result names the offer the instance really runs on
        assert offer_id == emu.creates[0]["offer_id"]


async def test_a_rental_later_than_the_watch_is_destroyed_by_the_late_recheck() -> None:
    quirks = Quirks(lost_creates=1, list_lag_s=250, time_scale=SCALE)
    with VastEmulator(quirks=quirks) as emu:
        async with client_for(emu) as c:
            iid, offer_id = await _rent(c)
            assert len(emu.live_instances()) == 2  # the lost one bills, but is not listed yet
            assert offer_id == emu.creates[1]["offer_id"]
            await recheck_label(c, LABEL, lambda: iid, delays_s=[60 * SCALE, 300 * SCALE])
        assert [i["id"] for i in emu.live_instances()] == [iid]
        assert len(emu.instances_ever(LABEL)) == 2


@pytest.mark.parametrize("style", ["400", "not_available", "already_rented", "404/410"])
async def test_every_per_offer_refusal_moves_to_the_next_offer(style: str) -> None:
    with VastEmulator(quirks=Quirks(snatch=2, snatch_style=style)) as emu:  # type: ignore[arg-type]
        async with client_for(emu) as c:
            iid, offer_id = await _rent(c)
        assert len(emu.creates) == 3 and offer_id == emu.creates[2]["offer_id"]
        assert [i["id"] for i in emu.live_instances()] == [iid]


async def test_attempts_bound_the_refusals() -> None:
    with VastEmulator(quirks=Quirks(snatch=10, snatch_style="400")) as emu:
        async with client_for(emu) as c:
            with pytest.raises(NoOffers):
                await _rent(c)
        assert len(emu.creates) == 4 and emu.live_instances() == []


@pytest.mark.parametrize("quirk", ["redirect_empty", "empty_bodies", "success_false"])
async def test_redirected_empty_or_refused_answers_never_count_as_destroyed(quirk: str) -> None:
    with VastEmulator() as emu:
        async with client_for(emu) as c:
            iid, _ = await _rent(c)
            emu.set_quirks(**{quirk: True})
            with pytest.raises(VastError):
                await c.destroy_instance(iid, verify_timeout_s=0.5)
            if quirk != "success_false":
                with pytest.raises(VastError):
                    await c.show_instance(iid)
                with pytest.raises(VastError):
                    await c.search_offers(Q)
                with pytest.raises(VastError):
                    await c.balance()
            with pytest.raises(VastError):
                await c.attach_ssh_key(iid, "ssh-ed25519 AAAAC3Nza test")
        assert [i["id"] for i in emu.live_instances()] == [iid]


def test_redirects_are_followed_only_within_vast() -> None:
    base = "https://console.vast.ai"
    assert redirect_allowed(base, "https://cloud.vast.ai/api/v0/x/")
    assert redirect_allowed(base, "https://console.vast.ai/api/v0/y/")
    assert not redirect_allowed(base, "http://cloud.vast.ai/api/v0/x/")  # the key never goes in clear
    assert not redirect_allowed(base, "https://vast.ai.evil.example/")
    assert not redirect_allowed(base, "https://example.com/")


async def test_redirect_within_vast_is_followed_with_the_key() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.host == "console.vast.ai":
            return httpx.Response(308, headers={"Location": "https://cloud.vast.ai" + request.url.raw_path.decode()})
        return httpx.Response(200, json={"credit": 7.5, "balance": 0},
                              headers={"Content-Type": "application/json"})

    async with VastClient("k", "https://console.vast.ai", min_interval_s=0,
                          transport=httpx.MockTransport(handler)) as c:
        assert (await c.balance()).credit == 7.5
    assert [u.split("/api")[0] for u, _ in seen] == ["https://console.vast.ai", "https://cloud.vast.ai"]
    assert all(auth == "Bearer k" for _, auth in seen)


async def test_show_without_an_instances_key_is_an_error_not_gone() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"success": True})

    async with VastClient("k", "https://console.vast.ai", min_interval_s=0,
                          transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(VastError):
            await c.show_instance(5)


async def test_unknown_and_oci_error_and_lingering_destroyed_rows() -> None:
    with VastEmulator(quirks=Quirks(faulty_creates=1, faulty_kind="unknown", linger_destroyed_s=60,
                                    time_scale=SCALE, loading_s=0)) as emu:
        async with client_for(emu) as c:
            iid, _ = await _rent(c)
            inst = await c.show_instance(iid)
            assert inst is not None and inst.status == InstanceStatus.UNKNOWN and not inst.status.failed
            emu.fault(iid, "oci_error")
            inst = await c.show_instance(iid)
            assert inst is not None and inst.status == InstanceStatus.ERROR and inst.status.failed
            assert inst.raw_status == "created"
            # a destroyed row the API still returns (cur_state unloaded) is gone, and destroy is verified
            await c.destroy_instance(iid, verify_timeout_s=1)
            inst = await c.show_instance(iid)
            assert inst is not None and inst.status == InstanceStatus.GONE
            assert await c.find_by_label(LABEL) == []
            rows = await c.list_instances(label=LABEL)
            assert [r.status for r in rows] == [InstanceStatus.GONE]


async def test_search_quota_is_not_retried_and_names_the_reset() -> None:
    with VastEmulator(quirks=Quirks(search_quota_exceeded=True)) as emu:
        async with client_for(emu) as c:
            with pytest.raises(SearchQuotaExceeded, match="00:00 UTC"):
                await c.search_offers(Q)
        assert len([r for r in emu.requests if r["path"] == "/api/v0/bundles/"]) == 1


async def test_retry_after_is_honoured() -> None:
    with VastEmulator(quirks=Quirks(rate_limit_every=1, retry_after_s=0.4)) as emu:
        async with client_for(emu) as c:
            emu.set_quirks(rate_limit_every=0)
            emu.set_quirks(rate_limit_every=2)  # the 2nd request is limited, the 3rd goes through
            await c.balance()
            t0 = time.monotonic()
            await c.balance()
            assert time.monotonic() - t0 >= 0.4


async def test_deleted_ssh_key_does_not_count_as_registered() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIbot lorabot"
    with VastEmulator() as emu:
        async with client_for(emu) as c:
            await c.ensure_ssh_key(key)
            await c.ensure_ssh_key(key)
            assert len(emu.account_keys) == 1
            emu.delete_account_key(emu.account_keys[0]["id"])
            await c.ensure_ssh_key(key)
        live = [k for k in emu.account_keys if k["deleted_at"] is None]
        assert [k["key"] for k in live] == [key]


async def test_direct_ssh_is_asked_only_on_offers_with_direct_ports() -> None:
    with VastEmulator() as emu:
        no_direct = next(o for o in emu.offers if o["direct_port_count"] == 0)
        emu.offers = [no_direct, *(o for o in emu.offers if o is not no_direct)]
        async with client_for(emu) as c:
            offers = [o for o in await c.search_offers(OfferQuery(gpu_name=None, max_dph=5, min_reliability=0,
                                                                  min_disk_gb=40, num_gpus=no_direct["num_gpus"]))
                      if o.id == no_direct["id"]]
            await rent(c, label=LABEL, image="img", disk_gb=40, offers=offers)
        assert emu.creates[0]["runtype"] == "ssh_proxy"


def test_pacing_follows_vast_thresholds() -> None:
    c = VastClient("k", "https://console.vast.ai", min_interval_s=0.25)
    assert (c.pace_s("show"), c.pace_s("destroy"), c.pace_s("asks"), c.pace_s("list")) == (2.0, 3.0, 4.5, 1.0)
    assert c.pace_s("bundles") == 6.0  # 10 searches a minute per IP
    assert VastClient("k", min_interval_s=0).pace_s("show") == 0.0


def test_host_ram_and_bandwidth_caps_go_on_the_wire_and_are_rechecked() -> None:
    from services.settings import load_settings
    from services.vastai import Offer

    q = OfferQuery.from_settings(load_settings(min_cpu_ram_gb=48, max_inet_cost_per_gb=0.02))
    body = q.to_body()
    assert body["cpu_ram"] == {"gte": 48000}  # MB, as the API (and the official CLI's x1000) has it
    assert body["inet_down_cost"] == {"lte": 0.02} and body["inet_up_cost"] == {"lte": 0.02}
    ok = {"id": 1, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.3, "reliability": 0.99,
          "inet_down": 900, "disk_space": 200, "cuda_max_good": 13, "cpu_ram": "64000",
          "inet_down_cost": "0.01", "inet_up_cost": 0.01}
    assert q.accepts(Offer.model_validate(ok))
    assert not q.accepts(Offer.model_validate({**ok, "cpu_ram": 32000}))
    assert not q.accepts(Offer.model_validate({**ok, "inet_up_cost": 0.5}))


def test_quote_and_cost_so_far_include_bandwidth() -> None:
    from services.jobs.model import Job
    from services.quote import quote
    from services.recipe import FluxRecipe
    from services.settings import load_settings

    s = load_settings()
    recipe = FluxRecipe(name="x", trigger_word="sks", steps=1000)
    free = quote(recipe, dph_total=0.4, inet_down_mbps=800, dataset_bytes=50_000_000, gpu_name="RTX 4090",
                 settings=s)
    dear = quote(recipe, dph_total=0.4, inet_down_mbps=800, dataset_bytes=50_000_000, gpu_name="RTX 4090",
                 settings=s, inet_down_cost_per_gb=0.01, inet_up_cost_per_gb=0.02)
    assert dear.bandwidth_usd > 0.34  # 34 GB of model in at $0.01/GB, plus the rest
    assert dear.cost_high_usd == pytest.approx(free.cost_high_usd + dear.bandwidth_usd, abs=1e-3)
    now = time.time()
    job = Job(id="job1", dph_total=0.36, rented_at=now - 3600, bandwidth_usd=0.5)
    assert job.cost_so_far(now) == pytest.approx(0.86)


async def test_the_reaper_leaves_destroyed_rows_alone(tmp_path: object) -> None:
    from pathlib import Path

    from services.jobs.pipeline import install_prefix
    from services.jobs.store import JobStore
    from services.jobs.worker import find_orphans
    from services.settings import load_settings

    s = load_settings(db_path=str(Path(str(tmp_path)) / "db.sqlite3"), reaper_unknown_grace_s=0)
    store = await JobStore(s.db_path).open()
    try:
        prefix = install_prefix(s, store.install_id)  # this installation's labels, unknown to its store
        with VastEmulator(quirks=Quirks(linger_destroyed_s=60)) as emu:
            gone = emu.rent_outside(f"{prefix}abcd1234")
            live = emu.rent_outside(f"{prefix}efgh5678")
            async with client_for(emu) as c:
                await c.destroy_instance(gone, verify_timeout_s=1)
                assert {i.id for i in await c.list_instances()} == {gone, live}  # the row lingers
                assert await find_orphans(store, s, c) == []  # a first sighting is not enough
                assert [i.id for i in await find_orphans(store, s, c)] == [live]
    finally:
        await store.close()
