"""/status [job]: state, progress, ETA, loss, cost so far and queue position; for a finished job, its
owner (or an admin) gets a freshly presigned download link. /link job: the owner's fresh link."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, NotAllowed, UserFacingError, defer
from bot.delivery import fresh_link
from cogs.common import job_choices, job_for, owns
from services.jobs.model import Job, JobState


def hidden_by_default(job: Job) -> bool:
    """Dry runs and datasets refused at the quote: never rented, never queued, nothing to follow."""
    never_ran = job.state.terminal and job.rented_at is None
    return never_ran and (job.reason.startswith("dry run") or job.failure_kind == "user")


async def add_link(bot: LoraBot, e: discord.Embed, job: Job) -> discord.Embed:
    link = await fresh_link(bot, job)
    if link is None:
        e.add_field(name="download", value="No link: the LoRA is not in storage.", inline=False)
        return e
    url, expires = link
    when = f"expires {embeds.fmt_when(expires)}" if expires else "permanent link"
    e.add_field(name="download", value=f"**[Download the LoRA]({url})** · {when}", inline=False)
    return e


class Status(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="status", description="Show your training jobs, or one job in detail.")
    @app_commands.describe(job="A job id (leave empty for a list)",
                           everything="Also list dry runs and datasets refused at the quote")
    @app_commands.autocomplete(job=job_choices)
    async def status(self, interaction: discord.Interaction, job: app_commands.Range[str, 4, 32] | None = None,
                     everything: bool = False) -> None:
        await defer(interaction, ephemeral=True)
        bot = self.bot
        worker = bot.worker
        if job is not None:
            found = await job_for(bot, interaction, job, action="see")
            pos = worker.queue_position(found.id) if worker else None
            e = embeds.status_embed(found, queue_position=pos)
            if found.state is JobState.SUCCEEDED:  # job_for: the owner or an admin
                e = await add_link(bot, e, found)
            await interaction.edit_original_response(embed=bot.clean(e))
            return
        store = bot.require_store()
        admin = bot.is_admin(interaction)
        if admin:
            live = await store.live()
            recent = [j for j in await store.find(limit=50) if j.state.terminal]
            jobs = live + [j for j in recent if j.id not in {x.id for x in live}]
            title = "All jobs (live first)"
        else:
            jobs = await store.find(user_id=str(interaction.user.id), limit=100)
            jobs.sort(key=lambda j: (j.state.terminal, -j.created_at))
            title = "Your jobs"
        if not everything:
            jobs = [j for j in jobs if not hidden_by_default(j)]
        jobs = jobs[:25]
        positions = {j.id: worker.queue_position(j.id) if worker else None for j in jobs
                     if j.state is JobState.QUEUED}
        e = embeds.jobs_embed(jobs, positions=positions, title=title)
        await interaction.edit_original_response(embed=bot.clean(e))

    @app_commands.command(name="link", description="A fresh download link for your finished LoRA.")
    @app_commands.describe(job="The job id")
    @app_commands.autocomplete(job=job_choices)
    async def link(self, interaction: discord.Interaction, job: app_commands.Range[str, 4, 32]) -> None:
        await defer(interaction, ephemeral=True)
        bot = self.bot
        found = await bot.require_store().get(job.strip().lower())
        if found is None:
            raise UserFacingError(f"There is no job `{job}`.")
        if not owns(interaction, found):
            raise NotAllowed(f"Job `{found.id}` belongs to someone else; only they can get its link.")
        if found.state is not JobState.SUCCEEDED:
            raise UserFacingError(f"Job `{found.id}` is {found.state.value}: there is no LoRA to link to yet.")
        e = discord.Embed(title=f"✅ {found.name or 'LoRA'}", color=embeds.COLOR_OK)
        e = await add_link(bot, e, found)
        e.set_footer(text=f"job {found.id} · trigger word: {found.trigger_word or '?'}")
        await interaction.edit_original_response(embed=bot.clean(e))


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Status(bot))
