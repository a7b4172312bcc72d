"""What a FLUX LoRA run fits in a GPU's memory (issue 16, review S1-5).

ai-toolkit skips a batch that runs out of memory three times and then aborts, and an OOM while
sampling is not caught at all, so a recipe too big for the card dies after the paid-for 34 GB
download, quantization and latent caching. These limits refuse it at the quote instead. They follow
ai-toolkit's own "24gb" example (batch 1, resolutions up to 1024, quantize, gradient checkpointing)
with a little headroom; they are estimates from that example and VRAM arithmetic, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.recipe import FluxRecipe


@dataclass(frozen=True, slots=True)
class VramLimits:
    vram_gb: float
    max_batch: int
    max_resolution: int  # the largest training resolution (a bucket's side)
    max_sample_size: int
    needs_quantize: bool  # the bf16 transformer alone is ~23.8 GB


# (at least this many GB, limits); first match from the top
_TIERS: tuple[tuple[float, int, int, int, bool], ...] = (
    (70.0, 8, 1536, 1536, False),
    (40.0, 4, 1536, 1536, False),
    (20.0, 2, 1024, 1024, True),
    (0.0, 1, 768, 768, True),
)
# VRAM by GPU name, for when the offer does not say (Vast.ai's gpu_ram is MB per GPU)
_KNOWN_GB = {"rtx 4090": 24, "rtx 3090": 24, "rtx a5000": 24, "rtx 5090": 32, "l4": 24, "a10": 24,
             "rtx a6000": 48, "l40s": 48, "l40": 48, "rtx 6000ada": 48, "a100 sxm4": 80, "a100 pcie": 80,
             "h100 sxm": 80, "h100 pcie": 80, "h200": 141}


def gpu_vram_gb(gpu_name: str, gpu_ram_mb: float = 0.0) -> float | None:
    """The card's memory: the offer's figure when it has one, else the known size of the model."""
    if gpu_ram_mb > 0:
        return gpu_ram_mb / 1024
    return _KNOWN_GB.get(gpu_name.replace("_", " ").strip().lower())


def limits_for(vram_gb: float) -> VramLimits:
    for floor, batch, res, sample, quantize in _TIERS:
        if vram_gb >= floor:
            return VramLimits(vram_gb, batch, res, sample, quantize)
    raise AssertionError("unreachable: the last tier starts at 0")


def check_fits(recipe: FluxRecipe, vram_gb: float | None, gpu_name: str = "the GPU") -> str | None:
    """None when the recipe fits, else one line naming the value, the limit and the card."""
    if vram_gb is None:
        return None  # an unknown card: nothing to go by
    lim = limits_for(vram_gb)
    card = f"{gpu_name} ({vram_gb:.0f} GB)"
    if recipe.batch_size > lim.max_batch:
        return f"batch_size {recipe.batch_size} does not fit a {card}: at most {lim.max_batch}"
    if max(recipe.resolutions) > lim.max_resolution:
        return f"resolution {max(recipe.resolutions)} does not fit a {card}: at most {lim.max_resolution}"
    sampling = recipe.sample_every > 0 and bool(recipe.sample_prompts)
    if sampling and recipe.sample_size > lim.max_sample_size:
        return f"sample_size {recipe.sample_size} does not fit a {card}: at most {lim.max_sample_size}"
    if lim.needs_quantize and not recipe.quantize:
        return f"quantize off does not fit a {card}: the bf16 FLUX transformer alone is ~24 GB"
    return None
