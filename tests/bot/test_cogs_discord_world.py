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
    assert "done" in status.embeds[0]["title"]
    final = next(m for m in msgs if m.files and m.files[0].filename == "loss.png")
    assert "is ready" in final.content
    # the link as a person sees it in the message, and it works
    link = re.search(r"\]\((http[^)]+)\)", final.embeds[0]["description"])
    assert link is not None
    async with httpx.AsyncClient() as http:
        got = await http.get(link.group(1))
    assert got.status_code == 200 and len(got.content) > 8
    # no secret of any setting ever reached Discord
    received = fake.received_text()
    for secret in bot.settings.secret_values():
        assert secret not in received
    assert world.vast.live_instances() == []


async def test_cancel_by_the_owner_destroys_the_instance(bot: LoraBot, fake: FakeDiscord, world: SimWorld) -> None:
    job_id = await start_training(bot, fake, steps=5000)
    store = bot.require_store()

    async def training() -> bool:
        return (await store.require(job_id)).state is JobState.TRAINING

    for _ in range(600):
        if await training():
            break
        await asyncio.sleep(0.1)
    job = await store.require(job_id)
    assert job.state is JobState.TRAINING, job.reason
    instance = job.instance_id
    assert instance is not None and world.vast.live_instances()
    ix = fake.slash("cancel", {"job": job_id}, user_id=OWNER)
    await fake.wait_for(lambda: fake.answered(ix), timeout=60)
    [answer] = fake.responses(ix)
    assert f"instance {instance} was destroyed" in answer.content and "$" in answer.content
    assert world.vast.live_instances() == []
    assert (await store.require(job_id)).state is JobState.CANCELLED
    await fake.wait_for(lambda: any(m.embeds and "cancelled" in m.embeds[0].get("title", "")
                                    for m in fake.channel_messages()), timeout=10)
