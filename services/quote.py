"""The estimate before renting: time per phase, total time and cost ranges for one recipe on one offer.

Seconds per training step (FLUX.1 LoRA, rank 16, bf16 + qfloat8 quantize, gradient checkpointing,
batch 1, one 1024 px image per step), relative to an RTX 4090 whose absolute value is the setting
LORABOT_SEC_PER_STEP_4090 (default 1.6 s). Community reports and the Replicate trainer's timings put a
4090 at 1.3–2.0 s/step at 1024 px; the other factors are relative compute of those cards:

    RTX 5090 0.70   H100 SXM 0.45   H100 PCIE 0.55  H200 0.45     A100 SXM4 0.75  A100 PCIE 0.80
    L40S 0.95       RTX 6000Ada 0.95 L40 1.10       RTX 4090 1.00 RTX 3090 Ti 1.70 RTX 3090 1.90
    RTX A6000 1.70  A40 1.80        RTX 4080 1.60   unknown 1.50 (with a wider range)

LORABOT_SEC_PER_STEP_GPU (JSON, e.g. {"RTX 3090": 3.1}) overrides a card's absolute s/step, which is
where measured speeds of finished jobs go (see `compare()` -> `sec_per_step_1024`).

Scaling of a step: resolution r costs 0.15 + 0.85·(r/1024)² of a 1024 step (fixed overhead plus pixel
count); the recipe's resolutions take equal turns, so their factors are averaged. Batch b costs b^0.9.

Start-up phases: image pull (LORABOT_QUOTE_IMAGE_PULL_S, ×0.5–×2), dataset upload at
min(LORABOT_QUOTE_UPLOAD_MBPS, inet_down), base-model download of LORABOT_QUOTE_MODEL_GB (34 GB: the
diffusers subfolders, reference §5) at 100 %–50 % of the offer's inet_down, model load + quantize
(LORABOT_QUOTE_MODEL_LOAD_S, ×0.75–×1.5), latent caching per image and resolution. After training:
samples (baseline unless skipped, every sample_every steps, once at the end), saves, and the upload of the
LoRA to R2. Cost = total time × dph_total (Vast bills storage from creation and GPU while running; the
whole span is billed at dph_total to stay on the safe side) + optional per-GB download charges.

Every speed is injectable: pass `sec_per_step=` (effective s/step for this recipe, used as is) or a
whole `SpeedProfile` (the local simulator has no image pull, no model download, and a known s/step).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.recipe import FluxRecipe
from services.settings import Settings

PHASES: tuple[str, ...] = (
    "image_pull",
    "dataset_upload",
    "model_download",
    "model_load",
    "latent_caching",
    "training",
    "sampling",
    "saving",
    "artifact_upload",
)

# progress.Phase values -> quote phases, for recording actual durations from the event stream
PROGRESS_PHASES: dict[str, str] = {
    "downloading": "model_download",
    "loading": "model_load",
    "quantizing": "model_load",
    "caching_latents": "latent_caching",
    "training": "training",
    "sampling": "sampling",
    "saving": "saving",
}

GPU_FACTORS: dict[str, float] = {
    "RTX 5090": 0.70,
    "H100 SXM": 0.45,
    "H100 NVL": 0.50,
    "H100 PCIE": 0.55,
    "H200": 0.45,
    "A100 SXM4": 0.75,
    "A100 PCIE": 0.80,
    "A100X": 0.80,
    "L40S": 0.95,
    "RTX 6000Ada": 0.95,
    "L40": 1.10,
    "RTX 4090": 1.00,
    "RTX 4090D": 1.10,
    "RTX 4080": 1.60,
    "RTX 3090 Ti": 1.70,
    "RTX 3090": 1.90,
    "RTX A6000": 1.70,
    "A40": 1.80,
}
UNKNOWN_GPU_FACTOR = 1.5

AVG_IMAGE_BYTES = 1_500_000  # to guess the image count from the dataset size when it is not given
LORA_BYTES_PER_RANK = 10_700_000  # FLUX LoRA on every linear layer in float16: ~172 MB at rank 16


def _norm(name: str) -> str:
    name = re.sub(r"(?i)\b(nvidia|geforce)\b", "", name)
    return re.sub(r"[\s_-]+", "", name).lower()


_NORM_FACTORS = {_norm(k): v for k, v in GPU_FACTORS.items()}


def gpu_factor(gpu_name: str) -> float | None:
    """Relative s/step of a card (4090 = 1.0); None when unknown. 'A100 SXM4 80GB' matches 'A100 SXM4'."""
    n = _norm(gpu_name)
    if n in _NORM_FACTORS:
        return _NORM_FACTORS[n]
    prefixes = [k for k in _NORM_FACTORS if n.startswith(k)]
    return _NORM_FACTORS[max(prefixes, key=len)] if prefixes else None


def resolution_factor(resolutions: list[int]) -> float:
    return sum(0.15 + 0.85 * (r / 1024) ** 2 for r in resolutions) / len(resolutions)


def batch_factor(batch_size: int) -> float:
    return float(batch_size**0.9)


class SpeedProfile(BaseModel):
    """Every speed the quote uses; build with `for_gpu()` or by hand (tests, the simulator)."""

    model_config = ConfigDict(frozen=True)

    sec_per_step_1024: float = Field(gt=0, description="s/step at 1024 px, batch 1, on this GPU")
    train_spread: float = Field(default=0.2, ge=0, lt=1, description="± share on training time")
    gpu_factor: float = Field(default=1.0, gt=0, description="relative to a 4090, for the other GPU phases")
    image_pull_s: float = Field(default=180.0, ge=0)
    model_bytes: float = Field(default=34e9, ge=0)
    model_load_s: float = Field(default=240.0, ge=0)
    latent_s_per_image: float = Field(default=0.25, ge=0, description="per image and resolution at 1024, 4090")
    sample_s_per_step: float = Field(default=1.0, ge=0, description="per denoising step of a 1024 image, 4090")
    save_s: float = Field(default=4.0, ge=0)
    upload_mbps: float = Field(default=100.0, gt=0, description="the bot's uplink for the dataset")
    artifact_mbps: float = Field(default=200.0, gt=0, description="box -> R2")
    transfer_overhead_s: float = Field(default=5.0, ge=0, description="per transfer: ssh, hashing, verify")
    latent_overhead_s: float = Field(default=10.0, ge=0, description="VAE load, bucket scan")

    @classmethod
    def for_gpu(cls, gpu_name: str, settings: Settings, **overrides: Any) -> SpeedProfile:
        factor = gpu_factor(gpu_name)
        known = factor is not None
        f = factor if factor is not None else UNKNOWN_GPU_FACTOR
        measured = {_norm(k): v for k, v in settings.sec_per_step_gpu.items()}.get(_norm(gpu_name))
        values: dict[str, Any] = {
            "sec_per_step_1024": measured if measured is not None else settings.sec_per_step_4090 * f,
            "train_spread": 0.15 if measured is not None else (0.2 if known else 0.4),
            "gpu_factor": f,
            "image_pull_s": settings.quote_image_pull_s,
            "model_bytes": settings.quote_model_gb * 1e9,
            "model_load_s": settings.quote_model_load_s,
            "upload_mbps": settings.quote_upload_mbps,
        }
        values.update(overrides)
        return cls(**values)


class PhaseEstimate(BaseModel):
    name: str
    low_s: float
    high_s: float


class Quote(BaseModel):
    gpu_name: str
    dph_total: float
    steps: int
    sec_per_step: float  # effective, for this recipe's resolutions and batch
    train_scale: float  # sec_per_step / s-per-step at 1024 px batch 1
    phases: list[PhaseEstimate]
    total_low_s: float
    total_high_s: float
    cost_low_usd: float
    cost_high_usd: float
    bandwidth_usd: float = 0.0  # included in both costs
    notes: list[str] = Field(default_factory=list)

    def phase(self, name: str) -> PhaseEstimate:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def summary(self) -> str:
        """One line for humans, e.g. '≈ 52–81 min, $0.35–$0.54 on RTX 4090 at $0.40/h (1500 steps at ~1.3 s/step)'."""
        return (
            f"≈ {_span(self.total_low_s, self.total_high_s)}, ${self.cost_low_usd:.2f}–${self.cost_high_usd:.2f} "
            f"on {self.gpu_name} at ${self.dph_total:.2f}/h ({self.steps} steps at ~{self.sec_per_step:.2g} s/step)"
        )


def _span(low: float, high: float) -> str:
    if high < 90:
        return f"{low:.0f}–{high:.0f} s"
    if high < 90 * 60:
        return f"{low / 60:.0f}–{high / 60:.0f} min"
    return f"{low / 3600:.1f}–{high / 3600:.1f} h"


SAMPLE_BYTES = 1_500_000  # one sample image
LOG_BYTES = 5_000_000


def upload_bytes(recipe: FluxRecipe) -> float:
    """Bytes out of the box (billed at inet_up_cost): the LoRA, checkpoint backups, samples, the log."""
    saves = (recipe.steps - 1) // recipe.save_every + 1
    samples = 0
    if recipe.sample_every > 0 and recipe.sample_prompts:
        samples = ((recipe.steps - 1) // recipe.sample_every + 2) * len(recipe.sample_prompts)
    return recipe.rank * LORA_BYTES_PER_RANK * (1 + min(saves, 3)) + samples * SAMPLE_BYTES + LOG_BYTES


def _transfer_s(nbytes: float, mbps: float) -> float:
    return nbytes * 8 / (mbps * 1e6) if mbps > 0 else 0.0


def quote(
    recipe: FluxRecipe,
    *,
    dph_total: float,
    inet_down_mbps: float,
    dataset_bytes: int,
    gpu_name: str,
    settings: Settings,
    num_images: int | None = None,
    sec_per_step: float | None = None,
    profile: SpeedProfile | None = None,
    inet_down_cost_per_gb: float = 0.0,
    inet_up_cost_per_gb: float = 0.0,
    download_ratio: float | None = None,
    warm: bool = False,
) -> Quote:
    """Time and cost ranges for `recipe` on an offer. `sec_per_step` (effective for this recipe, used
    unscaled) and `profile` replace the table and settings when given. `download_ratio` is the measured
    achieved/advertised bandwidth of this host class (services/jobs/phases.calibration); `warm` quotes
    a machine handed over by a finished job: no rent, image pull or model download."""
    if dph_total < 0 or inet_down_mbps < 0 or dataset_bytes < 0:
        raise ValueError("dph_total, inet_down_mbps and dataset_bytes must not be negative")
    prof = profile or SpeedProfile.for_gpu(gpu_name, settings)
    notes: list[str] = []
    scale = resolution_factor(recipe.resolutions) * batch_factor(recipe.batch_size)
    if sec_per_step is not None:
        if sec_per_step <= 0:
            raise ValueError("sec_per_step must be positive")
        spi, spread = sec_per_step, min(prof.train_spread, 0.1)
        notes.append("training speed given")
    else:
        spi, spread = prof.sec_per_step_1024 * scale, prof.train_spread
        if profile is None and gpu_factor(gpu_name) is None:
            notes.append(f"no speed data for {gpu_name}: a generic estimate")
    images = num_images if num_images is not None else max(1, round(dataset_bytes / AVG_IMAGE_BYTES))
    gf = prof.gpu_factor
    phases: list[PhaseEstimate] = []

    def add(name: str, low: float, high: float) -> None:
        phases.append(PhaseEstimate(name=name, low_s=round(low, 1), high_s=round(high, 1)))

    if warm:
        notes.append("warm machine: no rent, image pull or model download")
        prof = prof.model_copy(update={"image_pull_s": 0.0, "model_bytes": 0.0})
    add("image_pull", prof.image_pull_s * 0.5, prof.image_pull_s * 2)
    up = _transfer_s(dataset_bytes, min(prof.upload_mbps, inet_down_mbps or prof.upload_mbps))
    add("dataset_upload", up, up * 2 + prof.transfer_overhead_s)
    if prof.model_bytes and inet_down_mbps <= 0:
        notes.append("unknown inet_down: model download assumed at 100 Mbit/s")
    down = _transfer_s(prof.model_bytes, inet_down_mbps if inet_down_mbps > 0 else 100.0)
    if download_ratio is not None and download_ratio > 0:
        # measured on this host class: a narrower range around the speed such hosts really reach
        real = down / download_ratio
        add("model_download", real * 0.8, real * 1.25)
        notes.append(f"model download at the measured {download_ratio:.0%} of advertised bandwidth")
    else:
        add("model_download", down, down * 2)
    add("model_load", prof.model_load_s * 0.75, prof.model_load_s * 1.5)
    latents = images * sum(0.15 + 0.85 * (r / 1024) ** 2 for r in recipe.resolutions) * prof.latent_s_per_image * gf
    add("latent_caching", latents * 0.5, latents * 1.5 + prof.latent_overhead_s)
    add("training", recipe.steps * spi * (1 - spread), recipe.steps * spi * (1 + spread))
    sample_rounds = 0
    if recipe.sample_every > 0 and recipe.sample_prompts:
        sample_rounds = (0 if recipe.skip_first_sample else 1) + (recipe.steps - 1) // recipe.sample_every + 1
    _, sample_steps = {"dev": (4.0, 20), "schnell": (1.0, 4)}[recipe.base_model]
    sampling = (
        sample_rounds * len(recipe.sample_prompts) * sample_steps * prof.sample_s_per_step * gf
        * (recipe.sample_size / 1024) ** 2
    )
    add("sampling", sampling * 0.8, sampling * 1.3)
    saves = (recipe.steps - 1) // recipe.save_every + 1
    add("saving", saves * prof.save_s * 0.5, saves * prof.save_s * 2)
    art = _transfer_s(recipe.rank * LORA_BYTES_PER_RANK, prof.artifact_mbps)
    add("artifact_upload", art, art * 3 + prof.transfer_overhead_s)

    low = sum(p.low_s for p in phases)
    high = sum(p.high_s for p in phases)
    # bandwidth is billed per GB (issue 14): the model and dataset in, the LoRA and samples out
    extra = ((prof.model_bytes + dataset_bytes) / 1e9 * inet_down_cost_per_gb
             + upload_bytes(recipe) / 1e9 * inet_up_cost_per_gb)
    return Quote(
        gpu_name=gpu_name,
        dph_total=dph_total,
        steps=recipe.steps,
        sec_per_step=round(spi, 4),
        train_scale=round(scale, 4),
        phases=phases,
        total_low_s=round(low, 1),
        total_high_s=round(high, 1),
        cost_low_usd=round(low / 3600 * dph_total + extra, 4),
        cost_high_usd=round(high / 3600 * dph_total + extra, 4),
        bandwidth_usd=round(extra, 4),
        notes=notes,
    )


# --- calibration ------------------------------------------------------------------------------
class Actuals(BaseModel):
    """What a finished job measured; `phases_s` uses the names in PHASES (see PROGRESS_PHASES)."""

    phases_s: dict[str, float] = Field(default_factory=dict)
    total_s: float | None = None  # rent to destroy; defaults to the sum of phases
    cost_usd: float | None = None
    sec_per_step: float | None = None  # mean measured s/it of training


class PhaseComparison(BaseModel):
    name: str
    low_s: float
    high_s: float
    actual_s: float
    ratio: float  # actual / middle of the range
    within: bool


class Calibration(BaseModel):
    phases: list[PhaseComparison]
    total_actual_s: float
    total_error: float  # actual / middle of the total range - 1
    within_total: bool
    cost_actual_usd: float | None
    cost_error: float | None  # actual / middle of the cost range - 1
    sec_per_step_1024: float | None  # measured speed normalised to 1024 px batch 1: feed back into settings


def compare(q: Quote, actual: Actuals) -> Calibration:
    """How a quote fared against a finished job (pure; the job store keeps both)."""
    rows = []
    for p in q.phases:
        if p.name in actual.phases_s:
            a = actual.phases_s[p.name]
            mid = (p.low_s + p.high_s) / 2
            rows.append(
                PhaseComparison(
                    name=p.name,
                    low_s=p.low_s,
                    high_s=p.high_s,
                    actual_s=a,
                    ratio=a / mid if mid else (1.0 if a == 0 else float("inf")),
                    within=p.low_s <= a <= p.high_s,
                )
            )
    total = actual.total_s if actual.total_s is not None else sum(actual.phases_s.values())
    mid_total = (q.total_low_s + q.total_high_s) / 2
    cost_err = None
    if actual.cost_usd is not None:
        mid_cost = (q.cost_low_usd + q.cost_high_usd) / 2
        cost_err = actual.cost_usd / mid_cost - 1 if mid_cost else None
    return Calibration(
        phases=rows,
        total_actual_s=total,
        total_error=total / mid_total - 1 if mid_total else 0.0,
        within_total=q.total_low_s <= total <= q.total_high_s,
        cost_actual_usd=actual.cost_usd,
        cost_error=cost_err,
        sec_per_step_1024=(actual.sec_per_step / q.train_scale) if actual.sec_per_step and q.train_scale else None,
    )


def expected_job_s(
    recipe: FluxRecipe,
    *,
    inet_down_mbps: float,
    gpu_name: str,
    settings: Settings,
    dataset_bytes: int = 0,
    download_ratio: float | None = None,
) -> float:
    """The middle of the quote's total time for this recipe on an offer (issue 18): what offer ranking
    multiplies by dph_total, so a dearer host with 5x the bandwidth wins when it is cheaper in total.
    `download_ratio` is the measured share of advertised bandwidth for the offer's host class
    (services/jobs/phases.calibration)."""
    q = quote(recipe, dph_total=0.0, inet_down_mbps=inet_down_mbps, dataset_bytes=dataset_bytes,
              gpu_name=gpu_name, settings=settings, download_ratio=download_ratio)
    return (q.total_low_s + q.total_high_s) / 2
