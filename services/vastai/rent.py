"""Renting with a guarantee: at most one live instance per label, even when offers are snatched
or the create answer is lost. The label (prefix + job id) is the key to finding a rental again."""

from __future__ import annotations

import asyncio
import logging

from services.vastai.client import VastClient
from services.vastai.errors import NoOffers, OfferUnavailable, RentAmbiguous, VastAuthError, VastError
from services.vastai.models import Instance, Offer, RentResult
from services.vastai.search import OfferQuery

log = logging.getLogger(__name__)


async def find_label(client: VastClient, label: str, *, tries: int = 4, delay_s: float = 0.5) -> Instance | None:
    """The instance holding `label`, polling a little: a new contract can lag in the v1 list."""
    for attempt in range(tries):
        found = await client.find_by_label(label)
        if found:
            return min(found, key=lambda i: i.id)
        if attempt < tries - 1:
            await asyncio.sleep(delay_s * (attempt + 1))
    return None


async def _one_per_label(client: VastClient, label: str, keep: int) -> None:
    """Destroy any other instance with our label (a lost answer that did rent after all)."""
    for inst in await client.find_by_label(label):
        if inst.id != keep:
            log.warning("destroying duplicate instance %s of label %s", inst.id, label)
            await client.destroy_instance(inst.id)


def _result(inst_id: int, offer: Offer | None, label: str, attempts: int, inst: Instance | None = None) -> RentResult:
    return RentResult(
        instance_id=inst_id,
        offer_id=offer.id if offer else 0,
        dph_total=offer.dph_total if offer else (inst.dph_total if inst else 0.0),
        label=label,
        machine_id=(offer.machine_id if offer else None) or (inst.machine_id if inst else None),
        gpu_name=(offer.gpu_name if offer else inst.gpu_name or "" if inst else ""),
        geolocation=offer.geolocation if offer else "",
        attempts=attempts,
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
) -> RentResult:
    """Rent the best offer (or the given ones, in order), trying the next one when snatched."""
    existing = await find_label(client, label, tries=1)
    if existing is not None:
        # idempotent: a second call for the same label adopts the first rental
        await _one_per_label(client, label, existing.id)
        return _result(existing.id, None, label, 0, existing)

    if offers is None:
        if query is None:
            raise ValueError("rent needs a query or offers")
        offers = await client.search_offers(query)
    if not offers:
        raise NoOffers("no offer matches the filters (price cap, GPU, reliability, region)")

    last_error: VastError | None = None
    for n, offer in enumerate(offers[:attempts], start=1):
        ambiguous = False
        try:
            instance_id = await client.create_instance(
                offer.id, label=label, image=image, disk_gb=disk_gb, env=env, onstart=onstart
            )
        except OfferUnavailable as exc:
            log.info("offer %s was snatched; trying the next", offer.id)
            last_error = exc
            continue
        except VastAuthError:
            raise
        except VastError as exc:
            if exc.status is not None and exc.status < 500 and exc.status != 408:
                raise  # a clear refusal: nothing was rented
            # timeout, lost connection or gateway error: the rental may have happened
            ambiguous, instance_id, last_error = True, None, exc
        if instance_id is None:
            found = await find_label(client, label, tries=label_lookup_tries, delay_s=label_lookup_delay_s)
            if found is None:
                if ambiguous:
                    log.warning("create for %s got no answer and no instance shows the label", label)
                    continue
                raise RentAmbiguous(f"Vast.ai accepted the rental but no instance shows label {label} yet")
            instance_id = found.id
        await _one_per_label(client, label, instance_id)
        return _result(instance_id, offer, label, n)

    # the last ambiguous create may still surface: make sure nothing bills under our label
    late = await find_label(client, label, tries=2, delay_s=label_lookup_delay_s)
    if late is not None:
        await _one_per_label(client, label, late.id)
        return _result(late.id, None, label, attempts, late)
    raise NoOffers(f"could not rent any of {min(len(offers), attempts)} offers: {last_error}")
