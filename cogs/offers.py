"""/offers: the best GPU offers right now, and the one the bot would rent."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import embeds
from bot.app import LoraBot, defer
from cogs.common import per_user_cooldown
from services.jobs.intake import offer_query


class Offers(commands.Cog):
    def __init__(self, bot: LoraBot) -> None:
        self.bot = bot

    @app_commands.command(name="offers", description="Show the cheapest good GPU offers on Vast.ai right now.")
    @app_commands.describe(
        gpu="GPU model, e.g. RTX 4090 (default: the one the bot trains on)",
        region="Country code(s), comma separated, e.g. US or DE,NL",
        max_price="Highest price in $ per hour",
        limit="How many offers to show (1-10)",
    )
    @per_user_cooldown("discord_offers_cooldown_s")
    async def offers(
        self,
        interaction: discord.Interaction,
        gpu: app_commands.Range[str, 1, 40] | None = None,
        region: app_commands.Range[str, 2, 40] | None = None,
        max_price: app_commands.Range[float, 0.01, 100.0] | None = None,
        limit: app_commands.Range[int, 1, 10] = 5,
    ) -> None:
        await defer(interaction, ephemeral=False)
        s = self.bot.settings
        job_query = offer_query(s, max_price)  # what /train would rent
        regions = [r.strip().upper() for r in region.split(",") if r.strip()] if region else []
        shown_query = job_query.model_copy(update={
            "gpu_name": gpu or s.gpu_name,
            "regions": regions,
            "max_dph": max_price if max_price is not None else job_query.max_dph,
            "limit": max(limit, 10),
        })
        same = shown_query.gpu_name == job_query.gpu_name and not regions
        async with self.bot.vast() as client:
            found = (await client.search_offers(shown_query))[:limit]
            if same:
                would_pay = found[0] if found else None
            else:
                best = await client.search_offers(job_query)
                would_pay = best[0] if best else None
        e = embeds.offers_embed(found, gpu=gpu or s.gpu_name, max_price=shown_query.max_dph, region=region,
                                would_pay=would_pay)
        await interaction.edit_original_response(embed=self.bot.clean(e))


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, LoraBot)
    await bot.add_cog(Offers(bot))
