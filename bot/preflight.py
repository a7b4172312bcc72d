"""/train's check of what the bot may do in the channel, before anything is downloaded or rented.

Interaction replies go through the webhook and work without any channel permission, so a /train in a
channel where the bot cannot post would look fine until the first progress message, after the GPU is
rented. `interaction.app_permissions` is what the bot has in the source channel (threads included).
"""

from __future__ import annotations

import discord

from bot.permissions import REQUIRED_PERMISSIONS


def _label(flag: str) -> str:
    return {"view_channel": "View Channel", "send_messages_in_threads": "Send Messages in Threads",
            "create_public_threads": "Create Public Threads"}.get(flag, flag.replace("_", " ").title())


def missing_permissions(have: discord.Permissions, *, in_thread: bool) -> list[str]:
    """Human names of the required permissions `have` lacks (in a thread, posting is Send in Threads
    and the samples thread cannot be made there, so neither Send Messages nor Create Threads count)."""
    out = []
    for flag, needed in REQUIRED_PERMISSIONS:
        if not needed or getattr(have, flag):
            continue
        if in_thread and flag in ("send_messages", "create_public_threads"):
            continue
        if not in_thread and flag == "send_messages_in_threads" and not have.create_public_threads:
            continue  # reported once, as Create Public Threads
        out.append(_label(flag))
    return out


def preflight_text(interaction: discord.Interaction) -> str | None:
    """One actionable line when the bot cannot deliver a job's progress and result here; else None."""
    channel = interaction.channel
    in_thread = isinstance(channel, discord.Thread) or getattr(channel, "type", None) in (
        discord.ChannelType.public_thread, discord.ChannelType.private_thread, discord.ChannelType.news_thread)
    missing = missing_permissions(interaction.app_permissions, in_thread=in_thread)
    if not missing:
        return None
    return (f"I can't post progress and the result here (missing: {', '.join(missing)}). "
            "Use /train in a channel where I have them, or ask an admin to grant them.")
