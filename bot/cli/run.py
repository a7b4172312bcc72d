"""`lorabot run` (and `python -m bot`): start the Discord bot."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

import typer

from services.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from bot.app import LoraBot

EXIT_USAGE = 2


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(EXIT_USAGE)


def load(require_token: bool = True, require_guild: bool = True) -> Settings:
    try:
        s = load_settings()
    except SettingsError as exc:
        _fail(str(exc))
        raise  # unreachable
    if require_token and (s.discord_token is None or not s.discord_token.get_secret_value().strip()):
        _fail("DISCORD_TOKEN is not set (needed to connect to Discord); put it in the environment or ./.env")
    if require_guild and not s.discord_guild_ids:
        # without it anyone who can add the bot to their server, or DM it, spends the operator's money
        _fail("DISCORD_GUILD_ID is not set: the bot acts only in the servers it names (one id or a comma-separated "
              "list); put it in the environment or ./.env")
    return s


async def serve(settings: Settings, bot: LoraBot | None = None) -> None:
    from bot.app import LoraBot, apply_test_endpoints

    apply_test_endpoints()
    assert settings.discord_token is not None
    bot = bot or LoraBot(settings)
    async with bot:
        # jobs first: the worker drives every rented box whether or not Discord lets us in
        await bot.start_services()
        await bot.login_with_backoff(settings.discord_token.get_secret_value())
        await bot.connect()


def main() -> None:
    """Entry point of `python -m bot`."""
    settings = load()
    from bot.cli.setup import preflight

    preflight(settings)  # the fast local checks of `lorabot doctor`; a critical failure ends here
    import discord  # here, not at import: every other `lorabot` command starts faster

    discord.utils.setup_logging(level=logging.INFO)
    try:
        asyncio.run(serve(settings))
    except discord.LoginFailure:
        _fail("Discord refused DISCORD_TOKEN (401); check the bot token")
    except KeyboardInterrupt:
        pass


def run() -> None:
    """Start the Discord bot (same as `python -m bot`)."""
    main()


def register(app: typer.Typer) -> None:
    app.command("run")(run)
