"""The result always arrives, and the channel stays clean (issue 15), over the wire: the real bot and
discord.py against the fake Discord, which refuses what Discord refuses."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from PIL import Image

from bot.app import LoraBot
from services.jobs.events import Failed, Finished, LogSnippet, Queued, Readiness, SampleImage
from services.jobs.model import Job, JobState
from services.settings import Settings, load_settings
from tests.sim.discord import (
    ATTACH_FILES,
    DEFAULT_BOT_PERMISSIONS,
    EMBED_LINKS,
    SEND_MESSAGES,
    FakeDiscord,
    FakeMessage,
    running_bot,
)

OWNER = 1001
URL = "https://r2.example/cat.safetensors?X-Amz-Signature=abc"


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


def settings(fake: FakeDiscord, root: Path, **extra: object) -> Settings:
    values: dict[str, object] = {"discord_token": fake.token, "discord_guild_id": fake.guild_id,
                                 "db_path": str(root / "db.sqlite3"), "discord_edit_interval_s": 0.05}
    values.update(extra)
    return load_settings(**values)


@pytest.fixture
async def bot(fake: FakeDiscord, tmp_path: Path) -> AsyncIterator[LoraBot]:
    async with running_bot(fake, settings(fake, tmp_path), start_worker=False) as b:
        yield b


async def new_job(bot: LoraBot, fake: FakeDiscord, **fields: object) -> Job:
    values: dict[str, object] = dict(name="cat", user_id=str(OWNER), user_name="ann", source="discord",
                                     channel_id=fake.channel_id, guild_id=fake.guild_id, trigger_word="sks",
                                     state=JobState.QUEUED)
    values.update(fields)
    return await bot.require_store().create(Job.model_validate(values))


def finished() -> Finished:
    return Finished(lora_url=URL, link_expires_at=2_000_000_000, duration_s=3725, cost_usd=0.42,
                    final_loss=0.0312, loss_curve=[(i, 1 / i) for i in range(1, 50)])


async def succeed(bot: LoraBot, job: Job) -> Job:
    """What the pipeline does: the job is SUCCEEDED with its link, then the notifier hears Finished."""
    store = bot.require_store()
    for state in (JobState.RENTING, JobState.WAITING_READY, JobState.UPLOADING, JobState.TRAINING,
                  JobState.COLLECTING):
        await store.transition(job.id, state)
    done = await store.transition(job.id, JobState.SUCCEEDED, lora_url=URL, link_expires_at=2_000_000_000,
                                  finished_at=time.time())
    await bot.notifier.notify(done, finished())
    return await store.require(job.id)


def posted(fake: FakeDiscord) -> list[FakeMessage]:
    return [m for m in fake.all_messages() if m.webhook_token is None]


async def test_the_link_is_in_the_text_and_the_owner_alone_is_pinged(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    done = await succeed(bot, job)
    final = fake.channel_messages()[-1]
    assert f"<{URL}>" in final.content and URL in final.embeds[0]["description"]
    assert final.mentions == [OWNER] and final.files[0].filename == "loss.png"
    assert done.result_delivered_to == "channel" and done.result_delivered_at is not None
    # nothing else the bot posted pinged anybody
    assert all(m.mentions == [] for m in posted(fake) if m is not final)


async def test_without_attach_files_the_result_is_posted_again_without_the_file(bot: LoraBot,
                                                                               fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    fake.set_bot_permissions(fake.channel_id, DEFAULT_BOT_PERMISSIONS & ~ATTACH_FILES)
    done = await succeed(bot, job)
    final = fake.channel_messages()[-1]
    assert final.files == [] and "image" not in final.embeds[0] and f"<{URL}>" in final.content
    assert any(r["code"] == 50013 for r in fake.rejected)
    assert done.result_delivered_to == "channel" and fake.dms(OWNER) == []


async def test_a_final_post_refused_with_403_reaches_the_owner_by_dm_and_through_status(
        bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    fake.set_bot_permissions(fake.channel_id, DEFAULT_BOT_PERMISSIONS & ~SEND_MESSAGES & ~EMBED_LINKS)
    done = await succeed(bot, job)
    assert not any(URL in m.content for m in fake.channel_messages())
    dm_texts = [m.text() for m in fake.dms(OWNER)]
    assert any(URL in t for t in dm_texts), dm_texts
    assert done.result_delivered_to == "dm"
    # and /status for the finished job shows its owner a link (the stored one: no R2 here)
    ix = fake.slash("status", {"job": job.id}, user_id=OWNER)
    await fake.wait_for(lambda: fake.answered(ix))
    [answer] = fake.responses(ix)
    assert answer.ephemeral and URL in answer.text()
    ix2 = fake.slash("link", {"job": job.id}, user_id=OWNER)
    await fake.wait_for(lambda: fake.answered(ix2))
    assert URL in fake.responses(ix2)[0].text()
    stranger = fake.slash("link", {"job": job.id}, user_id=2002)
    await fake.wait_for(lambda: fake.answered(stranger))
    assert URL not in fake.responses(stranger)[0].text()


async def test_a_refusing_channel_mutes_the_job_and_tells_the_owner_once(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    fake.set_bot_permissions(fake.channel_id, 0)
    for step in ("renting", "rented", "tcp", "auth"):
        await bot.notifier.notify(job, Readiness(step))
        await bot.notifier.notify(job, LogSnippet(f"log {step}"))
    await asyncio.sleep(0.2)
    await bot.notifier.flush()
    posts = [r for r in fake.requests if r["method"] == "POST" and f"/channels/{fake.channel_id}/" in r["path"]]
    assert len(posts) == 1, posts  # one refusal, then silence: no storm toward the invalid-request limit
    [dm] = fake.dms(OWNER)
    assert job.id in dm.content and "/status" in dm.content


async def test_links_by_dm_keeps_the_link_out_of_the_channel(fake: FakeDiscord, tmp_path: Path) -> None:
    async with running_bot(fake, settings(fake, tmp_path, links_by_dm=True), start_worker=False) as b:
        job = await new_job(b, fake)
        await b.notifier.notify(job, Queued(1))
        done = await succeed(b, job)
    assert not any(URL in m.text() for m in fake.channel_messages())
    assert "ready" in fake.channel_messages()[-1].content
    assert any(URL in m.text() for m in fake.dms(OWNER)) and done.result_delivered_to == "dm"


async def test_an_undelivered_result_is_delivered_after_a_restart(fake: FakeDiscord, tmp_path: Path) -> None:
    s = settings(fake, tmp_path)
    async with running_bot(fake, s, start_worker=False) as b:
        job = await new_job(b, fake)
        await b.notifier.notify(job, Queued(1))
        fake.set_bot_permissions(fake.channel_id, 0)
        fake.dm_closed.add(OWNER)
        done = await succeed(b, job)
        assert done.result_delivered_at is None and done.result_owed
        # a job finished by a bot from before this change: never re-sent (no flood on upgrade)
        old = await new_job(b, fake, name="old", state=JobState.SUCCEEDED, lora_url=URL + "&old",
                            finished_at=time.time())
    fake.set_bot_permissions(fake.channel_id, DEFAULT_BOT_PERMISSIONS)
    async with running_bot(fake, s, start_worker=False) as b2:
        await fake.wait_for(lambda: any(URL in m.content for m in fake.channel_messages()))
        # the pass ends after it recorded the delivery (the message is posted first)
        assert b2._redelivery is not None and await b2._redelivery == 1
        got = await b2.require_store().require(job.id)
        assert got.result_delivered_to == "channel"
        assert (await b2.require_store().require(old.id)).result_delivered_at is None
        assert not any("&old" in m.content for m in fake.channel_messages())


async def test_a_log_with_four_backticks_and_a_mention_stays_in_its_block_and_pings_nobody(
        bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    text = "step 420/1500 loss=0.34\nsaving sample ````md\n<@999999999999999999> hi"
    await bot.notifier.notify(job, LogSnippet(text))
    [status] = fake.channel_messages()
    [log_msg] = fake.channel_messages(status.id)  # in the job's thread, not the channel
    assert log_msg.mentions == [] and log_msg.mentions_per_write == [[]]
    body = log_msg.content.split("\n", 1)[1]
    assert body.startswith("```\n") and body.endswith("\n```")
    assert re.search("`{2,}", body[4:-4]) is None and "<@999" not in body


async def test_a_retrying_failure_does_not_ping(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    await bot.notifier.notify(job, Failed(reason="host died", kind="infra", cost_usd=0.02, retrying=True))
    await bot.notifier.notify(job, Failed(reason="CUDA out of memory", kind="cuda_oom", cost_usd=0.1))
    retry, final = fake.channel_messages()[-2:]
    assert retry.mentions == [] and "retrying" in retry.content
    assert final.mentions == [OWNER]


async def test_a_restart_mid_training_keeps_the_same_thread(fake: FakeDiscord, tmp_path: Path) -> None:
    s = settings(fake, tmp_path)
    img = tmp_path / "s.png"
    Image.new("RGB", (32, 32)).save(img)
    async with running_bot(fake, s, start_worker=False) as b:
        job = await new_job(b, fake)
        await b.notifier.notify(job, Queued(1))
        await b.notifier.notify(job, SampleImage(path=img, step=100))
        status = fake.channel_messages()[0]
        assert status.thread_id == status.id
        job = await b.require_store().require(job.id)
        assert job.samples_thread_id == status.id
    # an older database forgot the thread: Discord answers 160004 and the thread's id is the message's
    await_job = job.model_copy(update={"samples_thread_id": None})
    async with running_bot(fake, s, start_worker=False) as b2:
        for j in (job, await_job):
            b2.notifier._tracks.clear()
            await b2.notifier.notify(j, SampleImage(path=img, step=200))
    in_thread = fake.channel_messages(status.id)
    assert [m.content for m in in_thread] == ["step 100", "step 200", "step 200"]
    assert len(fake.threads) == 1 and fake.channel_messages() == [status]


async def test_30046_is_answered_at_once_with_a_fresh_status_message(fake: FakeDiscord, tmp_path: Path) -> None:
    async with running_bot(fake, settings(fake, tmp_path), start_worker=False) as b:
        job = await new_job(b, fake)
        await b.notifier.notify(job, Queued(1))
        [first] = fake.channel_messages()
        fake.old_edit_cap = 0
        fake.advance(3700)  # the status message is now over an hour old on Discord's side
        await b.notifier.notify(job, Readiness("renting"))
        await asyncio.sleep(0.2)
        await b.notifier.flush()
        edits = [r for r in fake.requests if r["method"] == "PATCH" and r["path"].endswith(f"/{first.id}")]
        assert len(edits) <= 5, len(edits)  # discord.py's own tries at most, not 6 rounds of them
        msgs = fake.channel_messages()
        assert len(msgs) == 2 and "continued" in msgs[1].embeds[0]["description"]
        assert (await b.require_store().require(job.id)).status_message_id == msgs[1].id


async def test_a_replaced_status_message_points_at_its_successor(fake: FakeDiscord, tmp_path: Path) -> None:
    s = settings(fake, tmp_path, discord_status_refresh_s=0.3)
    async with running_bot(fake, s, start_worker=False) as b:
        job = await new_job(b, fake)
        await b.notifier.notify(job, Queued(1))
        await b.notifier.notify(job, SampleImage(path=_png(tmp_path), step=1))
        await asyncio.sleep(0.35)
        await b.notifier.notify(job, Readiness("renting"))
        await b.notifier.flush()
    old, new = [m for m in fake.channel_messages() if m.embeds]
    assert "continued below" in old.embeds[0]["description"] and str(new.id) in old.embeds[0]["description"]
    assert old.components == [] and new.components  # the Cancel button moved to the live message
    assert f"<#{old.id}>" in new.text()  # the new message links the samples thread


def _png(root: Path) -> Path:
    img = root / "p.png"
    Image.new("RGB", (16, 16)).save(img)
    return img


def test_every_readiness_step_the_services_announce_has_a_label() -> None:
    from bot.embeds import READINESS_LABELS
    from services.progress import Phase

    root = Path(__file__).resolve().parents[2] / "services"
    steps = set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        steps |= set(re.findall(r"Readiness\(\s*\"([a-z_]+)\"", text))
        steps |= set(re.findall(r"announce\(\s*\"([a-z_]+)\"", text))
        steps |= set(re.findall(r"await advance\(\s*\"([a-z_]+)\"", text))
    steps |= {p.value for p in Phase}
    assert {"renting", "tcp", "downloading", "api"} <= steps
    assert steps - set(READINESS_LABELS) == set()


async def test_a_cloudflare_ban_is_not_hammered(bot: LoraBot, fake: FakeDiscord) -> None:
    job = await new_job(bot, fake)
    await bot.notifier.notify(job, Queued(1))
    fake.rate_limit(r"^POST /api/v10/channels/\d+/messages$", count=20, retry_after=1, cloudflare=True)
    await bot.notifier.notify(job, LogSnippet("during the ban"))
    assert len(fake.rate_limited) == 1  # one try; retrying only lengthens a Cloudflare ban
