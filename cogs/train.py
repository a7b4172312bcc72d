"""/train: dataset QA, a quote with Confirm / Cancel, then the job queue.

The setup conversation is ephemeral (only the requester sees the report, the quote and the
buttons); once confirmed, the job's progress is posted in the channel by the notifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, NotAllowed, UserFacingError, defer
from bot.attachments import attachment_fetch
from bot.controls import quote_view
from bot.preflight import preflight_text
from cogs.common import per_user_cooldown
from services.jobs.intake import Fetch, decline, draft
from services.jobs.model import JobState

log = logging.getLogger(__name__)

QUOTE_MIN_OPEN_S = 120.0  # the quote's buttons stay open at least this long inside the token
ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip", "multipart/x-zip",
             "application/octet-stream"}


def check_attachment(att: discord.Attachment, limit_bytes: int) -> None:
    """Size and type, before a byte is downloaded."""
    if not att.filename.lower().endswith(".zip"):
        raise UserFacingError(f"The dataset must be a .zip of images and .txt captions, not `{att.filename}`.")
    ctype = (att.content_type or "").split(";")[0].strip().lower()
    if ctype and ctype not in ZIP_TYPES:
        raise UserFacingError(f"`{att.filename}` is not a zip file (Discord says {ctype}).")
    if att.size <= 0:
        raise UserFacingError(f"`{att.filename}` is empty.")
    if att.size > limit_bytes:
        raise UserFacingError(
            f"`{att.filename}` is {att.size / 1024**2:.1f} MiB; the limit is {limit_bytes / 1024**2:.0f} MiB. "
            "Upload it somewhere and pass its https link as `url`."
        )


TOKEN_LIFE_S = 15 * 60  # an interaction token's life: every answer to /train must fit in it
TOKEN_MARGIN_S = 60.0  # room for the last answer itself


def token_deadline(interaction: discord.Interaction) -> float:
    """Wall time by which /train must have said its last word through the interaction token."""
    return interaction.created_at.timestamp() + TOKEN_LIFE_S - TOKEN_MARGIN_S


async def expire_quote(bot: LoraBot, interaction: discord.Interaction, job_id: str, at: float) -> None:
    """When the quote's time is up: decline the job (if still unanswered) and say so on the quote,
    through the /train token, which is still alive (`at` is inside it)."""
    await asyncio.sleep(max(0.0, at - time.time()))
    store = bot.store
    if store is None:
        return
    job = await store.get(job_id)
    if job is None or job.state is not JobState.AWAITING_CONFIRMATION:
        return
    await decline(store, job_id, "the quote expired unconfirmed")
    with contextlib.suppress(discord.HTTPException):
        await interaction.edit_original_response(content="The quote expired; nothing was rented.", view=None)


class Train(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot
        self._timers: set[asyncio.Task[None]] = set()

    async def cog_unload(self) -> None:
        for task in self._timers:
            task.cancel()

    @app_commands.command(name="train", description="Train a FLUX LoRA on a zip of images (+ .txt captions).")
    @app_commands.describe(
        name="A name for the LoRA (letters, digits, spaces, '.', '-' and '_')",
        trigger_word="The word that will call up your subject in prompts",
        dataset="A .zip of images with optional .txt captions",
        url="Or an https link to the .zip",
        preset="character, style or fast (default: character)",
        steps="Training steps (default from the preset)",
        rank="LoRA rank (default from the preset)",
        learning_rate="Learning rate (default from the preset)",
        max_price="Highest GPU price in $ per hour",
        dry_run="Check the dataset and show the quote, rent nothing",
    )
    @per_user_cooldown("discord_train_cooldown_s")
    async def train(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 64],
        trigger_word: app_commands.Range[str, 1, 64],
        dataset: discord.Attachment | None = None,
        url: app_commands.Range[str, 8, 1000] | None = None,
        preset: Literal["character", "style", "fast"] | None = None,
        steps: app_commands.Range[int, 50, 20_000] | None = None,
        rank: Literal[4, 8, 16, 32, 64, 128] | None = None,
        learning_rate: app_commands.Range[float, 1e-6, 1e-2] | None = None,
        max_price: app_commands.Range[float, 0.01, 100.0] | None = None,
        dry_run: bool = False,
    ) -> None:
        bot = self.bot
        if not bot.can_train(interaction):
            raise NotAllowed("You need one of these roles to train: "
                             + ", ".join(f"<@&{rid}>" for rid in bot.settings.train_roles) + ".")
        refusal = preflight_text(interaction)  # before anything is downloaded or rented (issue 15)
        if refusal is not None:
            raise UserFacingError(refusal)
        if (dataset is None) == (url is None):
            raise UserFacingError("Give the dataset either as an attachment (`dataset`) or as a link (`url`), "
                                  "not both and not neither.")
        limit = min(bot.settings.dataset_max_bytes, bot.settings.discord_max_attachment_mb * 1024**2)
        if dataset is not None:
            check_attachment(dataset, limit)  # before deferring would be faster, but both are instant
        elif url is not None and not url.lower().startswith("https://"):
            raise UserFacingError("The link must start with https://")
        await defer(interaction, ephemeral=True)
        overrides = {k: v for k, v in {"steps": steps, "rank": rank, "learning_rate": learning_rate}.items()
                     if v is not None}
        store = bot.require_store()
        deadline = token_deadline(interaction)
        # download + QA + quote must end while the token can still answer (15 min), with room for
        # the buttons; past that the user would sit on "thinking…" forever
        try:
            async with asyncio.timeout(max(1.0, deadline - QUOTE_MIN_OPEN_S - time.time())):
                source: str | Fetch
                if dataset is not None:
                    # streamed to disk by the intake, under its semaphore and after the per-user limits
                    source = attachment_fetch(dataset, limit)
                else:
                    assert url is not None
                    source = url
                async with bot.vast() as client:
                    d = await draft(
                        store, bot.settings, source=source, user_id=str(interaction.user.id),
                        user_name=interaction.user.display_name, origin="discord", name=name,
                        trigger=trigger_word, preset=preset, overrides=overrides, max_price=max_price,
                        guild_id=interaction.guild_id, channel_id=interaction.channel_id, vast=client,
                    )
        except TimeoutError:
            raise UserFacingError("Fetching and checking the dataset took longer than Discord lets me answer "
                                  "(15 min); nothing was rented. Try a smaller dataset or a faster link.") from None
        shown: list[discord.Embed] = []
        if d.report is not None:
            shown.append(embeds.report_embed(d.report, name=name))
        if not d.ok:
            text = embeds.message(bot.redact(f"Not started: {d.message}" if d.message else "Not started."))
            await interaction.edit_original_response(content=text,
                                                     embeds=[bot.clean(e) for e in embeds.fit_embeds(shown)])
            return
        shown.append(embeds.quote_embed(d.job, d.quote, d.offer, dry_run=dry_run))
        fitted = embeds.fit_embeds([embeds.redact_embed(e, bot.settings.secret_values()) for e in shown])
        if dry_run:
            await decline(store, d.job.id, "dry run")
            await interaction.edit_original_response(content="Dry run: nothing was rented.", embeds=fitted)
            return
        # the buttons stay pressable until the setting's time or the token's end, whichever is first
        confirm_by = min(time.time() + bot.settings.discord_confirm_timeout_s, deadline)
        await store.update(d.job.id, confirm_by=confirm_by)
        await interaction.edit_original_response(
            content=embeds.message(f"Rent a GPU and train **{name}**? The buttons expire "
                                   f"{embeds.fmt_when(confirm_by)}."),
            embeds=fitted, view=quote_view(d.job.id),
        )
        timer = asyncio.create_task(expire_quote(bot, interaction, d.job.id, confirm_by),
                                    name=f"quote-expiry-{d.job.id}")
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Train(bot))
