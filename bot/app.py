"""The Discord process: `LoraBot` opens the job store, loads the cogs, starts the worker (with its
recovery of jobs a previous process left running) and syncs the slash commands when they changed.

Test-only: LORABOT_DISCORD_API_BASE and LORABOT_DISCORD_GATEWAY point discord.py at a fake Discord
(tests/sim/discord.py) by setting `discord.http.Route.BASE` and `DiscordWebSocket.DEFAULT_GATEWAY`.
They are deliberately not settings, are never needed in production, and are honoured only with
LORABOT_TEST_ENDPOINTS=1 (they would send the bot token to any URL).

Who may spend (issue 13): the bot acts only in the guilds of DISCORD_GUILD_ID. The tree refuses any
other interaction before a command runs; commands are registered in those guilds only (guild-only
contexts), global commands an earlier run left are removed, and a foreign guild is left.
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
TEST_ENDPOINTS_ENV = "LORABOT_TEST_ENDPOINTS"  # "1" allows the two above
FOREIGN_REFUSAL = "lorabot works only in its operator's server."
SHUTDOWN_FLUSH_S = 10.0


def apply_test_endpoints(environ: dict[str, str] | None = None) -> None:
    """Point discord.py at a fake Discord when the test-only variables are set, and only when
    LORABOT_TEST_ENDPOINTS=1 says this is a test: otherwise they are ignored with a warning."""
    env = os.environ if environ is None else environ
    base, gateway = env.get(API_BASE_ENV), env.get(GATEWAY_ENV)
    if (base or gateway) and env.get(TEST_ENDPOINTS_ENV) != "1":
        log.warning("ignoring %s/%s: test-only, set %s=1 to use them", API_BASE_ENV, GATEWAY_ENV,
                    TEST_ENDPOINTS_ENV)
        return
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
    """Every error becomes one ephemeral message; tracebacks only go to the log. Interactions from
    outside the allowed guilds (other guilds, DMs) get one ephemeral refusal and nothing else."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        bot = interaction.client
        if isinstance(bot, LoraBot) and bot.allowed_guild(interaction.guild_id):
            return True
        log.warning("refused /%s from user %s in %s", _name(interaction), interaction.user.id,
                    f"guild {interaction.guild_id}" if interaction.guild_id else "a DM")
        try:
            if interaction.type is discord.InteractionType.autocomplete:
                await interaction.response.autocomplete([])
            else:
                await interaction.response.send_message(embeds.error_text(FOREIGN_REFUSAL), ephemeral=True)
        except discord.HTTPException:
            pass
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        original: BaseException = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        await report_error(interaction, original)


async def report_error(interaction: discord.Interaction, error: BaseException) -> None:
    """Tell the user in one ephemeral line; log the traceback of anything unexpected."""
    if isinstance(error, app_commands.CommandOnCooldown):  # a CheckFailure too: test it first
        text = f"Slow down: you can use this command again in {error.retry_after:.0f}s."
    elif isinstance(error, (*_PLAIN, app_commands.CheckFailure)):
        text = str(error) or "You cannot use this command here."
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
            allowed_mentions=discord.AllowedMentions.none(),  # pings are opted into per message
            # guild-only commands, installed to guilds (not to users): no DMs, no foreign contexts
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
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
        self._redelivery: asyncio.Task[int] | None = None
        self.notifier = DiscordNotifier(self, settings, on_status_message=self._remember_status_message,
                                        on_fields=self._remember_fields)
        self.add_listener(self._leave_foreign_guilds, "on_ready")
        self.add_listener(self._on_guild_join, "on_guild_join")

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
        from bot.controls import DYNAMIC_ITEMS  # buttons that work after a restart (issue 15)

        self.add_dynamic_items(*DYNAMIC_ITEMS)
        for ext in EXTENSIONS:
            if ext not in self.extensions:  # a login retried after a failed sync loads them once
                await self.load_extension(ext)
        if self._sync_commands:
            self.synced = await self.sync_commands()
        from bot.delivery import redeliver_results  # issue 15: results a previous process could not deliver

        self._redelivery = asyncio.create_task(redeliver_results(self), name="lorabot-redeliver")

    async def close(self) -> None:
        if self._redelivery is not None:
            self._redelivery.cancel()
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

    async def _remember_fields(self, job_id: str, fields: dict[str, Any]) -> None:
        if self.store is not None:
            await self.store.update(job_id, **fields)

    def storage(self) -> Storage | None:
        """R2 for fresh links (/status, /link, redelivery): the worker's, else one from the settings."""
        if self.worker is not None and self.worker.storage is not None:
            return self.worker.storage
        if self._storage is None and self.settings.r2_bucket:
            self._storage = Storage.from_settings(self.settings)
        return self._storage

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
        # redact first, then fit: a secret cut in half by the fitting would no longer match
        return embeds.fit_embed(embeds.redact_embed(embed, self._secrets))

    # --- who may do what -------------------------------------------------------------------------
    def allowed_guild(self, guild_id: int | None) -> bool:
        """Whether the bot acts for this guild (a DM has none and is never allowed)."""
        return guild_id is not None and guild_id in self.settings.discord_guild_ids

    @staticmethod
    def _role_ids(user: discord.abc.User | discord.Member) -> set[int]:
        # ids only: anyone with Manage Roles can make a role with any name
        return {r.id for r in getattr(user, "roles", None) or []}

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Manage Server (or a role of LORABOT_ADMIN_ROLES) in an allowed guild; nothing elsewhere."""
        if not self.allowed_guild(interaction.guild_id):
            return False
        perms = interaction.permissions
        if perms.manage_guild or perms.administrator:
            return True
        return bool(set(self.settings.admin_roles) & self._role_ids(interaction.user))

    def can_train(self, interaction: discord.Interaction) -> bool:
        if not self.allowed_guild(interaction.guild_id):
            return False
        if not self.settings.train_roles or self.is_admin(interaction):
            return True
        return bool(set(self.settings.train_roles) & self._role_ids(interaction.user))

    async def _on_guild_join(self, guild: discord.Guild) -> None:
        if not self.allowed_guild(guild.id):
            await self._leave(guild, "added to a guild not in DISCORD_GUILD_ID")

    async def _leave_foreign_guilds(self) -> None:
        for guild in list(self.guilds):
            if not self.allowed_guild(guild.id):
                await self._leave(guild, "in a guild not in DISCORD_GUILD_ID")

    async def _leave(self, guild: discord.Guild, why: str) -> None:
        log.warning("%s: leaving guild %s (%s)", why, guild.id, guild.name)
        try:
            await guild.leave()
        except discord.HTTPException as exc:
            log.error("could not leave guild %s: %s", guild.id, exc)

    # --- command sync ----------------------------------------------------------------------------
    def command_payload(self) -> list[dict[str, Any]]:
        """What a sync sends: the tree's commands, copied to every allowed guild."""
        return [cmd.to_dict(self.tree) for cmd in self.tree.get_commands()]

    @property
    def sync_state_path(self) -> Path:
        db = Path(self.settings.db_path)
        return db.with_name(db.name + ".commands.json")

    def _payload_hash(self) -> str:
        doc = json.dumps(self.command_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync to the allowed guilds only when the payload changed, and remove global commands (an
        earlier run may have left some: they would work in every guild and in DMs). Returns whether
        anything was sent."""
        guilds = [discord.Object(id=gid) for gid in self.settings.discord_guild_ids]
        if not guilds:
            log.warning("DISCORD_GUILD_ID is not set: no slash commands are registered")
            return False
        scope = f"{self.application_id}:guilds:{','.join(str(g.id) for g in guilds)}"
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
        for guild in guilds:
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        assert self.application_id is not None
        await self.http.bulk_upsert_global_commands(self.application_id, payload=[])
        state[scope] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)
        log.info("slash commands synced (%s)", scope)
        return True
