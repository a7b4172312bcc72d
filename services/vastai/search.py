"""Offer search: a typed filter builder for POST /api/v0/bundles/ and an explainable ranking."""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    # issue 14: host RAM for ai-toolkit's FLUX loader, and bandwidth that costs money
    min_cpu_ram_gb: float = Field(0, ge=0)  # Vast's cpu_ram is in MB
    max_inet_cost_per_gb: float | None = Field(None, ge=0)  # $/GB, down and up

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
        if self.min_cpu_ram_gb:
            body["cpu_ram"] = {"gte": self.min_cpu_ram_gb * 1000}  # MB on the wire (the CLI's x1000)
        if self.max_inet_cost_per_gb is not None:
            body["inet_down_cost"] = {"lte": self.max_inet_cost_per_gb}
            body["inet_up_cost"] = {"lte": self.max_inet_cost_per_gb}
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
            min_cpu_ram_gb=settings.min_cpu_ram_gb,
            max_inet_cost_per_gb=settings.max_inet_cost_per_gb,
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
        if self.min_cpu_ram_gb and offer.cpu_ram and offer.cpu_ram < self.min_cpu_ram_gb * 1000:
            return False
        cap = self.max_inet_cost_per_gb
        if cap is not None and (offer.inet_down_cost > cap or offer.inet_up_cost > cap):
            return False
        return offer.machine_id is None or offer.machine_id not in self.exclude_machine_ids


# Ranking: the expected price of this job on each offer. A job on an unreliable host may have to be
# redone (we pay twice), a slow link makes the base-model download bill GPU time, dlperf is the speed
# of the work itself, and bandwidth is billed per GB. Lower cost is better; score = 1 / cost.
BASE_MODEL_GB = 34.0  # the diffusers subfolders of FLUX.1 (the quote's LORABOT_QUOTE_MODEL_GB)
TYPICAL_JOB_HOURS = 1.0


@dataclass(frozen=True)
class JobPlan:
    """What one job needs from an offer, apart from its price: hours of work at a 4090's speed
    (everything but the model download), and GB moved each way (billed at the offer's $/GB)."""

    work_hours: float = TYPICAL_JOB_HOURS
    download_gb: float = BASE_MODEL_GB  # base model + dataset, into the box
    model_gb: float = BASE_MODEL_GB  # the part of download_gb fetched at the offer's inet_down
    upload_gb: float = 0.5  # LoRA, checkpoints, samples and log, out of the box


def explain(offer: Offer, plan: JobPlan | None = None) -> dict[str, float]:
    """The parts of an offer's score, for people who ask why it was picked."""
    p = plan or JobPlan()
    reliability = min(max(offer.reliability, 0.01), 1.0)
    download_h = (p.model_gb * 8000.0 / max(offer.inet_down, 10.0)) / 3600.0
    speed = 1.0 if offer.dlperf <= 0 else min(max(offer.dlperf / 60.0, 0.5), 2.0)
    hours = p.work_hours / speed + download_h
    bandwidth = p.download_gb * offer.inet_down_cost + p.upload_gb * offer.inet_up_cost
    expected_cost = (offer.dph_total * hours + bandwidth) / reliability
    return {
        "dph_total": offer.dph_total,
        "reliability_factor": 1.0 / reliability,
        "download_hours": download_h,
        "speed_factor": speed,
        "hours": hours,
        "bandwidth_usd": bandwidth,
        "expected_job_cost": expected_cost,
    }


def score(offer: Offer, plan: JobPlan | None = None) -> float:
    cost = explain(offer, plan)["expected_job_cost"]
    return 0.0 if cost <= 0 or math.isnan(cost) else 1.0 / cost


def rank(offers: list[Offer], plan: JobPlan | None = None) -> list[Offer]:
    """Best first (cheapest expected job); ties broken by price, then by id for a stable order."""
    for offer in offers:
        offer.expected_cost = explain(offer, plan)["expected_job_cost"]
        offer.score = score(offer, plan)
    return sorted(offers, key=lambda o: (-round(o.score, 9), o.dph_total, o.id))
