"""VRAM-tied recipe limits (review S1-5): sizes a card cannot train are refused at the quote."""

from __future__ import annotations

import pytest

from services.jobs import JobState, JobStore
from services.jobs.intake import draft
from services.recipe import FluxRecipe
from services.vram import check_fits, gpu_vram_gb, limits_for
from tests.services.jobs.conftest import dataset_zip
from tests.sim.world import SimWorld


def recipe(**kw: object) -> FluxRecipe:
    return FluxRecipe.from_preset("character", name="n", trigger_word="t", **kw)


def test_24gb_limits() -> None:
    lim = limits_for(24)
    assert (lim.max_batch, lim.max_resolution, lim.max_sample_size, lim.needs_quantize) == (2, 1024, 1024, True)
    assert check_fits(recipe(), 24) is None  # the presets fit a 4090
    assert check_fits(recipe(batch_size=2), 24) is None
    assert check_fits(recipe(batch_size=3), 24, "RTX 4090") == "batch_size 3 does not fit a RTX 4090 (24 GB): at most 2"
    assert "resolution 1536" in (check_fits(recipe(resolutions=[1024, 1536]), 24) or "")
    assert "sample_size 1280" in (check_fits(recipe(sample_size=1280), 24) or "")
    assert check_fits(recipe(sample_size=1280, sample_every=0), 24) is None  # no sampling, no limit
    assert "quantize" in (check_fits(recipe(quantize=False), 24) or "")
    assert check_fits(recipe(batch_size=4, resolutions=[1536], quantize=False), 48) is None
    assert check_fits(recipe(batch_size=8), None) is None  # unknown card


def test_gpu_vram() -> None:
    assert gpu_vram_gb("RTX 4090") == 24 and gpu_vram_gb("RTX_4090") == 24
    assert gpu_vram_gb("whatever", 49140) == pytest.approx(48, abs=0.1)
    assert gpu_vram_gb("unknown card") is None


async def test_draft_refuses_a_batch_a_4090_cannot_train(world: SimWorld) -> None:
    settings = world.settings()
    async with JobStore(settings.db_path) as store:
        d = await draft(store, settings, source=dataset_zip(), user_id="v", name="big", trigger="sks",
                        overrides={"batch_size": 4})
        assert not d.ok and d.message == "batch_size 4 does not fit a RTX 4090 (24 GB): at most 2"
        job = await store.require(d.job.id)
        assert job.state == JobState.FAILED and job.failure_kind == "user"
