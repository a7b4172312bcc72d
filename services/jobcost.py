"""What one job costs on one offer, bandwidth included (issue 14).

Vast.ai bills the GPU per second at dph_total and every GB moved at the offer's inet_down_cost /
inet_up_cost. A FLUX job pulls the ~34 GB base model plus the dataset into the box and sends the
LoRA, checkpoints and samples out, so a cheap $/h with dear bandwidth can be the worse offer. The
plan below is what search.rank needs to compare offers by this job's expected cost.
"""

from __future__ import annotations

from typing import Any

from services.quote import Quote, quote, upload_bytes
from services.recipe import FluxRecipe
from services.settings import Settings
from services.vastai.search import JobPlan


def plan_from_quote(q: Quote, recipe: FluxRecipe, settings: Settings, dataset_bytes: int) -> JobPlan:
    download = q.phase("model_download")
    work_s = (q.total_low_s + q.total_high_s - download.low_s - download.high_s) / 2
    return JobPlan(
        work_hours=work_s / 3600.0,
        download_gb=settings.quote_model_gb + dataset_bytes / 1e9,
        model_gb=settings.quote_model_gb,
        upload_gb=upload_bytes(recipe) / 1e9,
    )


def plan_for(recipe: FluxRecipe, settings: Settings, dataset_bytes: int, gpu_name: str | None = None) -> JobPlan:
    """The plan of `recipe` on the configured GPU (the offer's price and link do not enter it)."""
    q = quote(recipe, dph_total=1.0, inet_down_mbps=1000.0, dataset_bytes=dataset_bytes,
              gpu_name=gpu_name or settings.gpu_name, settings=settings)
    return plan_from_quote(q, recipe, settings, dataset_bytes)


def plan_for_job(recipe_doc: dict[str, Any], settings: Settings, dataset_bytes: int | None) -> JobPlan | None:
    """The plan of a stored job (None when it has no valid recipe: the typical job is used)."""
    try:
        recipe = FluxRecipe.model_validate(recipe_doc)
    except ValueError:
        return None
    return plan_for(recipe, settings, dataset_bytes or 0)


def bandwidth_usd(plan: JobPlan, inet_down_cost: float, inet_up_cost: float) -> float:
    return round(plan.download_gb * inet_down_cost + plan.upload_gb * inet_up_cost, 4)
