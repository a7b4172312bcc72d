"""DiscordNotifier through the real discord.py client and the fake Discord: one status message edited
in place (throttled, coalesced, refreshed before the edit cap), logs, samples, the end of a job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from PIL import Image

from bot.app import LoraBot
from services.jobs.events import (
    Cancelled,
    Failed,
    Finished,
    LogSnippet,
    Progress,
    Queued,
    Readiness,
    SampleImage,
    StateChanged,
)
from services.jobs.model import Job, JobState
from services.settings import Settings, load_settings
from tests.sim.discord import FakeDiscord, FakeMessage, running_bot

SECRET = "CANARY-r2-secret-9999"


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


def settings(fake: FakeDiscord, root: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "discord_token": fake.token, "discord_guild_id": fake.guild_id, "db_path": str(root / "db.sqlite3"),
        "discord_edit_interval_s": 0.3, "r2_secret_access_key": SECRET, "hf_token": "CANARY-hf-0001",
    }
    values.update(extra)
    return load_settings(**values)


@pytest.fixture
async def bot(fake: FakeDiscord, tmp_path: Path) -> AsyncIterator[LoraBot]:
    async with running_bot(fake, settings(fake, tmp_path), start_worker=False) as b:
        yield b


async def new_job(bot: LoraBot, fake: FakeDiscord) -> Job:
    return await bot.require_store().create(Job(name="cat", user_id="1001", user_name="ann", source="discord",
                                                channel_id=fake.channel_id, trigger_word="sks",
                                                state=JobState.QUEUED))


def posted(fake: FakeDiscord) -> list[FakeMessage]:
    """Everything the bot posted with its token, in the channel and its threads."""
    return [m for m in fake.all_messages() if m.webhook_token is None]


def progress(step: int, total: int = 100) -> Progress:
    return Progress(phase="training", step=step, total=total, loss=1 / step, sec_per_step=0.5,
                    eta_s=(total - step) * 0.5, cost_usd=0.01 * step)


async def test_status_message_is_edited_in_place_throttled_and_coalesced(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    n = bot.notifier
    await n.notify(job, Queued(2))
    for step in ("renting", "rented", "tcp", "auth", "uploading"):
        await n.notify(job, Readiness(step))
    for i in range(1, 61):
        await n.notify(job, progress(i))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.4)
    await n.flush()
    [status] = fake.channel_messages()
    # ~1 s of events at one edit per 0.3 s: a handful of edits, not 66
    assert 1 <= len(status.edits) <= 8, len(status.edits)
    last = status.embeds[0]
    assert "step 60/100" in last["description"]
    fields = {f["name"]: f["value"] for f in last["fields"]}
    assert fields["loss"] == "0.0167" and "ETA" in fields and "cost so far" in fields
    # earlier steps done, the latest under way, in words
    assert "✓ SSH login" in fields["steps"] and "⏳ dataset upload" in fields["steps"]
    # the message id was handed back for storage (a restarted bot keeps editing it)
    assert (await bot.require_store().require(job.id)).status_message_id == status.id


async def test_a_fresh_status_message_before_the_edit_cap(fake: FakeDiscord, tmp_path: Path) -> None:
    s = settings(fake, tmp_path, discord_edit_interval_s=0.05, discord_status_refresh_s=0.3)
    async with running_bot(fake, s, start_worker=False) as b:
        job = await new_job(b, fake)
        for i in range(1, 40):
            await b.notifier.notify(job, progress(i))
            await asyncio.sleep(0.025)
        await b.notifier.flush()
        msgs = fake.channel_messages()
        assert len(msgs) >= 2
        assert "continued" in msgs[-1].embeds[0]["description"]
        assert (await b.require_store().require(job.id)).status_message_id == msgs[-1].id


async def test_logs_are_redacted_code_blocks_and_samples_go_to_a_thread(bot: LoraBot, fake: FakeDiscord,
                                                                        tmp_path: Path) -> None:
    job = await new_job(bot, fake)
    n = bot.notifier
    await n.notify(job, StateChanged(JobState.TRAINING))
    await n.notify(job, LogSnippet("loading...\n" + "x" * 3000 + f"\nkey={SECRET}\n```inject```\nstep 10"))
    img = tmp_path / "sample_10.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(img)
    await n.notify(job, SampleImage(path=img, step=10, prompt="a photo of sks"))
    [status] = fake.channel_messages()  # the log snippet went to the job's thread, with the samples
    assert status.thread_id is not None
    [log_msg, sample] = fake.channel_messages(status.thread_id)
    assert log_msg.content.count("```") == 2 and len(log_msg.content) <= 2000
    assert "step 10" in log_msg.content and SECRET not in log_msg.content
    assert sample.files[0].filename == "sample_10.png" and "step 10" in sample.content
    assert SECRET not in fake.received_text()


async def test_a_result_posted_before_the_machine_is_released_shows_the_job_done(
        bot: LoraBot, fake: FakeDiscord) -> None:
    # with warm reuse the link goes out while the job still holds its machine (collecting), which may
    # wait minutes for a queued job: the status must not say "saving the LoRA" all that time
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, progress(100))
    collecting = job.model_copy(update={"state": JobState.COLLECTING})
    await bot.notifier.notify(collecting, Finished(lora_url="https://r2.example/cat.safetensors?sig=1",
                                                   link_expires_at=2_000_000_000, duration_s=60, cost_usd=0.1,
                                                   final_loss=0.03, loss_curve=[]))
    status, final = fake.channel_messages()
    assert "done" in status.embeds[0]["title"] and not status.components  # no Cancel button any more
    assert "is ready" in final.content


async def test_finished_posts_link_cost_and_loss_curve(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, progress(100))
    done = job.model_copy(update={"state": JobState.SUCCEEDED})
    await bot.notifier.notify(done, Finished(lora_url="https://r2.example/cat.safetensors?sig=1",
                                             link_expires_at=2_000_000_000, duration_s=3725, cost_usd=0.42,
                                             final_loss=0.0312, loss_curve=[(i, 1 / i) for i in range(1, 100)]))
    status, final = fake.channel_messages()
    assert "done" in status.embeds[0]["title"]
    e = final.embeds[0]
    assert "https://r2.example/cat.safetensors?sig=1" in e["description"] and "expires" in e["description"]
    fields = {f["name"]: f["value"] for f in e["fields"]}
    assert fields == {"duration": "1h 02m", "cost": "$0.42", "final loss": "0.0312"}
    assert final.files[0].filename == "loss.png" and final.files[0].data[:4] == b"\x89PNG"
    assert "<@1001>" in final.content


async def test_failure_and_cancel_messages(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Failed(reason=f"CUDA out of memory ({SECRET})", kind="cuda_oom",
                                          last_lines="RuntimeError: CUDA out of memory", cost_usd=0.1))
    msgs = fake.channel_messages()
    e = msgs[-1].embeds[0]
    assert "cuda_oom" in e["description"] and SECRET not in e["description"]
    fields = {f["name"]: f["value"] for f in e["fields"]}
    assert "CUDA out of memory" in fields["last log lines"] and "rank" in fields["what now"]
    assert fields["cost"] == "$0.10 of GPU time was charged"
    job2 = await new_job(bot, fake)
    await bot.notifier.notify(job2, Queued(1))
    await bot.notifier.notify(job2, Cancelled(cost_usd=0.05, destroyed_instance_id=7000001))
    assert "instance 7000001 destroyed" in fake.channel_messages()[-1].embeds[0]["description"]
    # a job cancelled at its quote was never public: no notice in the channel (review L10)
    before = len(fake.channel_messages())
    job3 = await new_job(bot, fake)
    await bot.notifier.notify(job3, Cancelled(cost_usd=0.0, destroyed_instance_id=None))
    assert len(fake.channel_messages()) == before


async def test_a_429_storm_does_not_lose_messages(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    # more 429s in a row than discord.py retries on its own, on messages and on edits, some global
    fake.rate_limit(r"^POST /api/v10/channels/\d+/messages$", count=12, retry_after=0.02)
    fake.rate_limit(r"^PATCH /api/v10/channels/", count=6, retry_after=0.02, global_=True)
    for i in range(8):
        await bot.notifier.notify(job, LogSnippet(f"line {i}"))
        await bot.notifier.notify(job, progress(i + 1, 8))
    await bot.notifier.flush()
    logs = [m.content for m in posted(fake) if "log" in m.content]
    assert [f"line {i}" in c for i, c in enumerate(logs)] == [True] * 8
    [status] = [m for m in fake.channel_messages() if m.embeds]
    assert "step 8/8" in status.embeds[0]["description"]
    assert len(fake.rate_limited) == 18


async def test_flush_during_a_global_rate_limit_does_not_wedge_the_client(bot: LoraBot, fake: FakeDiscord) -> None:
    """discord.py holds a global lock while it sleeps out a global 429; cancelling the request in that
    sleep would leave the lock shut and every later request hanging. flush() must let it finish."""
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    fake.rate_limit(r"^PATCH /api/v10/channels/", count=1, retry_after=0.5, global_=True)
    await bot.notifier.notify(job, progress(1))
    async with asyncio.timeout(5):
        while not fake.rate_limited:  # the edit is now inside discord.py's global sleep
            await asyncio.sleep(0.02)
    async with asyncio.timeout(10):
        await bot.notifier.flush()
        await bot.notifier.notify(job, LogSnippet("after the storm"))
    assert any("after the storm" in m.content for m in posted(fake))
    [status] = [m for m in fake.channel_messages() if m.embeds]
    assert "step 1/100" in status.embeds[0]["description"]


async def test_a_request_cancelled_during_a_global_rate_limit_does_not_wedge_the_client(
        bot: LoraBot, fake: FakeDiscord) -> None:
    """A job cancelled while its message waits out a global 429 must not leave discord.py's global
    lock shut: later requests (other jobs, other commands) still go through."""
    channel = bot.get_partial_messageable(fake.channel_id)
    fake.rate_limit(r"^POST /api/v10/channels/\d+/messages$", count=1, retry_after=0.5, global_=True)
    sender = asyncio.create_task(channel.send("from a job about to be cancelled"))
    async with asyncio.timeout(5):
        while not fake.rate_limited:
            await asyncio.sleep(0.02)
    sender.cancel()
    async with asyncio.timeout(10):
        await channel.send("from someone else")
    assert "from someone else" in [m.content for m in fake.channel_messages()]


async def test_a_cli_job_is_not_posted(bot: LoraBot, fake: FakeDiscord) -> None:
    job = Job(name="cli", user_id="me", source="cli")
    await bot.notifier.notify(job, progress(1))
    assert fake.channel_messages() == []


async def test_status_messages_keep_working_after_interaction_tokens_expire(bot: LoraBot, fake: FakeDiscord) -> None:
    fake.token_lifetime_s = 0.0  # every interaction token is dead at once
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, progress(1))
    await bot.notifier.notify(job, progress(2))
    await bot.notifier.flush()
    [status] = fake.channel_messages()
    assert "step 2/100" in status.embeds[0]["description"]

