"""Offer search: a typed filter builder for POST /api/v0/bundles/ and an explainable ranking."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.settings import Settings
from services.vastai.models import Offer


class OfferQuery(BaseModel):
    """What to look for. Every filter is sent explicitly: the server has hidden defaults."""

    gpu_name: str | None = "RTX 4090"
    num_gpus: int = Field(1, ge=1, le=16)
    max_dph: float | None = Field(None, gt=0)
    min_reliability: float = Field(0.95, ge=0, le=1)
    min_inet_down: float = Field(0, ge=0)
    min_disk_gb: float = Field(40, ge=8)  # also the allocated storage, so dph_total is what we pay
    min_cuda: float = Field(0, ge=0)
    regions: list[str] = Field(default_factory=list)  # ISO country codes
    verified: bool = True
    direct_ssh: bool = False  # require direct_port_count >= 1
    rental_type: Literal["on-demand"] = "on-demand"  # bids get stopped when outbid: never used
    limit: int = Field(20, ge=1, le=1000)
    exclude_machine_ids: list[int] = Field(default_factory=list)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "verified": {"eq": self.verified},
            "external": {"eq": False},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "num_gpus": {"eq": self.num_gpus},
            "reliability": {"gte": self.min_reliability},
            "disk_space": {"gte": self.min_disk_gb},
        }
        if self.gpu_name:
            # the CLI's underscores stand for spaces; the wire wants spaces
            body["gpu_name"] = {"eq": self.gpu_name.replace("_", " ")}
        if self.max_dph is not None:
            body["dph_total"] = {"lte": self.max_dph}
        if self.min_inet_down:
            body["inet_down"] = {"gte": self.min_inet_down}
        if self.min_cuda:
            body["cuda_max_good"] = {"gte": self.min_cuda}
        if self.regions:
            body["geolocation"] = {"in": [r.upper() for r in self.regions]}
        if self.direct_ssh:
            body["direct_port_count"] = {"gte": 1}
        if self.exclude_machine_ids:
            body["machine_id"] = {"notin": list(self.exclude_machine_ids)}
        body["order"] = [["dph_total", "asc"]]
        body["type"] = self.rental_type
        body["allocated_storage"] = self.min_disk_gb
        body["limit"] = self.limit
        return body

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        gpu: str | None = None,
        num_gpus: int = 1,
        regions: list[str] | None = None,
        max_dph: float | None = None,
        exclude_machine_ids: list[int] | None = None,
        limit: int = 20,
    ) -> OfferQuery:
        """The server's rental filters (settings), with the given overrides."""
        return cls(
            gpu_name=gpu if gpu is not None else settings.gpu_name,
            num_gpus=num_gpus,
            max_dph=max_dph if max_dph is not None else settings.max_price,
            min_reliability=settings.min_reliability,
            min_inet_down=settings.min_inet_down,
            min_disk_gb=settings.disk_gb,
            min_cuda=settings.min_cuda,
            regions=[r.strip().upper() for r in regions or [] if r.strip()],
            exclude_machine_ids=list(exclude_machine_ids or []),
            limit=limit,
        )

    def accepts(self, offer: Offer) -> bool:
        """Re-check on our side: search results are cached and filters may be ignored."""
        if self.gpu_name and offer.gpu_name.lower() != self.gpu_name.replace("_", " ").lower():
            return False
        if offer.num_gpus != self.num_gpus:
            return False
        if self.max_dph is not None and offer.dph_total > self.max_dph:
            return False
        if offer.reliability < self.min_reliability or offer.inet_down < self.min_inet_down:
            return False
        if offer.disk_space and offer.disk_space < self.min_disk_gb:
            return False
        if self.min_cuda and offer.cuda_max_good and offer.cuda_max_good < self.min_cuda:
            return False
        if self.regions and offer.region not in {r.upper() for r in self.regions}:
            return False
        if self.direct_ssh and offer.direct_port_count < 1:
            return False
        return offer.machine_id is None or offer.machine_id not in self.exclude_machine_ids


# Ranking: the expected price of useful work. A job on an unreliable host may have to be redone
# (we pay twice), a slow link makes the ~24 GB base-model download bill GPU time, and dlperf is
# the speed of the work itself. Lower cost is better; score = 1 / cost so that higher ranks first.
BASE_MODEL_GB = 24.0
TYPICAL_JOB_HOURS = 1.0


def explain(offer: Offer) -> dict[str, float]:
    """The parts of an offer's score, for people who ask why it was picked."""
    reliability = min(max(offer.reliability, 0.01), 1.0)
    download_h = (BASE_MODEL_GB * 8000.0 / max(offer.inet_down, 10.0)) / 3600.0
    speed = 1.0 if offer.dlperf <= 0 else min(max(offer.dlperf / 60.0, 0.5), 2.0)
    hours = TYPICAL_JOB_HOURS / speed + download_h
    expected_cost = offer.dph_total * hours / reliability
    return {
        "dph_total": offer.dph_total,
        "reliability_factor": 1.0 / reliability,
        "download_hours": download_h,
        "speed_factor": speed,
        "expected_job_cost": expected_cost,
    }


def score(offer: Offer) -> float:
    cost = explain(offer)["expected_job_cost"]
    return 0.0 if cost <= 0 or math.isnan(cost) else 1.0 / cost


def rank(offers: list[Offer]) -> list[Offer]:
    """Best first; ties broken by price, then by id for a stable order."""
    for offer in offers:
        offer.score = score(offer)
    return sorted(offers, key=lambda o: (-round(o.score, 9), o.dph_total, o.id))
