"""Slash commands end to end: the real bot and discord.py against the fake Discord and the Vast.ai
emulator (no SSH box needed: nothing here trains)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import LoraBot
from services.jobs.intake import draft
from services.jobs.model import JobState
from services.settings import Settings, load_settings
from tests.services.jobs.conftest import dataset_zip
from tests.sim.discord import ATTACH_FILES, DEFAULT_BOT_PERMISSIONS, EMBED_LINKS, FakeDiscord, running_bot
from tests.sim.vast import VastEmulator

OWNER, STRANGER, ADMIN = 1001, 2002, 3003
MANAGE_GUILD = 1 << 5


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    with VastEmulator(api_key="CANARY-vast-key-0001") as emu:
        yield emu
        assert emu.live_instances() == []


def make_settings(fake: FakeDiscord, vast: VastEmulator, root: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_token": fake.token, "discord_guild_id": fake.guild_id,
        "vastai_api_key": vast.api_key, "vastai_api_url": vast.url, "vastai_backoff_s": 0.01,
        "vastai_min_interval_s": 0.0, "vastai_timeout_s": 5.0, "db_path": str(root / "db.sqlite3"),
        "work_dir": str(root / "work"), "discord_edit_interval_s": 0.1, "max_price": 2.0,
        "reaper_interval_s": 3600.0, "dataset_min_images": 3,
        "discord_train_cooldown_s": 0, "discord_offers_cooldown_s": 0,
        # canaries: none of these may ever reach Discord
        "hf_token": "CANARY-hf-token-0002", "r2_access_key_id": "CANARY-r2-id-0003",
        "r2_secret_access_key": "CANARY-r2-secret-0004",
    }
    values.update(extra)
    return load_settings(**values)


@pytest.fixture
async def bot(fake: FakeDiscord, vast: VastEmulator, tmp_path: Path) -> AsyncIterator[LoraBot]:
    async with running_bot(fake, make_settings(fake, vast, tmp_path, train_roles=[fake.roles["Trainers"]])) as b:
        yield b


def bad_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "no images here")
        zf.writestr("broken.png", b"\x89PNG not really")
    return buf.getvalue()


def creates(vast: VastEmulator) -> list[dict[str, Any]]:
    return [r for r in vast.requests if r["method"] == "PUT" and "/asks/" in r["path"]]


async def answer(fake: FakeDiscord, ix: Any, timeout: float = 10.0) -> Any:
    await fake.wait_for(lambda: fake.answered(ix), timeout=timeout)
    return fake.responses(ix)[-1] if fake.responses(ix) else None


def assert_no_canary(fake: FakeDiscord) -> None:
    received = fake.received_text()
    assert "CANARY" not in received
    assert "Traceback" not in received


async def test_bad_dataset_gets_the_qa_report_and_no_rental(bot: LoraBot, fake: FakeDiscord,
                                                            vast: VastEmulator) -> None:
    att = fake.add_attachment("set.zip", bad_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": att},
                    roles=["Trainers"])
    msg = await answer(fake, ix)
    assert msg.ephemeral
    assert "Not started" in msg.content
    assert msg.embeds[0]["title"].startswith("Dataset not ready")
    assert creates(vast) == [] and vast.live_instances() == []
    assert_no_canary(fake)


async def test_attachment_is_checked_before_download(bot: LoraBot, fake: FakeDiscord) -> None:
    big = fake.add_attachment("set.zip", b"PK", size=2 * 1024**3)  # claims 2 GiB
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": big},
                    roles=["Trainers"])
    await fake.wait_for(lambda: ix.callbacks)
    assert ix.callbacks[0]["type"] == 4 and ix.callbacks[0]["data"]["flags"] & 64  # one ephemeral line
    assert "limit" in ix.callbacks[0]["data"]["content"]
    odd = fake.add_attachment("cat.png", b"\x89PNG", content_type="image/png")
    ix2 = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": odd},
                     roles=["Trainers"])
    await fake.wait_for(lambda: ix2.callbacks)
    assert ".zip" in ix2.callbacks[0]["data"]["content"]
    assert fake.downloads == []


async def test_train_role_allow_list(bot: LoraBot, fake: FakeDiscord, vast: VastEmulator) -> None:
    att = fake.add_attachment("set.zip", dataset_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": att})
    await fake.wait_for(lambda: ix.callbacks)
    data = ix.callbacks[0]["data"]
    assert f"<@&{fake.roles['Trainers']}>" in data["content"] and data["flags"] & 64
    assert fake.downloads == [] and creates(vast) == []


async def test_quote_buttons_only_answer_the_requester_and_cancel_rents_nothing(
    bot: LoraBot, fake: FakeDiscord, vast: VastEmulator
) -> None:
    att = fake.add_attachment("set.zip", dataset_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "steps": 100}, attachments={"dataset": att},
                    roles=["Trainers"], user_id=OWNER)
    msg = await answer(fake, ix, timeout=20)
    assert msg.ephemeral and msg.components, msg.content
    titles = [e["title"] for e in msg.embeds]
    assert titles[0].startswith("Dataset ready") and titles[1].startswith("Quote")
    quote = msg.embeds[1]
    assert "$" in quote["description"] and any(f["name"] == "estimated cost" for f in quote["fields"])
    store = bot.require_store()
    [job] = await store.find(user_id=str(OWNER))
    assert job.state is JobState.AWAITING_CONFIRMATION

    # the quote is ephemeral: nobody else can see it, so nobody else can press its buttons
    with pytest.raises(PermissionError):
        fake.click(msg.id, "lorabot:confirm", user_id=STRANGER)

    no = fake.click(msg.id, "lorabot:decline", user_id=OWNER)
    await fake.wait_for(lambda: no.callbacks)
    assert no.callbacks[0]["type"] == 7  # the quote message is updated in place
    await fake.wait_for(lambda: fake.messages[msg.id].content.startswith("Cancelled"))
    await fake.wait_for(lambda: store.db is not None)
    assert (await store.require(job.id)).state is JobState.CANCELLED
    assert creates(vast) == []
    assert_no_canary(fake)


async def test_unconfirmed_quote_expires(fake: FakeDiscord, vast: VastEmulator, tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path, discord_confirm_timeout_s=0.5)
    async with running_bot(fake, s) as b:
        att = fake.add_attachment("set.zip", dataset_zip())
        ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "steps": 100},
                        attachments={"dataset": att}, user_id=OWNER)
        msg = await answer(fake, ix, timeout=20)
        await fake.wait_for(lambda: "expired" in fake.messages[msg.id].content, timeout=5)
        assert fake.messages[msg.id].components == []
        [job] = await b.require_store().find(user_id=str(OWNER))
        assert job.state is JobState.CANCELLED and "expired" in job.reason
    assert creates(vast) == []


async def test_dry_run_stops_after_the_quote(bot: LoraBot, fake: FakeDiscord, vast: VastEmulator) -> None:
    att = fake.add_attachment("set.zip", dataset_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "dry_run": True},
                    attachments={"dataset": att}, roles=["Trainers"])
    msg = await answer(fake, ix, timeout=20)
    assert "Dry run" in msg.content and not msg.components
    assert any(e["title"].startswith("Quote") for e in msg.embeds)
    assert creates(vast) == []


async def test_cancel_by_a_stranger_is_refused(bot: LoraBot, fake: FakeDiscord, vast: VastEmulator) -> None:
    store = bot.require_store()
    async with bot.vast() as client:
        d = await draft(store, bot.settings, source=dataset_zip(), user_id=str(OWNER), origin="discord",
                        name="cat", trigger="sks", overrides={"steps": 100}, vast=client,
                        channel_id=fake.channel_id)
    assert d.ok, d.message
    ix = fake.slash("cancel", {"job": d.job.id}, user_id=STRANGER)
    msg = await answer(fake, ix)
    assert msg.ephemeral and "belongs to someone else" in msg.content
    assert (await store.require(d.job.id)).state is JobState.AWAITING_CONFIRMATION

    # autocomplete shows a stranger nothing of it, and the owner their job
    ac = fake.slash("cancel", {"job": ""}, user_id=STRANGER, focused="job")
    await fake.wait_for(lambda: ac.callbacks)
    assert ac.callbacks[0]["type"] == 8 and ac.callbacks[0]["data"]["choices"] == []
    ac2 = fake.slash("cancel", {"job": d.job.id[:3]}, user_id=OWNER, focused="job")
    await fake.wait_for(lambda: ac2.callbacks)
    assert [c["value"] for c in ac2.callbacks[0]["data"]["choices"]] == [d.job.id]

    # an admin (Manage Server) may cancel it; nothing was rented, so nothing is destroyed
    # after a confirm step; the autocomplete offers live jobs only
    ix2 = fake.slash("cancel", {"job": d.job.id}, user_id=ADMIN, permissions=MANAGE_GUILD)
    msg2 = await answer(fake, ix2)
    assert "Really cancel" in msg2.content and msg2.ephemeral
    assert (await store.require(d.job.id)).state is JobState.AWAITING_CONFIRMATION
    yes = fake.click(msg2.id, "lorabot:cancelyes", user_id=ADMIN, permissions=MANAGE_GUILD)
    await fake.wait_for(lambda: "no machine was running" in fake.messages[msg2.id].content)
    assert (await store.require(d.job.id)).state is JobState.CANCELLED and yes.callbacks[0]["type"] == 7
    ac3 = fake.slash("cancel", {"job": d.job.id[:3]}, user_id=OWNER, focused="job")
    await fake.wait_for(lambda: ac3.callbacks)
    assert ac3.callbacks[0]["data"]["choices"] == []


async def test_status_lists_own_jobs_and_errors_are_one_ephemeral_line(
    bot: LoraBot, fake: FakeDiscord
) -> None:
    ix = fake.slash("status", {}, user_id=OWNER)
    msg = await answer(fake, ix)
    assert msg.ephemeral and msg.embeds[0]["title"] == "Your jobs"
    ix2 = fake.slash("status", {"job": "zzzzzzzz"}, user_id=OWNER)
    msg2 = await answer(fake, ix2)
    assert msg2.ephemeral and "no job" in msg2.content.lower()
    ix3 = fake.slash("balance", {}, user_id=STRANGER)
    await fake.wait_for(lambda: ix3.callbacks)
    assert "Only admins" in ix3.callbacks[0]["data"]["content"]
    ix4 = fake.slash("balance", {}, user_id=ADMIN, roles=[], permissions=MANAGE_GUILD)
    msg4 = await answer(fake, ix4)
    assert "credit" in msg4.content
    ix5 = fake.slash("reconcile", {}, user_id=ADMIN, permissions=MANAGE_GUILD)
    msg5 = await answer(fake, ix5)
    assert "No orphaned instances" in msg5.content
    assert_no_canary(fake)


async def test_a_vast_outage_is_one_clear_line_without_secrets(fake: FakeDiscord, vast: VastEmulator,
                                                               tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path, vastai_api_url="http://127.0.0.1:9", vastai_max_retries=0,
                      vastai_timeout_s=0.5)
    async with running_bot(fake, s, start_worker=False):
        ix = fake.slash("offers", {})
        msg = await answer(fake, ix)
        assert msg.ephemeral and msg.content.startswith("⚠️")
        assert len(fake.responses(ix)) == 1  # the public "thinking…" message was removed
    assert_no_canary(fake)


async def test_a_429_storm_loses_no_answers(bot: LoraBot, fake: FakeDiscord) -> None:
    # the answer is an edit of the deferral (PATCH @original), the way Discord asks for it
    fake.rate_limit(r"^PATCH /api/v10/webhooks/", count=4, retry_after=0.05)
    fake.rate_limit(r"^POST /api/v10/interactions/", count=2, retry_after=0.05, global_=True)
    ixs = [fake.slash("offers", {"limit": 1}) for _ in range(3)]
    for ix in ixs:
        msg = await answer(fake, ix, timeout=15)
        assert msg.embeds and "would rent now" in msg.embeds[0]["description"]
    assert len(fake.rate_limited) == 6


async def test_train_in_a_channel_without_embed_links_is_refused_before_renting(
    bot: LoraBot, fake: FakeDiscord, vast: VastEmulator
) -> None:
    fake.set_bot_permissions(fake.channel_id, DEFAULT_BOT_PERMISSIONS & ~EMBED_LINKS & ~ATTACH_FILES)
    att = fake.add_attachment("set.zip", dataset_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": att},
                    roles=["Trainers"], user_id=OWNER)
    msg = await answer(fake, ix)
    assert msg.ephemeral
    assert "missing: Embed Links, Attach Files" in msg.content, msg.content
    assert fake.downloads == [] and creates(vast) == []
    assert await bot.require_store().find(user_id=str(OWNER)) == []


async def test_offers_and_train_have_working_per_user_cooldowns(fake: FakeDiscord, vast: VastEmulator,
                                                               tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path, discord_offers_cooldown_s=60, discord_train_cooldown_s=60)
    async with running_bot(fake, s):
        first = await answer(fake, fake.slash("offers", {"limit": 1}, user_id=OWNER), timeout=15)
        assert first.embeds
        second = await answer(fake, fake.slash("offers", {"limit": 1}, user_id=OWNER))
        assert second.ephemeral and "Slow down" in second.content and "s." in second.content
        other = await answer(fake, fake.slash("offers", {"limit": 1}, user_id=STRANGER), timeout=15)
        assert other.embeds  # the cooldown is per user


async def test_a_refused_submit_edits_the_quote_and_status_hides_dry_runs(fake: FakeDiscord, vast: VastEmulator,
                                                                         tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path, user_daily_budget=0.0001)
    async with running_bot(fake, s):
        att = fake.add_attachment("set.zip", dataset_zip())
        ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "steps": 100}, attachments={"dataset": att},
                        user_id=OWNER)
        quote = await answer(fake, ix, timeout=20)
        assert quote.components, quote.content
        click = fake.click(quote.id, "lorabot:confirm", user_id=OWNER)
        await fake.wait_for(lambda: fake.messages[quote.id].content.startswith("Not started"))
        assert "daily budget" in fake.messages[quote.id].content  # never "Confirmed" followed by nothing
        assert click.callbacks[0]["type"] == 7 and fake.messages[quote.id].components == []
        assert creates(vast) == []
        dry = fake.slash("train", {"name": "dog", "trigger_word": "sks", "dry_run": True},
                         attachments={"dataset": fake.add_attachment("d.zip", dataset_zip())}, user_id=OWNER)
        await answer(fake, dry, timeout=20)
        listing = await answer(fake, fake.slash("status", {}, user_id=OWNER))
        names = [f["name"] for f in listing.embeds[0].get("fields", [])]
        assert any("cat" in n for n in names) and not any("dog" in n for n in names)
        everything = await answer(fake, fake.slash("status", {"everything": True}, user_id=OWNER))
        assert any("dog" in f["name"] for f in everything.embeds[0]["fields"])


async def test_the_quote_buttons_work_after_a_restart(fake: FakeDiscord, vast: VastEmulator, tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path)
    async with running_bot(fake, s) as b:
        att = fake.add_attachment("set.zip", dataset_zip())
        ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "steps": 100}, attachments={"dataset": att},
                        user_id=OWNER)
        quote = await answer(fake, ix, timeout=20)
        [job] = await b.require_store().find(user_id=str(OWNER))
        ids = [c["custom_id"] for row in quote.components for c in row["components"]]
        assert ids == [f"lorabot:confirm:{job.id}", f"lorabot:decline:{job.id}"]
        assert job.confirm_by is not None and job.confirm_by <= ix.created_at + 15 * 60
    async with running_bot(fake, s) as b2:
        no = fake.click(quote.id, "lorabot:decline", user_id=OWNER)
        await fake.wait_for(lambda: fake.messages[quote.id].content.startswith("Cancelled"))
        assert no.callbacks[0]["type"] == 7
        assert (await b2.require_store().require(job.id)).state is JobState.CANCELLED
    assert creates(vast) == []


async def test_the_quote_step_ends_inside_the_interaction_token(bot: LoraBot, fake: FakeDiscord, vast: VastEmulator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    train_cog = sys.modules["cogs.train"]  # the module the running bot loaded as an extension
    # a token with only ~1 s left for the download and QA, and a download that takes 2 s
    monkeypatch.setattr(train_cog, "TOKEN_LIFE_S", train_cog.QUOTE_MIN_OPEN_S + train_cog.TOKEN_MARGIN_S + 1)
    fake.cdn_latency_s = 2.0
    att = fake.add_attachment("set.zip", dataset_zip())
    ix = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": att},
                    roles=["Trainers"], user_id=OWNER)
    msg = await answer(fake, ix, timeout=10)
    assert msg.ephemeral and "longer than Discord lets me answer" in msg.content
    assert creates(vast) == []
