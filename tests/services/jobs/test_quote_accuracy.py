"""The quote against what jobs really cost on the simulator, whose speeds are known."""

from __future__ import annotations

from services.jobs import JobState, JobStore
from services.jobs.intake import draft
from services.jobs.worker import Worker
from services.quote import SpeedProfile, quote
from services.recipe import FluxRecipe
from services.vastai import VastClient
from tests.services.jobs.conftest import Recorder, dataset_zip
from tests.sim.world import SimWorld

SEC_PER_STEP = 0.03


async def _run(world: SimWorld, store: JobStore, worker: Worker, steps: int) -> tuple[float, float, FluxRecipe]:
    settings = worker.settings
    async with VastClient.from_settings(settings) as vast:
        d = await draft(store, settings, source=dataset_zip(), user_id="q", name="quote", trigger="sks",
                        overrides={"steps": steps, "save_every": 10_000, "sample_every": 0}, vast=vast)
    assert d.ok, d.message
    await worker.submit(d.job.id)
    job = await worker.wait(d.job.id, timeout=120)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.dph_total is not None
    # billed seconds x $/h is the bill; job.cost_usd is the same, rounded to 1/100 cent
    return job.dph_total * job.billed_s / 3600, job.dph_total, FluxRecipe.model_validate(job.recipe)


async def test_quote_within_25_percent_of_actual_cost(world: SimWorld, recorder: Recorder) -> None:
    world.box.set_sec_per_step(SEC_PER_STEP)
    settings = world.settings()
    async with JobStore(settings.db_path) as store:
        worker = Worker(store, settings, recorder)
        await worker.start()
        try:
            # a first job measures the simulator's fixed start-up and teardown time (calibration)...
            cost_a, dph_a, recipe_a = await _run(world, store, worker, steps=60)
            fixed_s = cost_a / dph_a * 3600 - recipe_a.steps * SEC_PER_STEP
            # ...which the quote then uses for a second, longer job with the known speed
            cost_b, dph_b, recipe_b = await _run(world, store, worker, steps=300)
        finally:
            await worker.stop()
    profile = SpeedProfile(sec_per_step_1024=SEC_PER_STEP, image_pull_s=fixed_s / 1.25, model_bytes=0,
                           model_load_s=0, latent_s_per_image=0, latent_overhead_s=0, sample_s_per_step=0,
                           save_s=0, transfer_overhead_s=0, upload_mbps=1e6, artifact_mbps=1e6)
    q = quote(recipe_b, dph_total=dph_b, inet_down_mbps=1000, dataset_bytes=0, gpu_name="RTX 4090",
              settings=settings, sec_per_step=SEC_PER_STEP, profile=profile)
    mid = (q.cost_low_usd + q.cost_high_usd) / 2
    assert abs(cost_b / mid - 1) <= 0.25, (cost_b, q.cost_low_usd, q.cost_high_usd)
