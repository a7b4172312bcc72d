"""Buttons that keep working after a restart: dynamic items whose custom_id carries the job id
(`lorabot:<action>:<job>`), registered once with `bot.add_dynamic_items`.

- Cancel job (on the status message; /cancel shows the same confirm step): owner or admin only, then
  an ephemeral "really cancel?" with Yes / Keep it.
- Confirm / Cancel under a quote: only the requester; the quote message is edited to say what
  happened (queued with a link to the status message, or why not).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import discord

from bot import embeds
from services.jobs.intake import decline
from services.jobs.model import Job, JobState

if TYPE_CHECKING:
    from bot.app import LoraBot

log = logging.getLogger(__name__)
JOB = r"(?P<job>[0-9a-z]{4,32})"
STATUS_LINK_WAIT_S = 3.0  # how long the confirmation waits for the status message to link to


def _bot(interaction: discord.Interaction) -> LoraBot:
    from bot.app import LoraBot

    bot = interaction.client
    assert isinstance(bot, LoraBot)
    return bot


async def _say(interaction: discord.Interaction, text: str) -> None:
    from bot.app import send_ephemeral

    await send_ephemeral(interaction, embeds.error_text(_bot(interaction).redact(text)))


async def _job(interaction: discord.Interaction, job_id: str) -> Job | None:
    job = await _bot(interaction).require_store().get(job_id)
    if job is None:
        await _say(interaction, f"There is no job `{job_id}` any more.")
    return job


def jump_url(job: Job, message_id: int | None = None) -> str | None:
    mid = message_id or job.status_message_id
    if mid is None or job.channel_id is None:
        return None
    return f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{mid}"


class _JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"lorabot:_:" + JOB):
    action = "_"
    label = "?"
    style = discord.ButtonStyle.secondary

    def __init__(self, job_id: str) -> None:
        super().__init__(discord.ui.Button(label=self.label, style=self.style,
                                           custom_id=f"lorabot:{self.action}:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> _JobButton:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            await self.run(interaction)
        except Exception as exc:
            from bot.app import report_error

            await report_error(interaction, exc)

    async def run(self, interaction: discord.Interaction) -> None:
        raise NotImplementedError


# --- cancelling a running job -------------------------------------------------------------------
def may_cancel(interaction: discord.Interaction, job: Job) -> bool:
    return job.user_id == str(interaction.user.id) or _bot(interaction).is_admin(interaction)


def confirm_cancel_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelYesButton(job_id))
    view.add_item(CancelNoButton(job_id))
    return view


def confirm_cancel_text(job: Job) -> str:
    running = job.instance_id is not None and job.instance_gone_at is None
    what = "its GPU machine is destroyed" if running else "nothing is running yet"
    return (f"Really cancel job `{job.id}` (**{job.name or '?'}**)? It has cost "
            f"{embeds.fmt_money(job.cost_so_far())} so far; {what}.")  # callers redact, then fit


class CancelJobButton(_JobButton, template=r"lorabot:cancel:" + JOB):
    """On the status message: opens the confirm step for the owner or an admin."""

    action, label, style = "cancel", "Cancel job", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction) -> None:
        job = await _job(interaction, self.job_id)
        if job is None:
            return
        if not may_cancel(interaction, job):
            await _say(interaction, "Only the person who started this job or an admin can cancel it.")
            return
        if job.state.terminal:
            await _say(interaction, f"Job `{job.id}` is already {job.state.value}.")
            return
        text = embeds.message(_bot(interaction).redact(confirm_cancel_text(job)))
        await interaction.response.send_message(text, view=confirm_cancel_view(job.id), ephemeral=True)


class CancelYesButton(_JobButton, template=r"lorabot:cancelyes:" + JOB):
    action, label, style = "cancelyes", "Yes, cancel it", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction) -> None:
        bot = _bot(interaction)
        job = await _job(interaction, self.job_id)
        if job is None:
            return
        if not may_cancel(interaction, job):
            await _say(interaction, "Only the person who started this job or an admin can cancel it.")
            return
        if job.state.terminal:
            await interaction.response.edit_message(content=f"Job `{job.id}` is already {job.state.value}.",
                                                    view=None)
            return
        await interaction.response.edit_message(content=f"Cancelling job `{job.id}`…", view=None)
        result = await bot.require_worker().cancel(job.id, by=interaction.user.display_name)
        text = embeds.cancel_result_text(result.job, result.destroyed_instance_id, result.cost_usd)
        await interaction.edit_original_response(content=embeds.message(bot.redact(text)))


class CancelNoButton(_JobButton, template=r"lorabot:cancelno:" + JOB):
    action, label = "cancelno", "Keep it running"

    async def run(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(content=f"Job `{self.job_id}` keeps running.", view=None)


def status_view(job: Job) -> discord.ui.View | None:
    """The Cancel button under a live job's status message (None once it has ended: no buttons)."""
    if job.state.terminal:
        return None
    view = discord.ui.View(timeout=None)
    view.add_item(CancelJobButton(job.id))
    return view


# --- the quote ----------------------------------------------------------------------------------------
def quote_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(QuoteConfirmButton(job_id))
    view.add_item(QuoteDeclineButton(job_id))
    return view


async def _open_quote(interaction: discord.Interaction, job_id: str) -> Job | None:
    """The job behind a quote, if the presser asked for it and the quote is still open."""
    bot = _bot(interaction)
    job = await _job(interaction, job_id)
    if job is None:
        return None
    if job.user_id != str(interaction.user.id):
        await _say(interaction, "Only the person who asked for this job can answer.")
        return None
    if job.state is not JobState.AWAITING_CONFIRMATION:
        await interaction.response.edit_message(
            content=f"This quote is closed: job `{job.id}` is {job.state.value}.", view=None)
        return None
    if job.confirm_by is not None and time.time() > job.confirm_by:
        await decline(bot.require_store(), job.id, "the quote expired unconfirmed")
        await interaction.response.edit_message(content="The quote expired; nothing was rented.", view=None)
        return None
    return job


class QuoteConfirmButton(_JobButton, template=r"lorabot:confirm:" + JOB):
    action, label, style = "confirm", "Confirm", discord.ButtonStyle.success

    async def run(self, interaction: discord.Interaction) -> None:
        from bot.app import _PLAIN

        bot = _bot(interaction)
        job = await _open_quote(interaction, self.job_id)
        if job is None:
            return
        await interaction.response.edit_message(content="Confirmed: queuing the job…", view=None)
        try:
            position = await bot.require_worker().submit(job.id)
        except Exception as exc:
            await decline(bot.require_store(), job.id, f"refused: {exc}")
            why = str(exc) if isinstance(exc, _PLAIN) else "the queue refused it (see the log)"
            if not isinstance(exc, _PLAIN):
                log.exception("submitting job %s failed", job.id)
            # never "Confirmed" followed by nothing: the quote itself says it did not start
            await interaction.edit_original_response(content=embeds.message(bot.redact(f"Not started: {why}")))
            return
        where = "next to start" if position == 1 else f"number {position} in the queue"
        link = await _status_link(bot, job.id)
        follow = f"Progress: {link}" if link else "Its progress will be posted in this channel."
        await interaction.edit_original_response(
            content=embeds.message(f"Job `{job.id}` is {where}. {follow} Cancel it with the button there "
                                   f"or `/cancel {job.id}`."))


async def _status_link(bot: LoraBot, job_id: str) -> str | None:
    """The status message's jump link, once the notifier has posted it (briefly waited for)."""
    deadline = time.monotonic() + STATUS_LINK_WAIT_S
    while True:
        job = await bot.require_store().get(job_id)
        if job is not None and (url := jump_url(job)) is not None:
            return url
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.1)


class QuoteDeclineButton(_JobButton, template=r"lorabot:decline:" + JOB):
    action, label = "decline", "Cancel"

    async def run(self, interaction: discord.Interaction) -> None:
        bot = _bot(interaction)
        job = await _open_quote(interaction, self.job_id)
        if job is None:
            return
        # recorded first (a store write, well inside the 3 s): the message never claims what did not happen
        await decline(bot.require_store(), job.id, "declined by the requester")
        await interaction.response.edit_message(content="Cancelled: nothing was rented.", view=None)


DYNAMIC_ITEMS: tuple[type[discord.ui.DynamicItem[Any]], ...] = (
    CancelJobButton, CancelYesButton, CancelNoButton, QuoteConfirmButton, QuoteDeclineButton)
