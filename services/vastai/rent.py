"""Renting with a guarantee: at most one live instance per label, even when offers are snatched
or the create answer is lost. The label (prefix + job id) is the key to finding a rental again.

A create Vast.ai never answered may still rent minutes later (creates take up to 120 s, and the v1
list lags behind a new contract), so before another offer is tried the label is watched for the
create timeout plus that lag, and `guard.schedule_rechecks` looks again later to destroy any second
instance that surfaces after all.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.vastai.client import VastClient
from services.vastai.errors import (
    InsufficientCredit,
    NoOffers,
    OfferUnavailable,
    RateLimited,
    RentAmbiguous,
    VastAuthError,
    VastError,
)
from services.vastai.models import Instance, Offer, RentResult
from services.vastai.search import OfferQuery

log = logging.getLogger(__name__)

LABEL_WATCH_S = 180.0  # the create timeout (120 s) plus the list's lag


async def find_label(client: VastClient, label: str, *, tries: int = 4, delay_s: float = 0.5) -> Instance | None:
    """The instance holding `label`, polling a little: a new contract can lag in the v1 list."""
    for attempt in range(tries):
        found = await client.find_by_label(label)
        if found:
            return min(found, key=lambda i: i.id)
        if attempt < tries - 1:
            await asyncio.sleep(delay_s * (attempt + 1))
    return None


async def watch_label(client: VastClient, label: str, watch_s: float, delay_s: float) -> Instance | None:
    """Poll the label until an instance shows or `watch_s` has passed (a lost create surfacing)."""
    deadline = time.monotonic() + watch_s
    delay = delay_s
    while True:
        found = await client.find_by_label(label)
        if found:
            return min(found, key=lambda i: i.id)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)


async def one_per_label(client: VastClient, label: str, keep: int | None) -> list[int]:
    """Destroy every instance with our label but `keep` (a lost answer that did rent after all)."""
    destroyed = []
    for inst in await client.find_by_label(label):
        if inst.id != keep:
            log.warning("destroying duplicate instance %s of label %s", inst.id, label)
            await client.destroy_instance(inst.id)
            destroyed.append(inst.id)
    return destroyed


def _offer_of(inst: Instance | None, tried: list[Offer], fallback: Offer | None) -> Offer | None:
    """The offer an adopted instance really runs on: its machine, among the offers tried."""
    if inst is not None and inst.machine_id is not None:
        for offer in tried:
            if offer.machine_id == inst.machine_id:
                return offer
        return None  # a machine we did not try this time (an older rental under the label)
    return fallback


def _result(inst_id: int, offer: Offer | None, label: str, attempts: int, inst: Instance | None = None,
            *, ambiguous: bool = False) -> RentResult:
    return RentResult(
        instance_id=inst_id,
        offer_id=offer.id if offer else 0,
        dph_total=offer.dph_total if offer else (inst.dph_total if inst else 0.0),
        label=label,
        machine_id=(offer.machine_id if offer else None) or (inst.machine_id if inst else None),
        gpu_name=(offer.gpu_name if offer else inst.gpu_name or "" if inst else ""),
        geolocation=offer.geolocation if offer else "",
        attempts=attempts,
        inet_down_cost=offer.inet_down_cost if offer else (inst.inet_down_cost if inst else 0.0),
        inet_up_cost=offer.inet_up_cost if offer else (inst.inet_up_cost if inst else 0.0),
        ambiguous=ambiguous,
    )


async def rent(
    client: VastClient,
    *,
    label: str,
    image: str,
    disk_gb: float,
    query: OfferQuery | None = None,
    offers: list[Offer] | None = None,
    attempts: int = 5,
    env: dict[str, str] | None = None,
    onstart: str | None = None,
    label_lookup_tries: int = 4,
    label_lookup_delay_s: float = 0.5,
    label_watch_s: float = LABEL_WATCH_S,
) -> RentResult:
    """Rent the best offer (or the given ones, in order), trying the next one when refused."""
    existing = await find_label(client, label, tries=1)
    if existing is not None:
        # idempotent: a second call for the same label adopts the first rental
        await one_per_label(client, label, existing.id)
        return _result(existing.id, None, label, 0, existing)

    if offers is None:
        if query is None:
            raise ValueError("rent needs a query or offers")
        offers = await client.search_offers(query)
    if not offers:
        raise NoOffers("no offer matches the filters (price cap, GPU, reliability, region)")

    last_error: VastError | None = None
    tried: list[Offer] = []
    ambiguous = False
    for n, offer in enumerate(offers[:attempts], start=1):
        tried.append(offer)
        found: Instance | None = None
        try:
            instance_id = await client.create_instance(
                offer.id, label=label, image=image, disk_gb=disk_gb, env=env, onstart=onstart,
                direct_ssh=offer.direct_port_count > 0,  # direct SSH needs open ports on the host
            )
        except OfferUnavailable as exc:
            log.info("offer %s refused (%s); trying the next", offer.id, exc)
            last_error = exc
            continue
        except (VastAuthError, InsufficientCredit, RateLimited):
            raise
        except VastError as exc:
            if exc.status is not None and exc.status < 500 and exc.status != 408:
                raise  # a clear refusal of the rental itself (e.g. the image): nothing was rented
            # timeout, lost connection or gateway error: the rental may have happened, and may show
            # only after the create's own timeout plus the list's lag
            ambiguous, instance_id, last_error = True, None, exc
            log.warning("create on offer %s got no answer (%s); watching label %s for %.0f s",
                        offer.id, exc, label, label_watch_s)
            found = await watch_label(client, label, label_watch_s, label_lookup_delay_s)
            if found is None:
                continue
            instance_id = found.id
        if instance_id is None:
            found = await find_label(client, label, tries=label_lookup_tries, delay_s=label_lookup_delay_s)
            if found is None:
                raise RentAmbiguous(f"Vast.ai accepted the rental but no instance shows label {label} yet")
            instance_id = found.id
        await one_per_label(client, label, instance_id)
        return _result(instance_id, _offer_of(found, tried, offer), label, n, found, ambiguous=ambiguous)

    # the last ambiguous create may still surface: make sure nothing bills under our label
    late = await find_label(client, label, tries=2, delay_s=label_lookup_delay_s)
    if late is not None:
        await one_per_label(client, label, late.id)
        return _result(late.id, _offer_of(late, tried, None), label, attempts, late, ambiguous=ambiguous)
    err = NoOffers(f"could not rent any of {min(len(offers), attempts)} offers: {last_error}")
    err.ambiguous = ambiguous
    raise err
