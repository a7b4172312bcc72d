"""/train and /cancel on the whole simulator: the fake Discord in front, the real worker behind it,
with the Vast.ai emulator whose instances are the loopback sshd box running the stand-in trainer,
and moto's S3 server for R2."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from bot.app import LoraBot
from services.jobs.model import JobState
from tests.services.jobs.conftest import dataset_zip
from tests.sim.discord import FakeDiscord, running_bot
from tests.sim.world import SimWorld

OWNER = 1001




@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


@pytest.fixture
async def bot(world: SimWorld, fake: FakeDiscord) -> AsyncIterator[LoraBot]:
    s = world.settings(discord_token=fake.token, discord_guild_id=fake.guild_id, discord_edit_interval_s=0.2)
    async with running_bot(fake, s) as b:
        yield b


async def start_training(bot: LoraBot, fake: FakeDiscord, steps: int) -> str:
    att = fake.add_attachment("cats.zip", dataset_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "steps": steps}, attachments={"dataset": att},
                    user_id=OWNER, user_name="ann")
    await fake.wait_for(lambda: fake.answered(ix), timeout=30)
    [quote] = fake.responses(ix)
    assert quote.components, quote.content
    click = fake.click(quote.id, "lorabot:confirm", user_id=OWNER)
    await fake.wait_for(lambda: any("Job `" in m.content for m in fake.responses(click)), timeout=15)
    [job] = await bot.require_store().find(user_id=str(OWNER))
    assert "next to start" in fake.responses(click)[-1].content
    return job.id


async def test_train_from_attachment_to_a_working_link_after_tokens_expired(
    bot: LoraBot, fake: FakeDiscord, world: SimWorld
) -> None:
    job_id = await start_training(bot, fake, steps=60)
    fake.expire_tokens()  # from here on only the bot token works: the job must still finish in the channel
    worker = bot.require_worker()
    job = await worker.wait(job_id, timeout=120)
    assert job.state is JobState.SUCCEEDED, job.reason
    await fake.wait_for(lambda: any(m.files and m.files[0].filename == "loss.png"
                                    for m in fake.channel_messages()), timeout=10)
    msgs = fake.channel_messages()
    status = next(m for m in msgs if m.embeds and m.embeds[0].get("footer", {}).get("text", "").startswith(
        f"job {job_id}"))
    assert status.edits, "the status message is edited in place"
    # the link goes out before the machine is released (a queued job may take it over), so the status
    # message turns "done" a moment after the result is posted, at its next edit
    await fake.wait_for(lambda: "done" in status.embeds[0]["title"], timeout=10)
    final = next(m for m in msgs if m.files and m.files[0].filename == "loss.png")
    assert "is ready" in final.content
    # the link as a person sees it in the message, and it works
    link = re.search(r"\]\((http[^)]+)\)", final.embeds[0]["description"])
    assert link is not None
    async with httpx.AsyncClient() as http:
        got = await http.get(link.group(1))
    assert got.status_code == 200 and len(got.content) > 8
    assert f"<{link.group(1)}>" in final.content  # the link is in the text too
    for _ in range(100):  # recorded right after the post
        if (await bot.require_store().require(job_id)).result_delivered_to == "channel":
            break
        await asyncio.sleep(0.05)
    assert (await bot.require_store().require(job_id)).result_delivered_to == "channel"
    # /status (tokens are fresh for a new interaction) shows its owner a freshly presigned link that works
    fake.token_lifetime_s = 15 * 60
    ix = fake.slash("status", {"job": job_id}, user_id=OWNER)
    await fake.wait_for(lambda: fake.answered(ix), timeout=10)
    fresh = re.search(r"\]\((http[^)]+)\)", fake.responses(ix)[0].text())
    assert fresh is not None and "expires" in fake.responses(ix)[0].text()
    async with httpx.AsyncClient() as http:
        assert (await http.get(fresh.group(1).replace("\\u0026", "&"))).status_code == 200
    # no secret of any setting ever reached Discord
    received = fake.received_text()
    for secret in bot.settings.secret_values():
        assert secret not in received
    assert world.vast.live_instances() == []


async def test_a_restart_mid_training_keeps_the_thread_and_a_working_cancel_button(
        world: SimWorld, fake: FakeDiscord) -> None:
    s = world.settings(discord_token=fake.token, discord_guild_id=fake.guild_id, discord_edit_interval_s=0.2,
                       log_snippet_interval_s=0.5)
    async with running_bot(fake, s) as bot:
        job_id = await start_training(bot, fake, steps=5000)
        store = bot.require_store()
        for _ in range(600):
            if (await store.require(job_id)).state is JobState.TRAINING:
                break
            await asyncio.sleep(0.1)
        job = await store.require(job_id)
        assert job.state is JobState.TRAINING, job.reason
        # the job's thread exists and has its first log snippets
        await fake.wait_for(lambda: fake.threads and fake.channel_messages(next(iter(fake.threads))), timeout=30)
    [thread_id] = fake.threads
    before = len(fake.channel_messages(thread_id))
    assert world.vast.live_instances(), "a restart leaves the job training on its box"
    async with running_bot(fake, s) as bot2:
        store = bot2.require_store()
        # the same thread goes on: no second thread, no samples or logs in the channel
        await fake.wait_for(lambda: len(fake.channel_messages(thread_id)) > before, timeout=30)
        assert list(fake.threads) == [thread_id]
        assert not any("log" in m.content for m in fake.channel_messages())
        # the Cancel button of the status message the first process posted still works
        job = await store.require(job_id)
        status = fake.messages[job.status_message_id or 0]
        assert status.components, "the status message has a Cancel button"
        stranger = fake.click(status.id, "lorabot:cancel", user_id=2002)
        await fake.wait_for(lambda: fake.answered(stranger))
        assert "Only the person" in fake.responses(stranger)[0].content
        press = fake.click(status.id, "lorabot:cancel", user_id=OWNER)
        await fake.wait_for(lambda: fake.answered(press))
        [confirm] = fake.responses(press)
        assert confirm.ephemeral and "Really cancel" in confirm.content
        assert (await store.require(job_id)).state is JobState.TRAINING  # nothing happens before Yes
        yes = fake.click(confirm.id, "lorabot:cancelyes", user_id=OWNER)
        await fake.wait_for(lambda: "was destroyed" in fake.messages[confirm.id].content, timeout=60)
        assert yes.callbacks[0]["type"] == 7
        assert world.vast.live_instances() == []
        assert (await store.require(job_id)).state is JobState.CANCELLED
        await fake.wait_for(lambda: not fake.messages[status.id].components, timeout=10)  # no button left
