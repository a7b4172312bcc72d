"""/cancel job: the owner or an admin stops a job; the answer says what was destroyed and what it cost."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, UserFacingError, defer
from cogs.common import job_choices, job_for


class Cancel(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="cancel", description="Cancel a training job and destroy its GPU machine.")
    @app_commands.describe(job="The job id")
    @app_commands.autocomplete(job=job_choices)
    async def cancel(self, interaction: discord.Interaction, job: app_commands.Range[str, 4, 32]) -> None:
        await defer(interaction, ephemeral=True)
        bot = self.bot
        found = await job_for(bot, interaction, job, action="cancel")
        if found.state.terminal:
            raise UserFacingError(f"Job `{found.id}` is already {found.state.value}.")
        result = await bot.require_worker().cancel(found.id, by=interaction.user.display_name)
        text = embeds.cancel_result_text(result.job, result.destroyed_instance_id, result.cost_usd)
        await interaction.followup.send(bot.redact(text), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Cancel(bot))
