"""Every text and embed stays within Discord's limits, whatever the user or the trainer wrote."""

from __future__ import annotations

import io

import discord
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot import embeds
from services.dataset.report import DatasetReport, Problem, Repair
from services.jobs.events import Cancelled, Failed, Finished
from services.jobs.model import Job, JobState
from services.vastai import Offer

text = st.text(min_size=0, max_size=9000)
short = st.text(min_size=1, max_size=300)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def within_limits(e: discord.Embed) -> None:
    assert len(e.title or "") <= embeds.MAX_TITLE
    assert len(e.description or "") <= embeds.MAX_DESCRIPTION
    assert len(e.fields) <= embeds.MAX_FIELDS
    for f in e.fields:
        assert 1 <= len(f.name or "") <= embeds.MAX_FIELD_NAME
        assert 1 <= len(f.value or "") <= embeds.MAX_FIELD_VALUE
    assert len(e.footer.text or "") <= embeds.MAX_FOOTER
    assert len(e) <= embeds.MAX_EMBED_TOTAL


def job(**kw: object) -> Job:
    base: dict[str, object] = {"name": "cat", "user_id": "1001", "user_name": "ann", "trigger_word": "sks"}
    base.update(kw)
    return Job(**base)  # type: ignore[arg-type]


@FAST
@given(title=text, desc=text, footer=text, fields=st.lists(st.tuples(text, text), max_size=40))
def test_fit_embed_enforces_every_limit(title: str, desc: str, footer: str, fields: list[tuple[str, str]]) -> None:
    e = discord.Embed(title=title, description=desc)
    e.set_footer(text=footer)
    for name, value in fields:
        e.add_field(name=name, value=value)
    within_limits(embeds.fit_embed(e))


@FAST
@given(many=st.lists(text, min_size=1, max_size=12))
def test_several_embeds_share_6000_characters(many: list[str]) -> None:
    fitted = embeds.fit_embeds([discord.Embed(title=t[:300], description=t) for t in many])
    assert len(fitted) <= 10
    assert sum(len(e) for e in fitted) <= embeds.MAX_EMBED_TOTAL


@FAST
@given(body=text, limit=st.integers(min_value=10, max_value=2000))
def test_code_block_is_closed_and_short(body: str, limit: int) -> None:
    block = embeds.code_block(body, limit)
    assert len(block) <= limit
    assert block.startswith("```") and block.endswith("```")
    assert block[3:-3].count("```") == 0  # nothing inside can close it early


backticky = st.lists(st.sampled_from(["`", "``", "````", "\n", "a", "<@1001>", "@everyone", " "]),
                     max_size=60).map("".join)


@FAST
@given(body=backticky, limit=st.integers(min_value=10, max_value=2000))
def test_no_run_of_backticks_or_mention_survives_inside_a_block(body: str, limit: int) -> None:
    block = embeds.code_block(body, limit)
    inner = block[4:-4]  # between "```\n" and "\n```"
    assert block.startswith("```\n") and block.endswith("\n```") and len(block) <= limit
    assert "``" not in inner  # a fence needs a run of three
    assert "<@" not in inner and "@everyone" not in inner


def test_four_backticks_and_a_mention_stay_inside_the_block() -> None:
    block = embeds.code_block("saving sample ````md\n<@999> hi\n`", 500)
    assert block.count("``") == 2  # the two fences' own runs, nothing else
    assert "<@999>" not in block and "saving sample" in block


@FAST
@given(name=short, reason=text, lines=text, kind=short)
def test_job_embeds_within_limits(name: str, reason: str, lines: str, kind: str) -> None:
    j = job(name=name, state=JobState.TRAINING, step=5, total_steps=10, loss=0.1234, eta_s=99.0, reason=reason,
            gpu_name="RTX 4090", dph_total=0.4)
    within_limits(embeds.status_embed(j, steps=["renting", "rented", name] * 20, queue_position=3))
    within_limits(embeds.failed_embed(j, Failed(reason=reason, kind=kind, last_lines=lines, cost_usd=0.2)))
    within_limits(embeds.finished_embed(j, Finished(lora_url="https://x/" + "a" * 500, link_expires_at=2e9,
                                                    duration_s=3600, cost_usd=0.5, final_loss=0.05,
                                                    links={name[:50]: "https://y/" + reason[:900]})))
    within_limits(embeds.cancelled_embed(j, Cancelled(cost_usd=0.1, destroyed_instance_id=7)))
    within_limits(embeds.jobs_embed([j] * 30))
    assert len(embeds.cancel_result_text(j, 7, 0.1)) <= embeds.MAX_CONTENT
    assert len(embeds.log_message(j, lines, ["secret"])) <= embeds.MAX_CONTENT
    assert len(embeds.error_text(reason)) <= embeds.MAX_CONTENT


@FAST
@given(paths=st.lists(short, max_size=60), msg=text)
def test_dataset_report_embed_within_limits(paths: list[str], msg: str) -> None:
    report = DatasetReport(
        ready=False, images=len(paths), captioned=0,
        problems=[Problem(code="too_small", path=p, message=msg) for p in paths],
        repairs=[Repair(code="exif_rotated", path=p, message=msg) for p in paths],
        trigger_word="sks",
    )
    within_limits(embeds.report_embed(report, name=msg[:200]))


def test_offers_embed_shows_the_price_the_bot_would_pay() -> None:
    offers = [Offer(id=i, gpu_name="RTX 4090", dph_total=0.3 + i / 10, reliability=0.99, inet_down=900,
                    geolocation="Texas, US") for i in range(20)]
    e = embeds.offers_embed(offers, gpu="RTX 4090", max_price=1.0, region=None, would_pay=offers[0])
    within_limits(e)
    assert "$0.300/h" in (e.description or "") and len(e.fields) == 10
    empty = embeds.offers_embed([], gpu="X", max_price=None, region="ZZ")
    assert "No offer" in (empty.description or "")


def test_log_message_redacts_and_keeps_the_newest_lines() -> None:
    lines = "\n".join(f"step {i} loss 0.1 token=hunter2hunter2" for i in range(500))
    out = embeds.log_message(job(), lines, ["hunter2hunter2"])
    assert "hunter2" not in out and "step 499" in out and len(out) <= 2000


def test_progress_bar_and_durations() -> None:
    assert embeds.progress_bar(0.5, 10).startswith("█████░░░░░")
    assert embeds.progress_bar(float("nan"), 4).endswith("0%")
    assert embeds.fmt_duration(59) == "59s" and embeds.fmt_duration(3661) == "1h 01m"
    assert embeds.fmt_duration(None) == "?"


def test_loss_curve_is_a_png_under_the_upload_limit() -> None:
    png = embeds.loss_curve_png([(i, 1 / (i + 1)) for i in range(2000)])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < embeds.MAX_FILE_BYTES
    assert embeds.loss_curve_png([])[:4] == b"\x89PNG"


def test_shrink_image_fits_the_limit() -> None:
    img = Image.effect_noise((600, 600), 80).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data, ext = embeds.shrink_image(buf.getvalue(), limit=60_000)
    assert len(data) <= 60_000 and ext == ".jpg"
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, "PNG")
    same, ext2 = embeds.shrink_image(tiny.getvalue(), limit=10_000)
    assert same == tiny.getvalue() and ext2 == ""
    with pytest.raises(OSError):  # not an image: box output is never passed on unchecked
        embeds.shrink_image(b"small", limit=100)


def test_redaction_comes_before_fitting() -> None:
    """A secret straddling a limit must not leave its first half behind (review M9)."""
    from bot.app import LoraBot
    from services.settings import load_settings

    secret = "CANARY-secret-straddling-0001"
    bot = LoraBot(load_settings(r2_secret_access_key=secret), start_worker=False, sync_commands=False)
    e = discord.Embed(description="x" * (embeds.MAX_DESCRIPTION - 10) + secret)
    cleaned = bot.clean(e).description or ""
    assert secret[:8] not in cleaned and len(cleaned) <= embeds.MAX_DESCRIPTION
