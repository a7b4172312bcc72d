"""/status [job]: state, progress, ETA, loss, cost so far and queue position."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, defer
from cogs.common import job_choices, job_for
from services.jobs.model import JobState


class Status(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="status", description="Show your training jobs, or one job in detail.")
    @app_commands.describe(job="A job id (leave empty for a list)")
    @app_commands.autocomplete(job=job_choices)
    async def status(self, interaction: discord.Interaction, job: app_commands.Range[str, 4, 32] | None = None) -> None:
        await defer(interaction, ephemeral=True)
        bot = self.bot
        worker = bot.worker
        if job is not None:
            found = await job_for(bot, interaction, job, action="see")
            pos = worker.queue_position(found.id) if worker else None
            e = embeds.status_embed(found, queue_position=pos)
            await interaction.followup.send(embed=bot.clean(e), ephemeral=True)
            return
        store = bot.require_store()
        admin = bot.is_admin(interaction)
        if admin:
            live = await store.live()
            recent = [j for j in await store.find(limit=10) if j.state.terminal]
            jobs = live + [j for j in recent if j.id not in {x.id for x in live}]
            title = "All jobs (live first)"
        else:
            jobs = await store.find(user_id=str(interaction.user.id), limit=25)
            jobs.sort(key=lambda j: (j.state.terminal, -j.created_at))
            title = "Your jobs"
        positions = {j.id: worker.queue_position(j.id) if worker else None for j in jobs
                     if j.state is JobState.QUEUED}
        e = embeds.jobs_embed(jobs, positions=positions, title=title)
        await interaction.followup.send(embed=bot.clean(e), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Status(bot))
