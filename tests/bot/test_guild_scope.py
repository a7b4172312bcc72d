"""Who may spend (issue 13, C1/H7/L1): over the wire with the fake Discord driving real discord.py.

Only the operator's guild(s) get anything; other guilds and DMs get one ephemeral refusal and cause
no Vast.ai request, no job and no channel message. Roles grant by id only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import FOREIGN_REFUSAL, apply_test_endpoints
from tests.bot.test_cogs_discord import MANAGE_GUILD, answer, make_settings
from tests.services.jobs.conftest import dataset_zip
from tests.sim.discord import FakeDiscord, running_bot
from tests.sim.vast import VastEmulator

OTHER_GUILD = 900_000_000_000_000_777
LATE_GUILD = 900_000_000_000_000_888
ADMIN_ROLE = 900_000_000_000_000_202


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    # the bot is already in a stranger's guild when it starts (the install link was used)
    with FakeDiscord(other_guilds=[OTHER_GUILD]) as f:
        # a role whose *name* is the admin role's id: a name must grant nothing
        f.roles[str(ADMIN_ROLE)] = 900_000_000_000_000_299
        yield f


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    with VastEmulator(api_key="CANARY-vast-key-0001") as emu:
        yield emu
        assert emu.live_instances() == []


def refusal(ix: Any) -> str:
    [cb] = ix.callbacks
    assert cb["type"] == 4 and cb["data"]["flags"] & 64, cb  # one ephemeral message, nothing more
    return str(cb["data"]["content"])


async def test_other_guilds_and_dms_are_refused_and_nothing_happens(fake: FakeDiscord, vast: VastEmulator,
                                                                    tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path, admin_roles=[ADMIN_ROLE])
    async with running_bot(fake, s) as bot:
        # the bot registers its commands in its own guild only; global commands an earlier run left
        # behind (still cached by clients a while after they are removed) are how a stranger's guild or
        # a DM can still send one: put them back, as they were
        fake.commands["global"] = list(fake.commands[str(fake.guild_id)])
        before = len(vast.requests)
        channel_before = len(fake.channel_messages())
        ixs = []
        for where in ({"guild_id": OTHER_GUILD}, {"dm": True}):
            att = fake.add_attachment("set.zip", dataset_zip())
            # Manage Server in the stranger's own guild: still nothing
            ixs.append(fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": att},
                                  permissions=MANAGE_GUILD, **where))
            ixs.append(fake.slash("offers", {"limit": 1}, permissions=MANAGE_GUILD, **where))
            ixs.append(fake.slash("balance", {}, permissions=MANAGE_GUILD, **where))
            ixs.append(fake.slash("reconcile", {"destroy": True}, permissions=MANAGE_GUILD, **where))
        await fake.wait_for(lambda: all(ix.callbacks for ix in ixs))
        await asyncio.sleep(0.3)  # anything a command would have started has had time to show
        for ix in ixs:
            assert FOREIGN_REFUSAL in refusal(ix)
            assert len(fake.responses(ix)) == 1
        assert len(vast.requests) == before, [r["path"] for r in vast.requests[before:]]
        assert fake.downloads == []
        assert await bot.require_store().find() == []
        assert len(fake.channel_messages()) == channel_before

        # the same command from the operator's guild works
        ok = fake.slash("offers", {"limit": 1})
        msg = await answer(fake, ok)
        assert "would rent now" in msg.embeds[0]["description"]
        assert len(vast.requests) > before


async def test_role_names_grant_nothing_role_ids_do(fake: FakeDiscord, vast: VastEmulator, tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path, admin_roles=[ADMIN_ROLE], train_roles=[fake.roles["Trainers"]])
    async with running_bot(fake, s, start_worker=False):
        impostor = fake.slash("balance", {}, roles=[str(ADMIN_ROLE)], user_id=4004)
        await fake.wait_for(lambda: impostor.callbacks)
        assert "Only admins" in refusal(impostor)
        att = fake.add_attachment("set.zip", dataset_zip())
        no_train = fake.slash("train", {"name": "cat", "trigger_word": "sks"}, attachments={"dataset": att},
                              roles=[str(ADMIN_ROLE)], user_id=4004)
        await fake.wait_for(lambda: no_train.callbacks)
        assert "roles to train" in refusal(no_train)
        assert fake.downloads == []

        admin = fake.slash("balance", {}, roles=["Admins"], user_id=5005)  # the role with the listed id
        msg = await answer(fake, admin)
        assert "credit" in msg.content


async def test_commands_live_in_the_allowed_guilds_only(vast: VastEmulator, tmp_path: Path) -> None:
    second = 900_000_000_000_000_003
    with FakeDiscord() as fake:
        fake.commands["global"] = [{"name": "train", "id": "1"}]  # left by an earlier, global run
        s = make_settings(fake, vast, tmp_path, discord_guild_id=f"{fake.guild_id},{second}")
        assert s.discord_guild_ids == [fake.guild_id, second]
        async with running_bot(fake, s, start_worker=False):
            await fake.wait_for(lambda: len(fake.command_puts) >= 3)
        scopes = [scope for scope, _ in fake.command_puts]
        assert scopes == [str(fake.guild_id), str(second), "global"]
        assert fake.commands["global"] == []
        for scope, payload in fake.command_puts[:2]:
            assert payload and all(cmd["contexts"] == [0] for cmd in payload), scope
            assert all(cmd["integration_types"] == [0] for cmd in payload)


async def test_foreign_guilds_are_left_at_start_and_on_join(fake: FakeDiscord, vast: VastEmulator,
                                                           tmp_path: Path) -> None:
    s = make_settings(fake, vast, tmp_path)
    async with running_bot(fake, s, start_worker=False) as bot:
        await fake.wait_for(lambda: OTHER_GUILD in fake.left_guilds)
        fake.join_guild(LATE_GUILD)
        await fake.wait_for(lambda: LATE_GUILD in fake.left_guilds)
        assert fake.guild_id not in fake.left_guilds
        assert [g.id for g in bot.guilds] == [fake.guild_id]


def test_lorabot_run_refuses_without_a_guild(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import app

    monkeypatch.chdir(tmp_path)  # no ./.env
    monkeypatch.setenv("DISCORD_TOKEN", "fake-token-0000")
    monkeypatch.delenv("DISCORD_GUILD_ID", raising=False)
    with pytest.raises(SystemExit) as exc:
        app(["run"], standalone_mode=False)
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: DISCORD_GUILD_ID is not set")


def test_test_endpoints_need_the_explicit_test_flag() -> None:
    import discord.gateway
    import discord.http

    old = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    try:
        apply_test_endpoints({"LORABOT_DISCORD_API_BASE": "http://evil.example/api",
                              "LORABOT_DISCORD_GATEWAY": "ws://evil.example/gw"})
        assert (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == old
        apply_test_endpoints({"LORABOT_DISCORD_API_BASE": "http://127.0.0.1:1/api", "LORABOT_TEST_ENDPOINTS": "1"})
        assert discord.http.Route.BASE == "http://127.0.0.1:1/api"
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old
        assert isinstance(discord.http.Route.BASE, str)
