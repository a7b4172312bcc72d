"""Helpers shared by the job cogs (not an extension): job lookup with ownership, id autocomplete."""

from __future__ import annotations

from typing import Any

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


def per_user_cooldown(setting: str) -> Any:
    """discord.py's cooldown check, one bucket per user, its length read from the settings (0: none)."""

    def factory(interaction: discord.Interaction) -> app_commands.Cooldown | None:
        bot = interaction.client
        seconds = float(getattr(bot.settings, setting, 0.0)) if isinstance(bot, LoraBot) else 0.0
        return app_commands.Cooldown(1, seconds) if seconds > 0 else None

    return app_commands.checks.dynamic_cooldown(factory, key=lambda i: i.user.id)


async def live_job_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete for /cancel: only jobs that are still running or waiting."""
    return await _choices(interaction, current, live_only=True)


async def job_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete: the user's jobs (all jobs for admins), newest first, matching what was typed."""
    return await _choices(interaction, current, live_only=False)


async def _choices(interaction: discord.Interaction, current: str, *,
                   live_only: bool) -> list[app_commands.Choice[str]]:
    """Autocomplete: the user's jobs (all jobs for admins), newest first, matching what was typed."""
    bot = interaction.client
    if not isinstance(bot, LoraBot) or bot.store is None:
        return []
    user = None if bot.is_admin(interaction) else str(interaction.user.id)
    jobs = await bot.store.find(user_id=user, limit=100)
    if live_only:
        jobs = [j for j in jobs if not j.state.terminal]
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
