"""Every quirk of the quirk table, against the emulator over a real socket."""

from __future__ import annotations

import pytest

from services.vastai import (
    InstanceStatus,
    InsufficientCredit,
    NoOffers,
    OfferQuery,
    OfferUnavailable,
    RateLimited,
    VastAuthError,
    VastClient,
    VastError,
    rent,
)
from tests.services.vastai.conftest import make_client
from tests.sim.vast import Quirks, VastEmulator

Q = OfferQuery(gpu_name="RTX 4090", max_dph=1.0, min_reliability=0.9, min_disk_gb=40)


async def _rent(c: VastClient, label: str = "lorabot-j1") -> int:
    result = await rent(c, label=label, image="img", disk_gb=40, query=Q, attempts=5,
                        label_lookup_delay_s=0.05)
    return result.instance_id


@pytest.mark.parametrize("id_in", ["new_contract", "instances", "none"])
async def test_instance_id_after_rent_is_found_wherever_it_is(id_in: str) -> None:
    with VastEmulator(quirks=Quirks(id_in=id_in, list_lag=1)) as emu:  # type: ignore[arg-type]
        async with make_client(emu) as c:
            iid = await _rent(c)
        assert [i["id"] for i in emu.live_instances()] == [iid]


async def test_show_unwraps_and_null_means_gone(vast: VastEmulator, client: VastClient) -> None:
    iid = await _rent(client)
    inst = await client.show_instance(iid)
    assert inst is not None and inst.id == iid and inst.label == "lorabot-j1"
    await client.destroy_instance(iid)
    assert await client.show_instance(iid) is None
    assert vast.live_instances() == []


@pytest.mark.parametrize("field", ["public_ipaddr", "public_ip"])
async def test_ip_field_either_name(field: str) -> None:
    with VastEmulator(quirks=Quirks(ip_field=field, loading_s=0), ssh_endpoint=("10.1.2.3", 2222)) as emu:  # type: ignore[arg-type]
        async with make_client(emu) as c:
            inst = await c.show_instance(await _rent(c))
    assert inst is not None and inst.public_ipaddr == "10.1.2.3"


@pytest.mark.parametrize("field", ["actual_status", "cur_state", "status"])
async def test_status_from_any_field_and_unknown_is_pending(field: str) -> None:
    with VastEmulator(quirks=Quirks(status_field=field, loading_s=60)) as emu:  # type: ignore[arg-type]
        async with make_client(emu) as c:
            iid = await _rent(c)
            assert (await c.show_instance(iid)).status == InstanceStatus.PENDING  # type: ignore[union-attr]
            emu.set_quirks(loading_s=0)
            assert (await c.show_instance(iid)).status == InstanceStatus.RUNNING  # type: ignore[union-attr]
            emu.fault(iid, "exited")
            inst = await c.show_instance(iid)
            assert inst is not None and inst.status == InstanceStatus.EXITED and inst.status.failed
            await c.destroy_instance(iid)


async def test_ssh_endpoints_direct_first_then_proxy() -> None:
    with VastEmulator(quirks=Quirks(loading_s=0), ssh_endpoint=("127.0.0.1", 2200)) as emu:
        async with make_client(emu) as c:
            iid = await _rent(c)
            eps = (await c.show_instance(iid)).endpoints()  # type: ignore[union-attr]
            assert [e.kind for e in eps] == ["direct", "proxy"] and eps[0].port == 2200
            emu.set_quirks(direct_ssh=False)
            eps = (await c.show_instance(iid)).endpoints()  # type: ignore[union-attr]
            assert [e.kind for e in eps] == ["proxy"]


async def test_strings_are_stripped() -> None:
    with VastEmulator(quirks=Quirks(padded_strings=True, loading_s=0)) as emu:
        async with make_client(emu) as c:
            offers = await c.search_offers(Q)
            assert offers and all(o.gpu_name == "RTX 4090" and not o.geolocation.endswith(" ") for o in offers)
            inst = await c.show_instance(await _rent(c))
            assert inst is not None and inst.label == "lorabot-j1" and inst.ssh_host == "127.0.0.1"


async def test_snatched_offers_are_skipped_up_to_a_bound() -> None:
    with VastEmulator(quirks=Quirks(snatch=2)) as emu:
        async with make_client(emu) as c:
            res = await rent(c, label="lorabot-s", image="img", disk_gb=40, query=Q, attempts=5)
        assert res.attempts == 3 and len(emu.live_instances()) == 1
    with VastEmulator(quirks=Quirks(snatch=10)) as emu:
        async with make_client(emu) as c:
            with pytest.raises(NoOffers):
                await rent(c, label="lorabot-s", image="img", disk_gb=40, query=Q, attempts=3,
                           label_lookup_delay_s=0.01)
        assert emu.live_instances() == []


async def test_single_create_reports_offer_unavailable(client: VastClient, vast: VastEmulator) -> None:
    vast.set_quirks(snatch=1)
    with pytest.raises(OfferUnavailable):
        await client.create_instance(1000, label="x", image="img", disk_gb=40)


async def test_rate_limit_429_plain_text_is_retried_with_backoff() -> None:
    with VastEmulator(quirks=Quirks(rate_limit_every=2)) as emu:
        async with make_client(emu) as c:
            for _ in range(4):
                assert await c.search_offers(Q)
        assert sum(1 for r in emu.requests if r["path"] == "/api/v0/bundles/") >= 6
    with VastEmulator(quirks=Quirks(rate_limit_every=1)) as emu:
        async with VastClient(emu.api_key, emu.url, max_retries=2, backoff_s=0.01, min_interval_s=0) as c:
            with pytest.raises(RateLimited):
                await c.balance()
        assert len(emu.requests) == 3  # first try + 2 retries, then a clear error


@pytest.mark.parametrize("auth_404", [False, True])
async def test_bad_key_is_one_clear_auth_error_without_retry(auth_404: bool) -> None:
    with VastEmulator(quirks=Quirks(auth_404=auth_404)) as emu:
        async with make_client(emu, key="wrong-key-123456") as c:
            with pytest.raises(VastAuthError) as err:
                await c.search_offers(Q)
            assert "wrong-key" not in str(err.value) and "VASTAI_API_KEY" in str(err.value)
            with pytest.raises(VastAuthError):
                await c.list_instances()
        assert len(emu.requests) == 2


async def test_lost_create_answer_is_not_resent_but_looked_up() -> None:
    with VastEmulator(quirks=Quirks(slow_creates=1, create_delay_s=1.5, list_lag=1)) as emu:
        async with make_client(emu, timeout_s=0.5) as c:
            res = await rent(c, label="lorabot-slow", image="img", disk_gb=40, query=Q, attempts=5,
                             label_lookup_delay_s=0.1)
        creates = [r for r in emu.requests if r["method"] == "PUT" and r["path"].startswith("/api/v0/asks/")]
        assert len(creates) == 1
        assert [i["id"] for i in emu.live_instances()] == [res.instance_id]


async def test_rent_is_idempotent_per_label(client: VastClient, vast: VastEmulator) -> None:
    first = await _rent(client, "lorabot-same")
    second = await _rent(client, "lorabot-same")
    assert first == second and len(vast.live_instances()) == 1


async def test_rent_removes_a_duplicate_that_surfaced_late(client: VastClient, vast: VastEmulator) -> None:
    vast.rent_outside("lorabot-dup", 1000)
    vast.rent_outside("lorabot-dup", 1001)
    keep = await _rent(client, "lorabot-dup")
    assert [i["id"] for i in vast.live_instances()] == [keep]


async def test_v1_list_is_paginated_and_v0_list_is_gone() -> None:
    with VastEmulator(quirks=Quirks(page_size=2)) as emu:
        ids = {emu.rent_outside(f"lorabot-{n}", 1000 + n * 6) for n in range(4)}
        async with make_client(emu) as c:
            found = await c.list_instances()
            assert {i.id for i in found} == ids
            assert len([r for r in emu.requests if r["path"] == "/api/v1/instances/"]) == 2
            with pytest.raises(VastError) as err:
                await c.request("GET", "/api/v0/instances/", "list")
            assert err.value.status == 410


async def test_destroy_is_idempotent_and_verified(client: VastClient, vast: VastEmulator) -> None:
    iid = await _rent(client)
    await client.destroy_instance(iid)
    await client.destroy_instance(iid)
    await client.destroy_instance(987654)
    assert vast.live_instances() == []


async def test_offer_search_filters_and_ranking(client: VastClient, vast: VastEmulator) -> None:
    cheap = await client.search_offers(OfferQuery(max_dph=0.45, min_reliability=0.9))
    assert cheap and all(o.dph_total <= 0.45 and o.gpu_name == "RTX 4090" for o in cheap)
    body = [r for r in vast.requests if r["path"] == "/api/v0/bundles/"]
    assert body  # request went out
    ranked = await client.search_offers(OfferQuery(min_reliability=0.9, regions=["US"], direct_ssh=True))
    assert ranked and all(o.region == "US" for o in ranked)
    scores = [o.score for o in ranked]
    assert scores == sorted(scores, reverse=True)
    best_machine = ranked[0].machine_id or 0
    excluded = await client.search_offers(OfferQuery(min_reliability=0.9, exclude_machine_ids=[best_machine]))
    assert ranked[0].id not in {o.id for o in excluded}


async def test_ssh_key_registration_is_idempotent_and_checked(client: VastClient, vast: VastEmulator) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB lorabot"
    await client.ensure_ssh_key(key)
    await client.ensure_ssh_key(key + "\n")
    assert len(vast.account_keys) == 1
    with pytest.raises(VastError):
        await client.ensure_ssh_key("/home/me/.ssh/id_ed25519.pub")
    iid = await _rent(client)
    await client.attach_ssh_key(iid, key)


async def test_balance_never_keeps_the_api_key(client: VastClient, vast: VastEmulator) -> None:
    b = await client.balance()
    assert b.credit == 25.0
    assert vast.api_key not in b.model_dump_json()


async def test_insufficient_credit_is_clear() -> None:
    with VastEmulator(credit=0.01) as emu:
        async with make_client(emu) as c:
            with pytest.raises(InsufficientCredit):
                await c.create_instance(1000, label="lorabot-x", image="img", disk_gb=40)


async def test_api_key_travels_only_in_the_header(client: VastClient, vast: VastEmulator) -> None:
    await client.search_offers(Q)
    await client.balance()
    assert all(r["authorized"] and "api_key" not in r["query"] for r in vast.requests)


async def test_every_quirk_at_once_rent_then_destroy(quirky: VastEmulator) -> None:
    async with make_client(quirky, timeout_s=1.0) as c:
        quirky.set_quirks(create_delay_s=1.5)
        res = await rent(c, label="lorabot-all", image="img", disk_gb=40, query=Q, attempts=6,
                         label_lookup_delay_s=0.1)
        assert [i["id"] for i in quirky.live_instances()] == [res.instance_id]
        listed = await c.list_instances()
        assert [i.label for i in listed] == ["lorabot-all"]
        await c.destroy_instance(res.instance_id)
    assert quirky.live_instances() == []
