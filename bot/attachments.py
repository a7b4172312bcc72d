"""A /train attachment, streamed to disk (issue 13, M6): never held in memory whole, capped at the
announced limit while it streams, and run by the intake under its semaphore (see
services/jobs/intake.py `Fetch`), after the per-user limits have let the request in."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import BinaryIO

import aiohttp
import discord

from services.dataset.errors import FetchError
from services.jobs.intake import Fetch

CHUNK = 1024 * 1024
TIMEOUT_S = 600.0


def attachment_fetch(att: discord.Attachment, limit_bytes: int) -> Fetch:
    """The download of `att` into a file, refused past `limit_bytes` (its size may lie)."""

    async def fetch(dest: Path) -> None:
        written = 0
        out: BinaryIO = await asyncio.to_thread(dest.open, "wb")
        try:
            timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, \
                    session.get(att.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise FetchError("download_failed",
                                     f"could not download `{att.filename}` from Discord ({resp.status})")
                async for chunk in resp.content.iter_chunked(CHUNK):
                    written += len(chunk)
                    if written > limit_bytes:
                        raise FetchError("too_large", f"`{att.filename}` is larger than its announced size; "
                                                      "refusing it")
                    await asyncio.to_thread(out.write, chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError("download_failed",
                             f"could not download `{att.filename}` from Discord ({type(exc).__name__})") from None
        finally:
            await asyncio.to_thread(out.close)

    return fetch
