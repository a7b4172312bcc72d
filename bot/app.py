"""The Discord process: `LoraBot` opens the job store, loads the cogs, starts the worker (with its
recovery of jobs a previous process left running) and syncs the slash commands when they changed.

Test-only: LORABOT_DISCORD_API_BASE and LORABOT_DISCORD_GATEWAY point discord.py at a fake Discord
(tests/sim/discord.py) by setting `discord.http.Route.BASE` and `DiscordWebSocket.DEFAULT_GATEWAY`.
They are deliberately not settings and are never needed in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.notifier import DiscordNotifier
from services.dataset import DatasetError
from services.jobs.errors import JobRefused
from services.jobs.store import JobStore
from services.jobs.worker import Worker
from services.recipe import RecipeError
from services.settings import Settings, SettingsError, redact
from services.storage import Storage
from services.vastai import VastAuthError, VastClient, VastError

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.offers", "cogs.train", "cogs.status", "cogs.cancel", "cogs.admin")
API_BASE_ENV = "LORABOT_DISCORD_API_BASE"  # test-only
GATEWAY_ENV = "LORABOT_DISCORD_GATEWAY"  # test-only
SHUTDOWN_FLUSH_S = 10.0


def apply_test_endpoints(environ: dict[str, str] | None = None) -> None:
    """Point discord.py at a fake Discord when the test-only variables are set."""
    env = os.environ if environ is None else environ
    base, gateway = env.get(API_BASE_ENV), env.get(GATEWAY_ENV)
    if base:
        discord.http.Route.BASE = base.rstrip("/")
    if gateway:
        import yarl

        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


class UserFacingError(app_commands.AppCommandError):
    """An error whose message is meant for the person who typed the command."""


class NotAllowed(app_commands.CheckFailure):
    pass


# errors from services whose text is already one clear line for a person
_PLAIN = (JobRefused, DatasetError, RecipeError, SettingsError, UserFacingError)


class LoraTree(app_commands.CommandTree):
    """Every error becomes one ephemeral message; tracebacks only go to the log."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        original: BaseException = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        await report_error(interaction, original)


async def report_error(interaction: discord.Interaction, error: BaseException) -> None:
    """Tell the user in one ephemeral line; log the traceback of anything unexpected."""
    if isinstance(error, (*_PLAIN, app_commands.CheckFailure)):
        text = str(error) or "You cannot use this command here."
    elif isinstance(error, app_commands.CommandOnCooldown):
        text = f"Slow down: try again in {error.retry_after:.0f}s."
    elif isinstance(error, app_commands.TransformerError):
        text = f"That value is not valid: {error.value!r}."
    elif isinstance(error, VastAuthError):
        text = "The bot cannot log in to Vast.ai; tell the operator."
        log.error("vast auth error in /%s: %s", _name(interaction), error)
    elif isinstance(error, VastError):
        text = f"Vast.ai did not answer as expected: {error}"
    elif isinstance(error, app_commands.CommandNotFound):
        text = "This command is not known (any more); the commands may be syncing."
    else:
        ref = uuid.uuid4().hex[:8]
        log.error("unhandled error in /%s (ref %s):\n%s", _name(interaction), ref,
                  "".join(traceback.format_exception(error)))
        text = f"Something went wrong on our side (ref `{ref}`). The operator can find it in the log."
    bot = interaction.client
    if isinstance(bot, LoraBot):
        text = bot.redact(text)
    await send_ephemeral(interaction, embeds.error_text(text))


def _name(interaction: discord.Interaction) -> str:
    return interaction.command.qualified_name if interaction.command else "?"


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """One ephemeral message, whatever state the interaction is in."""
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(text, ephemeral=True)
            return
        if interaction.extras.get("public_defer"):
            # the public "thinking…" message would show the error to everyone: drop it first
            try:
                await interaction.delete_original_response()
            except discord.HTTPException:
                pass
            interaction.extras["public_defer"] = False
        await interaction.followup.send(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not tell the user about an error in /%s", _name(interaction))


async def defer(interaction: discord.Interaction, *, ephemeral: bool) -> None:
    """Acknowledge at once (Discord's 3-second rule), remembering whether it was public."""
    interaction.extras["public_defer"] = not ephemeral
    await interaction.response.defer(thinking=True, ephemeral=ephemeral)


def _shield_requests(http: discord.http.HTTPClient) -> None:
    """Make every REST request finish even when its caller is cancelled (a cancelled job, a timeout).

    discord.py 2.x clears its global rate-limit event before sleeping out a global 429 and sets it
    again only after the sleep: a request cancelled in that sleep leaves every later request of the
    client waiting forever. Each request runs as its own task; a cancelled caller just stops waiting."""
    request = http.request

    async def shielded(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.ensure_future(request(*args, **kwargs))
        # a result nobody waits for any more must not be reported as "never retrieved"
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    setattr(http, "request", shielded)  # noqa: B010 - an instance override of a library method


class LoraBot(commands.Bot):
    def __init__(
        self,
        settings: Settings,
        *,
        vast_factory: Callable[[], VastClient] | None = None,
        storage: Storage | None = None,
        start_worker: bool = True,
        sync_commands: bool = True,
        **options: Any,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=LoraTree,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            **options,
        )
        _shield_requests(self.http)
        self.settings = settings
        self._vast_factory = vast_factory or (lambda: VastClient.from_settings(settings))
        self._storage = storage
        self._start_worker = start_worker
        self._sync_commands = sync_commands
        self._secrets = settings.secret_values()
        self.store: JobStore | None = None
        self.worker: Worker | None = None
        self.synced: bool | None = None  # after setup: whether this start sent the commands
        self.notifier = DiscordNotifier(self, settings, on_status_message=self._remember_status_message)

    # --- lifecycle ----------------------------------------------------------------------------
    async def start_services(self) -> None:
        """The store and the worker (recovery, leases, reaper, watchdogs). `serve` runs this before
        the Discord login: a revoked token or a Discord outage never leaves a rented box undriven."""
        if self.store is None:
            self.store = await JobStore(self.settings.db_path).open()
        if self._start_worker and self.worker is None:
            self.worker = Worker(self.store, self.settings, self.notifier, vast_factory=self._vast_factory,
                                 storage=self._storage)
            await self.worker.start()  # recovers jobs a previous process left running

    async def login_with_backoff(self, token: str) -> None:
        """Log in to Discord, retrying with backoff for as long as it takes (the worker keeps going)."""
        delay = self.settings.discord_login_backoff_s
        while True:
            try:
                await self.login(token)
                return
            except discord.LoginFailure:
                log.error("Discord refused DISCORD_TOKEN (401): check the bot token. Jobs keep running; "
                          "retrying the login in %.0f s", delay)
            except Exception as exc:  # an outage, a 5xx, a network error: all retried, all logged
                log.error("cannot log in to Discord (%s: %s); jobs keep running; retrying in %.0f s",
                          type(exc).__name__, exc, delay)
            with contextlib.suppress(Exception):
                await self.http.close()  # a failed login leaves its HTTP session (and connector) open
            self.http.connector = discord.utils.MISSING  # the next login makes a fresh one
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.discord_login_backoff_max_s)

    async def setup_hook(self) -> None:
        await self.start_services()
        for ext in EXTENSIONS:
            if ext not in self.extensions:  # a login retried after a failed sync loads them once
                await self.load_extension(ext)
        if self._sync_commands:
            self.synced = await self.sync_commands()

    async def close(self) -> None:
        try:
            # a slow or rate-limited Discord must not hold up a shutdown
            async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                await self.notifier.flush()
        except TimeoutError:
            log.warning("status messages not flushed within %.0f s of shutting down", SHUTDOWN_FLUSH_S)
        except Exception:
            log.exception("flushing status messages failed")
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
        await self.notifier.close()
        if self.store is not None:
            await self.store.close()
            self.store = None
        await super().close()

    async def _remember_status_message(self, job_id: str, message_id: int) -> None:
        if self.store is not None:
            await self.store.update(job_id, status_message_id=message_id)

    # --- services the cogs use ------------------------------------------------------------------
    def vast(self) -> VastClient:
        """A fresh Vast.ai client; use as `async with bot.vast() as client:`."""
        return self._vast_factory()

    def require_store(self) -> JobStore:
        if self.store is None:
            raise UserFacingError("The bot is still starting; try again in a moment.")
        return self.store

    def require_worker(self) -> Worker:
        if self.worker is None:
            raise UserFacingError("The job queue is not running on this bot.")
        return self.worker

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def clean(self, embed: discord.Embed) -> discord.Embed:
        return embeds.redact_embed(embeds.fit_embed(embed), self._secrets)

    # --- who may do what -------------------------------------------------------------------------
    @staticmethod
    def _role_names(user: discord.abc.User | discord.Member) -> set[str]:
        roles = getattr(user, "roles", None) or []
        return {r.name for r in roles} | {str(r.id) for r in roles}

    def is_admin(self, interaction: discord.Interaction) -> bool:
        perms = interaction.permissions
        if perms.manage_guild or perms.administrator:
            return True
        wanted = set(self.settings.admin_roles)
        return bool(wanted & self._role_names(interaction.user))

    def can_train(self, interaction: discord.Interaction) -> bool:
        if not self.settings.train_roles or self.is_admin(interaction):
            return True
        return bool(set(self.settings.train_roles) & self._role_names(interaction.user))

    # --- command sync ----------------------------------------------------------------------------
    def _sync_guild(self) -> discord.Object | None:
        gid = self.settings.discord_guild_id
        return discord.Object(id=gid) if gid else None

    def command_payload(self) -> list[dict[str, Any]]:
        """What a sync sends: the global commands (copied to the guild when one is configured)."""
        return [cmd.to_dict(self.tree) for cmd in self.tree.get_commands()]

    @property
    def sync_state_path(self) -> Path:
        db = Path(self.settings.db_path)
        return db.with_name(db.name + ".commands.json")

    def _payload_hash(self) -> str:
        doc = json.dumps(self.command_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync to the configured guild (or globally) only when the payload changed. Returns
        whether anything was sent."""
        guild = self._sync_guild()
        scope = f"{self.application_id}:{guild.id if guild else 'global'}"
        digest = self._payload_hash()
        state: dict[str, str] = {}
        path = self.sync_state_path
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if not force and state.get(scope) == digest:
            log.info("slash commands unchanged (%s); not syncing", scope)
            return False
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        await self.tree.sync(guild=guild)
        state[scope] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)
        log.info("slash commands synced (%s)", scope)
        return True
