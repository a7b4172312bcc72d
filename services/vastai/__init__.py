"""Vast.ai: the GPU provider behind lorabot."""

from services.vastai.client import VastClient
from services.vastai.errors import (
    InsufficientCredit,
    NoOffers,
    OfferUnavailable,
    RateLimited,
    RentAmbiguous,
    SearchQuotaExceeded,
    VastAuthError,
    VastError,
)
from services.vastai.models import Balance, Instance, InstanceStatus, Offer, RentResult, SshEndpoint
from services.vastai.rent import rent
from services.vastai.search import JobPlan, OfferQuery, rank

__all__ = [
    "Balance",
    "Instance",
    "InstanceStatus",
    "InsufficientCredit",
    "JobPlan",
    "NoOffers",
    "Offer",
    "OfferQuery",
    "OfferUnavailable",
    "RateLimited",
    "RentAmbiguous",
    "RentResult",
    "SearchQuotaExceeded",
    "SshEndpoint",
    "VastAuthError",
    "VastClient",
    "VastError",
    "rank",
    "rent",
]
