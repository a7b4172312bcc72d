"""Helpers shared by the job cogs (not an extension): job lookup with ownership, id autocomplete."""

from __future__ import annotations

import discord
from discord import app_commands

from bot.app import LoraBot, NotAllowed, UserFacingError
from services.jobs.model import Job


def owns(interaction: discord.Interaction, job: Job) -> bool:
    return job.user_id == str(interaction.user.id)


async def job_for(bot: LoraBot, interaction: discord.Interaction, job_id: str, *, action: str) -> Job:
    """The job, if the user may `action` it (owner or admin); one clear error otherwise."""
    job = await bot.require_store().get(job_id.strip().lower())
    if job is None:
        raise UserFacingError(f"There is no job `{job_id}`.")
    if not owns(interaction, job) and not bot.is_admin(interaction):
        raise NotAllowed(f"Job `{job.id}` belongs to someone else; only they or an admin can {action} it.")
    return job


async def job_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete: the user's jobs (all jobs for admins), newest first, matching what was typed."""
    bot = interaction.client
    if not isinstance(bot, LoraBot) or bot.store is None:
        return []
    user = None if bot.is_admin(interaction) else str(interaction.user.id)
    jobs = await bot.store.find(user_id=user, limit=100)
    current = current.strip().lower()
    out = []
    for job in jobs:
        label = f"{job.id} · {job.name or '?'} · {job.state.value}"
        if current and current not in job.id and current not in (job.name or "").lower():
            continue
        out.append(app_commands.Choice(name=label[:100], value=job.id))
        if len(out) == 25:  # Discord's limit
            break
    return out
