"""/cancel job: the owner or an admin stops a job, after a confirm step (the same buttons as the status
message's Cancel); the answer says what was destroyed and what it cost."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, UserFacingError, defer
from bot.controls import confirm_cancel_text, confirm_cancel_view
from cogs.common import job_for, live_job_choices


class Cancel(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="cancel", description="Cancel a training job and destroy its GPU machine.")
    @app_commands.describe(job="The job id")
    @app_commands.autocomplete(job=live_job_choices)
    async def cancel(self, interaction: discord.Interaction, job: app_commands.Range[str, 4, 32]) -> None:
        await defer(interaction, ephemeral=True)
        bot = self.bot
        found = await job_for(bot, interaction, job, action="cancel")
        if found.state.terminal:
            raise UserFacingError(f"Job `{found.id}` is already {found.state.value}.")
        await interaction.edit_original_response(content=embeds.message(bot.redact(confirm_cancel_text(found))),
                                                 view=confirm_cancel_view(found.id))


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Cancel(bot))
