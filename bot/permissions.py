"""The channel permissions lorabot needs: one list for the /train preflight and the invite URL."""

import discord

# view, post, post in the samples thread, make that thread, embed the status, attach samples,
# and read history (replies and fetching the status message after a restart)
REQUIRED_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    embed_links=True,
    attach_files=True,
    read_message_history=True,
)
