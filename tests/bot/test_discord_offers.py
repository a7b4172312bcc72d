"""/offers and the bot's start-up, driven through the fake Discord with the real discord.py client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.settings import Settings, load_settings
from tests.sim.discord import FakeDiscord, running_bot
from tests.sim.vast import VastEmulator


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    with VastEmulator() as emu:
        yield emu


def bot_settings(fake: FakeDiscord, vast: VastEmulator, root: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "discord_token": fake.token, "discord_guild_id": fake.guild_id,
        "vastai_api_key": vast.api_key, "vastai_api_url": vast.url, "vastai_backoff_s": 0.01,
        "vastai_min_interval_s": 0.0, "vastai_timeout_s": 5.0, "db_path": str(root / "db.sqlite3"),
        "work_dir": str(root / "work"), "discord_edit_interval_s": 0.1, "max_price": 2.0,
        "reaper_interval_s": 3600.0,
    }
    values.update(extra)
    return load_settings(**values)


async def test_offers_answers_within_3s_with_the_price_the_bot_would_pay(
    fake: FakeDiscord, vast: VastEmulator, tmp_path: Path
) -> None:
    async with running_bot(fake, bot_settings(fake, vast, tmp_path)):
        t0 = time.monotonic()
        ix = fake.slash("offers", {"limit": 3})
        await fake.wait_for(lambda: fake.answered(ix), timeout=3.0)
        assert time.monotonic() - t0 < 3.0
        assert ix.callbacks[0]["type"] == 5  # deferred at once
        [msg] = fake.responses(ix)
        embed = msg.embeds[0]
        assert "would rent now" in embed["description"]
        assert "$" in embed["description"]
        assert 1 <= len(embed["fields"]) <= 3
        assert all("RTX 4090" in f["name"] for f in embed["fields"])


async def test_offers_with_filters_that_match_nothing_says_so(
    fake: FakeDiscord, vast: VastEmulator, tmp_path: Path
) -> None:
    async with running_bot(fake, bot_settings(fake, vast, tmp_path)):
        ix = fake.slash("offers", {"region": "ZZ", "max_price": 0.01})
        await fake.wait_for(lambda: fake.answered(ix), timeout=3.0)
        [msg] = fake.responses(ix)
        assert "No offer matches" in msg.embeds[0]["description"]


async def test_commands_are_synced_once_to_the_guild_and_not_again_when_unchanged(
    fake: FakeDiscord, vast: VastEmulator, tmp_path: Path
) -> None:
    s = bot_settings(fake, vast, tmp_path)
    async with running_bot(fake, s) as bot:
        assert bot.synced is True
    async with running_bot(fake, s) as bot:
        assert bot.synced is False
    # the guild's commands, then the global list emptied (an earlier run's global commands), once
    assert [scope for scope, _ in fake.command_puts] == [str(fake.guild_id), "global"]
    assert fake.command_puts[1][1] == []
    names = {c["name"] for c in fake.command_puts[0][1]}
    assert {"offers", "train", "status", "cancel", "reconcile", "balance"} <= names


async def test_the_bot_resumes_after_the_gateway_drops(fake: FakeDiscord, vast: VastEmulator, tmp_path: Path) -> None:
    async with running_bot(fake, bot_settings(fake, vast, tmp_path), start_worker=False):
        fake.disconnect_gateway(code=4000)
        await fake.wait_for(lambda: fake.resumes + fake.identifies >= 2, timeout=15)
        await fake.wait_for(lambda: fake._sockets, timeout=5)
        ix = fake.slash("offers", {"limit": 1})
        await fake.wait_for(lambda: fake.answered(ix), timeout=5)
