"""services.quote: phase ranges, scaling, injectable speeds, serialisation, and comparison with actuals."""

from __future__ import annotations

import re

import pytest

from services.quote import (
    PHASES,
    PROGRESS_PHASES,
    Actuals,
    Quote,
    SpeedProfile,
    compare,
    gpu_factor,
    quote,
)
from services.recipe import PRESETS, FluxRecipe
from services.settings import Settings, load_settings


@pytest.fixture
def s() -> Settings:
    return load_settings()


def recipe(preset: str = "character", **kw: object) -> FluxRecipe:
    return FluxRecipe.from_preset(preset, name="n", trigger_word="t", **kw)


def q(r: FluxRecipe, s: Settings, **kw: object) -> Quote:
    args: dict[str, object] = {"dph_total": 0.4, "inet_down_mbps": 800.0, "dataset_bytes": 30_000_000,
                               "gpu_name": "RTX 4090", "settings": s}
    args.update(kw)
    return quote(r, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_consistent_ranges(preset: str, s: Settings) -> None:
    res = q(recipe(preset), s)
    assert [p.name for p in res.phases] == list(PHASES)
    assert all(0 <= p.low_s <= p.high_s for p in res.phases)
    assert res.total_low_s == pytest.approx(sum(p.low_s for p in res.phases), abs=0.5)
    assert res.total_high_s == pytest.approx(sum(p.high_s for p in res.phases), abs=0.5)
    assert res.cost_low_usd == pytest.approx(res.total_low_s / 3600 * 0.4, rel=1e-3)
    assert res.cost_high_usd == pytest.approx(res.total_high_s / 3600 * 0.4, rel=1e-3)
    assert res.phase("training").low_s < res.phase("training").high_s
    # training outlasts every other on-GPU phase; a preset run is minutes to hours, not days
    on_gpu = ("latent_caching", "sampling", "saving", "artifact_upload")
    assert res.phase("training").high_s > max(res.phase(n).high_s for n in on_gpu)
    assert 10 * 60 < res.total_high_s < 3 * 3600


def test_summary_is_one_human_line(s: Settings) -> None:
    text = q(recipe(), s).summary()
    assert "\n" not in text
    assert re.fullmatch(
        r"≈ \d+–\d+ min, \$\d+\.\d\d–\$\d+\.\d\d on RTX 4090 at \$0\.40/h \(1500 steps at ~[\d.]+ s/step\)", text
    ), text


def test_quote_round_trips_as_json(s: Settings) -> None:
    res = q(recipe(), s)
    assert Quote.model_validate_json(res.model_dump_json()) == res


def test_training_scales_with_steps_resolution_and_batch(s: Settings) -> None:
    base = q(recipe(resolutions=[1024]), s).phase("training").high_s
    assert q(recipe(resolutions=[1024]), s, dph_total=1.0).phase("training").high_s == base
    assert q(recipe(resolutions=[1024], steps=3000), s).phase("training").high_s == pytest.approx(2 * base, rel=1e-3)
    assert q(recipe(resolutions=[512]), s).phase("training").high_s < 0.5 * base
    assert q(recipe(resolutions=[1024], batch_size=2), s).phase("training").high_s > 1.8 * base
    # 1024 px batch 1 on a 4090 uses the setting as is (± 20 %)
    mid = sum((lambda p: (p.low_s, p.high_s))(q(recipe(resolutions=[1024]), s).phase("training"))) / 2
    assert mid == pytest.approx(1500 * s.sec_per_step_4090, rel=1e-3)


def test_download_follows_inet_down(s: Settings) -> None:
    fast = q(recipe(), s, inet_down_mbps=1000.0).phase("model_download")
    slow = q(recipe(), s, inet_down_mbps=250.0).phase("model_download")
    assert fast.low_s == pytest.approx(34e9 * 8 / 1e9, rel=1e-3)  # 34 GB at 1 Gbit/s
    assert slow.low_s == pytest.approx(4 * fast.low_s, rel=1e-3)
    assert slow.high_s == pytest.approx(2 * slow.low_s, rel=1e-3)


def test_gpu_table_and_settings_overrides(s: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_factor("RTX 4090") == 1.0
    assert gpu_factor("NVIDIA GeForce RTX 3090") == 1.9
    assert gpu_factor("A100 SXM4 80GB") == 0.75
    assert gpu_factor("RTX 3090 Ti") == 1.7
    assert gpu_factor("Quantum 9000") is None
    t4090 = q(recipe(), s).phase("training").high_s
    assert q(recipe(), s, gpu_name="RTX 3090").phase("training").high_s == pytest.approx(1.9 * t4090, rel=1e-3)
    unknown = q(recipe(), s, gpu_name="Quantum 9000")
    assert unknown.notes and "no speed data" in unknown.notes[0]
    monkeypatch.setenv("LORABOT_SEC_PER_STEP_4090", "3.2")
    monkeypatch.setenv("LORABOT_SEC_PER_STEP_GPU", '{"RTX 3090": 9.0}')
    s2 = load_settings()
    assert q(recipe(), s2).phase("training").high_s == pytest.approx(2 * t4090, rel=1e-3)
    measured = q(recipe(resolutions=[1024]), s2, gpu_name="NVIDIA RTX 3090").phase("training")
    assert (measured.low_s + measured.high_s) / 2 == pytest.approx(1500 * 9.0, rel=1e-3)


def test_sampling_and_saving_follow_the_cadence(s: Settings) -> None:
    none = q(recipe(sample_every=0), s).phase("sampling")
    assert (none.low_s, none.high_s) == (0, 0)
    with_baseline = q(recipe(steps=1000, sample_every=250), s).phase("sampling").high_s
    skipped = q(recipe(steps=1000, sample_every=250, skip_first_sample=True), s).phase("sampling").high_s
    assert skipped == pytest.approx(with_baseline * 4 / 5, rel=1e-3)  # 5 rounds: 0, 250, 500, 750, end
    assert q(recipe(steps=1000, save_every=100), s).phase("saving").high_s == pytest.approx(
        10 * q(recipe(steps=1000, save_every=1000), s).phase("saving").high_s
    )


def test_injected_speeds_for_the_simulator(s: Settings) -> None:
    """The pipeline's '≤ 25 % on the simulator' check passes the stand-in trainer's known speeds."""
    sim = SpeedProfile(
        sec_per_step_1024=0.05, image_pull_s=0, model_bytes=0, model_load_s=2.0, latent_s_per_image=0.0,
        sample_s_per_step=0.0, save_s=0.1, upload_mbps=1000.0, artifact_mbps=1000.0, transfer_overhead_s=0.0,
        latent_overhead_s=0.0,
    )
    r = recipe(steps=200)
    res = q(r, s, profile=sim, sec_per_step=0.05, dataset_bytes=1_000_000)
    train = res.phase("training")
    assert train.low_s == pytest.approx(200 * 0.05 * 0.9) and train.high_s == pytest.approx(200 * 0.05 * 1.1)
    assert res.phase("model_download").high_s == 0 and res.phase("image_pull").high_s == 0
    assert "training speed given" in res.notes
    # a run that took exactly the known times lands well within 25 %
    actual = Actuals(
        phases_s={"training": 10.0, "model_load": 2.0, "saving": 0.1, "dataset_upload": 0.01},
        cost_usd=12.1 / 3600 * 0.4,
        sec_per_step=0.05,
    )
    cal = compare(res, actual)
    assert abs(cal.total_error) < 0.25 and abs(cal.cost_error or 0) < 0.25
    with pytest.raises(ValueError):
        q(r, s, sec_per_step=0.0)
    with pytest.raises(ValueError):
        q(r, s, dph_total=-1.0)


def test_compare_reports_per_phase_and_suggests_a_speed(s: Settings) -> None:
    res = q(recipe(resolutions=[512, 768, 1024]), s)
    train = res.phase("training")
    actual = Actuals(
        phases_s={"training": train.high_s * 2, "model_download": res.phase("model_download").low_s},
        total_s=res.total_high_s * 2,
        cost_usd=res.cost_high_usd * 2,
        sec_per_step=2.0,
    )
    cal = compare(res, actual)
    rows = {r.name: r for r in cal.phases}
    assert set(rows) == {"training", "model_download"}
    assert rows["training"].within is False and rows["training"].ratio > 2
    assert rows["model_download"].within is True
    assert cal.within_total is False and cal.total_error > 1
    assert cal.cost_error is not None and cal.cost_error > 1
    # 2.0 s/step measured on a mix of 512/768/1024 means more than 2.0 s at 1024 alone
    assert cal.sec_per_step_1024 is not None and cal.sec_per_step_1024 > 2.0
    assert cal.sec_per_step_1024 == pytest.approx(2.0 / res.train_scale)


def test_progress_phase_map_covers_the_parser() -> None:
    from services.progress import Phase

    assert {p.value for p in Phase} - set(PROGRESS_PHASES) == {"done"}
    assert set(PROGRESS_PHASES.values()) <= set(PHASES)
