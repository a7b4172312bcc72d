"""Admin commands: /reconcile (orphaned rented machines) and /balance (Vast.ai credit)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, NotAllowed, defer


def admin_only(interaction: discord.Interaction) -> bool:
    bot = interaction.client
    if isinstance(bot, LoraBot) and bot.is_admin(interaction):
        return True
    raise NotAllowed("Only admins (Manage Server, or an admin role) can use this command.")


class Admin(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="reconcile", description="Admin: find (and destroy) rented machines no job owns.")
    @app_commands.describe(destroy="Destroy what is found (default: only list it)")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.check(admin_only)
    async def reconcile(self, interaction: discord.Interaction, destroy: bool = False) -> None:
        await defer(interaction, ephemeral=True)
        found = await self.bot.require_worker().reconcile(destroy)
        text = embeds.message(self.bot.redact(embeds.instances_text(found, destroy)))  # redact, then fit
        await interaction.edit_original_response(content=text)

    @app_commands.command(name="balance", description="Admin: the Vast.ai account's credit.")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.check(admin_only)
    async def balance(self, interaction: discord.Interaction) -> None:
        await defer(interaction, ephemeral=True)
        async with self.bot.vast() as client:
            b = await client.balance()
        await interaction.edit_original_response(content=f"Vast.ai credit: {embeds.fmt_money(b.credit)}")


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Admin(bot))
