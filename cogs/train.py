"""/train: dataset QA, a quote with Confirm / Cancel, then the job queue.

The setup conversation is ephemeral (only the requester sees the report, the quote and the
buttons); once confirmed, the job's progress is posted in the channel by the notifier.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, NotAllowed, UserFacingError, defer, report_error, send_ephemeral
from bot.preflight import preflight_text
from services.jobs.intake import decline, draft

log = logging.getLogger(__name__)

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


class ConfirmView(discord.ui.View):
    """Confirm / Cancel under a quote: only the requester may press; expires."""

    def __init__(self, bot: LoraBot, job_id: str, owner_id: int, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.bot = bot
        self.job_id = job_id
        self.owner_id = owner_id
        self.message: discord.WebhookMessage | None = None
        self.decided = False

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await send_ephemeral(interaction, embeds.error_text("Only the person who asked for this job can answer."))
            return False
        return True

    async def _close(self, interaction: discord.Interaction, footer: str) -> None:
        self.decided = True
        self.stop()
        for item in self.children:
            if isinstance(item, discord.ui.Button):
                item.disabled = True
        await interaction.response.edit_message(content=embeds.message(footer), view=self)

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.success, custom_id="lorabot:confirm")
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]) -> None:
        if self.decided:
            return
        await self._close(interaction, "Confirmed: queuing the job…")
        worker = self.bot.require_worker()
        try:
            position = await worker.submit(self.job_id)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await decline(self.bot.require_store(), self.job_id, f"refused: {exc}")
            raise
        where = "next to start" if position == 1 else f"number {position} in the queue"
        await interaction.followup.send(
            embeds.message(f"Job `{self.job_id}` is {where}. Its progress will be posted in this channel."),
            ephemeral=True,
        )

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary, custom_id="lorabot:decline")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]) -> None:
        if self.decided:
            return
        await self._close(interaction, "Cancelled: nothing was rented.")
        await decline(self.bot.require_store(), self.job_id, "declined by the requester")

    async def on_timeout(self) -> None:
        if self.decided:
            return
        self.decided = True
        await decline(self.bot.require_store(), self.job_id, "the quote expired unconfirmed")
        if self.message is not None:  # within the token's 15 minutes: the timeout is shorter
            with contextlib.suppress(discord.HTTPException):
                await self.message.edit(content="The quote expired; nothing was rented.", view=None)

    async def on_error(self, interaction: discord.Interaction, error: Exception,
                       item: discord.ui.Item[ConfirmView]) -> None:
        await report_error(interaction, error)


class Train(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="train", description="Train a FLUX LoRA on a zip of images (+ .txt captions).")
    @app_commands.describe(
        name="A name for the LoRA (letters, digits, - and _)",
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
    async def train(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 64],
        trigger_word: app_commands.Range[str, 1, 64],
        dataset: discord.Attachment | None = None,
        url: app_commands.Range[str, 8, 1000] | None = None,
        preset: Literal["character", "style", "fast"] | None = None,
        steps: app_commands.Range[int, 50, 20_000] | None = None,
        rank: app_commands.Range[int, 1, 128] | None = None,
        learning_rate: app_commands.Range[float, 1e-6, 10.0] | None = None,
        max_price: app_commands.Range[float, 0.01, 100.0] | None = None,
        dry_run: bool = False,
    ) -> None:
        bot = self.bot
        if not bot.can_train(interaction):
            raise NotAllowed("You need one of these roles to train: " + ", ".join(bot.settings.train_roles) + ".")
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
        source: str | bytes
        if dataset is not None:
            try:
                source = await dataset.read()
            except discord.HTTPException as exc:
                raise UserFacingError(f"Could not download `{dataset.filename}` from Discord ({exc.status}).") from None
            if len(source) > limit:
                raise UserFacingError(f"`{dataset.filename}` is larger than its announced size; refusing it.")
        else:
            assert url is not None
            source = url
        overrides = {k: v for k, v in {"steps": steps, "rank": rank, "learning_rate": learning_rate}.items()
                     if v is not None}
        store = bot.require_store()
        async with bot.vast() as client:
            d = await draft(
                store, bot.settings, source=source, user_id=str(interaction.user.id),
                user_name=interaction.user.display_name, origin="discord", name=name, trigger=trigger_word,
                preset=preset, overrides=overrides, max_price=max_price, guild_id=interaction.guild_id,
                channel_id=interaction.channel_id, vast=client,
            )
        shown: list[discord.Embed] = []
        if d.report is not None:
            shown.append(embeds.report_embed(d.report, name=name))
        if not d.ok:
            text = embeds.message(f"Not started: {d.message}" if d.message else "Not started.")
            await interaction.followup.send(bot.redact(text), embeds=[bot.clean(e) for e in
                                                                      embeds.fit_embeds(shown)], ephemeral=True)
            return
        shown.append(embeds.quote_embed(d.job, d.quote, d.offer, dry_run=dry_run))
        fitted = [bot.clean(e) for e in embeds.fit_embeds(shown)]
        if dry_run:
            await decline(store, d.job.id, "dry run")
            await interaction.followup.send("Dry run: nothing was rented.", embeds=fitted, ephemeral=True)
            return
        view = ConfirmView(bot, d.job.id, interaction.user.id, bot.settings.discord_confirm_timeout_s)
        msg = await interaction.followup.send(
            embeds.message(f"Rent a GPU and train **{name}**? The buttons expire in "
                           f"{embeds.fmt_duration(bot.settings.discord_confirm_timeout_s)}."),
            embeds=fitted, view=view, ephemeral=True, wait=True,
        )
        view.message = msg


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Train(bot))
