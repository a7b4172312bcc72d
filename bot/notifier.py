"""DiscordNotifier: turns job events into channel messages (the Notifier protocol of services.jobs.events).

- One status message per job, edited in place: throttled to one edit per `discord_edit_interval_s`,
  coalescing (only the newest state is written), and replaced by a fresh message before Discord's
  cap on edits of messages older than an hour (`discord_status_refresh_s`).
- Readiness steps and progress go into that status message; log snippets are separate messages in a
  code block; sample images go to a thread under the status message; the end of a job is a final
  message (link, expiry, duration, cost, loss and a loss-curve PNG; or the failure with its class
  and last log lines; or what a cancel destroyed and cost).
- Everything goes through the channel with the bot token (never an interaction token, which dies
  after 15 minutes), and every text passes through `settings.redact` first.
- A failing Discord never stops a job: 429s and 5xx are retried here on top of discord.py's own
  retries, other errors are logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import discord

from bot import embeds
from services.jobs.events import (
    Cancelled,
    CostUpdate,
    Failed,
    Finished,
    JobEvent,
    LogSnippet,
    OperatorAlert,
    Progress,
    Queued,
    Readiness,
    SampleImage,
    StateChanged,
)
from services.jobs.model import Job
from services.settings import Settings, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

StatusMessageHook = Callable[[str, int], Awaitable[None]]


@dataclass
class _Track:
    job: Job
    channel_id: int
    message_id: int | None = None
    message_born: float = 0.0  # wall time the current status message was created
    continued: bool = False
    last_edit: float = 0.0  # monotonic
    steps: list[str] = field(default_factory=list)
    queue_position: int | None = None
    thread_id: int | None = None
    pending: asyncio.Task[None] | None = None
    writing: bool = False  # the pending edit is past its wait and talking to Discord
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: bool = False


class DiscordNotifier:
    def __init__(
        self,
        client: discord.Client,
        settings: Settings,
        *,
        on_status_message: StatusMessageHook | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.edit_interval_s = settings.discord_edit_interval_s
        self.refresh_after_s = settings.discord_status_refresh_s
        self.on_status_message = on_status_message
        self._tracks: dict[str, _Track] = {}
        self._secrets = settings.secret_values()

    # --- the Notifier protocol ----------------------------------------------------------------
    async def notify(self, job: Job, event: JobEvent) -> None:
        if isinstance(event, OperatorAlert):  # any job's, CLI ones included: the operator must know
            await self._alert(job, event)
            return
        if job.channel_id is None:
            return  # a CLI job: nothing to say in Discord
        try:
            await self._handle(job, event)
        except Exception:  # a chat outage must not kill a paid job
            log.exception("discord notifier: %s on job %s failed", type(event).__name__, job.id)

    async def _alert(self, job: Job, event: OperatorAlert) -> None:
        channel_id = self.settings.admin_channel_id
        if channel_id is None:
            return  # the log has it at ERROR already
        try:
            await self._send(channel_id, content=f"\N{WARNING SIGN} lorabot: {event.text}")
        except Exception:
            log.exception("discord notifier: the operator alert for job %s was not posted", job.id)

    async def flush(self) -> None:
        """Write every pending status edit now (tests, shutdown)."""
        for track in list(self._tracks.values()):
            await self._settle(track)
            if track.message_id is not None and not track.done:
                await self._write_status(track)

    async def close(self) -> None:
        # shutdown: whatever is still pending is dropped; the client goes away with it
        for track in self._tracks.values():
            if track.pending is not None:
                track.pending.cancel()

    # --- dispatch -------------------------------------------------------------------------------
    def _track(self, job: Job) -> _Track:
        track = self._tracks.get(job.id)
        if track is None:
            assert job.channel_id is not None
            track = _Track(job=job, channel_id=job.channel_id)
            if job.status_message_id:  # a restarted bot keeps editing the message it had
                track.message_id = job.status_message_id
                track.message_born = discord.utils.snowflake_time(job.status_message_id).timestamp()
            self._tracks[job.id] = track
        else:
            track.job = job
        return track

    async def _handle(self, job: Job, event: JobEvent) -> None:
        track = self._track(job)
        if isinstance(event, Progress):
            track.job = job.model_copy(update={
                "phase": event.phase, "step": event.step, "total_steps": event.total, "loss": event.loss,
                "sec_per_step": event.sec_per_step, "eta_s": event.eta_s,
                # with a price the job computes its own running cost; without one, trust the event
                **({} if job.dph_total else {"cost_usd": event.cost_usd}),
            })
            await self._touch(track)
        elif isinstance(event, Queued):
            track.queue_position = event.position
            await self._touch(track)
        elif isinstance(event, Readiness):
            if not track.steps or track.steps[-1] != event.step:
                track.steps.append(event.step)
            await self._touch(track)
        elif isinstance(event, StateChanged | CostUpdate):
            await self._touch(track)
        elif isinstance(event, LogSnippet):
            await self._send(track.channel_id, content=embeds.log_message(job, event.text, self._secrets))
        elif isinstance(event, SampleImage):
            await self._sample(track, event)
        elif isinstance(event, Finished | Failed | Cancelled):
            await self._final(track, event)

    # --- the status message -----------------------------------------------------------------------
    async def _touch(self, track: _Track) -> None:
        if track.done:
            return
        if track.message_id is None:
            async with track.lock:
                if track.message_id is None:
                    await self._post_status(track)
                    return
        if track.pending is None or track.pending.done():
            track.pending = asyncio.create_task(self._edit_later(track), name=f"status-edit-{track.job.id}")

    async def _edit_later(self, track: _Track) -> None:
        wait = track.last_edit + self.edit_interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        track.writing = True
        try:
            await self._write_status(track)
        except Exception:
            log.exception("discord notifier: status edit of job %s failed", track.job.id)
        finally:
            track.writing = False

    async def _settle(self, track: _Track) -> None:
        """Drop a pending edit that is still waiting its turn; let one already under way finish.

        Cancelling an edit in flight would not stop its request (bot.app shields every request), and
        that older edit could then land after the one written next, leaving a stale status."""
        task = track.pending
        if task is None or task.done():
            return
        if not track.writing:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _status_embed(self, track: _Track) -> discord.Embed:
        e = embeds.status_embed(track.job, steps=track.steps, queue_position=track.queue_position,
                                continued=track.continued)
        return embeds.redact_embed(e, self._secrets)

    async def _post_status(self, track: _Track) -> None:
        msg = await self._send(track.channel_id, embed=self._status_embed(track))
        if msg is None:
            return
        track.message_id = msg.id
        track.message_born = time.time()
        track.last_edit = time.monotonic()
        if self.on_status_message is not None:
            try:
                await self.on_status_message(track.job.id, msg.id)
            except Exception:
                log.exception("discord notifier: could not store the status message of job %s", track.job.id)

    async def _write_status(self, track: _Track) -> None:
        async with track.lock:
            if track.message_id is None or time.time() - track.message_born > self.refresh_after_s:
                # before the 1-hour edit cap: a fresh message carries on
                track.continued = track.message_id is not None
                await self._post_status(track)
                return
            partial = self._channel(track.channel_id, track.job).get_partial_message(track.message_id)
            try:
                await self._retry(lambda: partial.edit(embed=self._status_embed(track)))
            except discord.NotFound:
                track.message_id = None  # someone deleted it: post a new one
                await self._post_status(track)
                return
            except discord.HTTPException as exc:
                if exc.code == 30046:  # edit cap reached anyway
                    track.continued = True
                    await self._post_status(track)
                    return
                raise
            track.last_edit = time.monotonic()

    # --- samples, the end -------------------------------------------------------------------------
    async def _sample(self, track: _Track, ev: SampleImage) -> None:
        if track.thread_id is None and track.message_id is not None:
            partial = self._channel(track.channel_id, track.job).get_partial_message(track.message_id)
            name = embeds.truncate(f"samples · {track.job.name or track.job.id}", 100)
            try:
                thread = await self._retry(lambda: partial.create_thread(name=name, auto_archive_duration=1440))
                track.thread_id = thread.id
            except (discord.HTTPException, ValueError):
                log.warning("discord notifier: no thread for job %s samples; posting in the channel", track.job.id)
        target = track.thread_id or track.channel_id
        raw = await asyncio.to_thread(ev.path.read_bytes)
        data, ext = await asyncio.to_thread(embeds.shrink_image, raw)
        filename = ev.path.stem + (ext or ev.path.suffix)
        caption = f"step {ev.step}" if ev.step is not None else "sample"
        if ev.prompt:
            caption += f": {ev.prompt}"
        await self._send(target, content=embeds.message(redact(caption, self._secrets)),
                         file_factory=lambda: discord.File(io.BytesIO(data), filename=filename))

    async def _final(self, track: _Track, ev: JobEvent) -> None:
        await self._settle(track)
        if track.message_id is not None:
            try:
                await self._write_status(track)
            except Exception:
                log.exception("discord notifier: final status edit of job %s failed", track.job.id)
        track.done = True
        job = track.job
        mention = f"<@{job.user_id}> " if job.user_id.isdigit() else ""
        if isinstance(ev, Finished):
            e = embeds.finished_embed(job, ev)
            png = await asyncio.to_thread(embeds.loss_curve_png, ev.loss_curve) if ev.loss_curve else None
            if png is not None:
                e.set_image(url="attachment://loss.png")
            await self._send(
                track.channel_id, content=embeds.message(f"{mention}your LoRA **{job.name}** is ready."),
                embed=embeds.redact_embed(e, self._secrets),
                file_factory=(lambda: discord.File(io.BytesIO(png), filename="loss.png")) if png else None,
            )
        elif isinstance(ev, Failed):
            e = embeds.failed_embed(job, ev, self._secrets)
            await self._send(track.channel_id, content=embeds.message(f"{mention}job `{job.id}` failed."),
                             embed=embeds.redact_embed(e, self._secrets))
        elif isinstance(ev, Cancelled):
            e = embeds.cancelled_embed(job, ev)
            await self._send(track.channel_id, embed=embeds.redact_embed(e, self._secrets))
        if not (isinstance(ev, Failed) and ev.retrying):
            self._tracks.pop(job.id, None)
        else:
            track.done = False

    def _channel(self, channel_id: int, job: Job | None = None) -> discord.PartialMessageable:
        """The channel by id, with the bot token (never an interaction's): works hours later."""
        guild_id = (job.guild_id if job else None) or self.settings.discord_guild_id
        return self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    # --- sending --------------------------------------------------------------------------------
    async def _send(self, channel_id: int, *, content: str | None = None, embed: discord.Embed | None = None,
                    file_factory: Callable[[], discord.File] | None = None) -> discord.Message | None:
        channel = self._channel(channel_id)
        if content is not None:
            content = embeds.message(redact(content, self._secrets))
        kwargs: dict[str, Any] = {"allowed_mentions": discord.AllowedMentions(users=True, roles=False,
                                                                              everyone=False)}
        if content is not None:
            kwargs["content"] = content
        if embed is not None:
            kwargs["embed"] = embeds.fit_embed(embed)

        async def go() -> discord.Message:
            if file_factory is not None:
                return await channel.send(file=file_factory(), **kwargs)  # a fresh File per try
            return await channel.send(**kwargs)

        try:
            return await self._retry(go)
        except discord.HTTPException:
            log.exception("discord notifier: could not post to channel %s", channel_id)
            return None

    async def _retry(self, fn: Callable[[], Awaitable[T]], tries: int = 6) -> T:
        """discord.py already retries 429s a few times; a longer storm or a 5xx is retried here."""
        delay = 0.5
        for attempt in range(tries):
            try:
                return await fn()
            except discord.RateLimited as exc:
                if attempt == tries - 1:
                    raise
                await asyncio.sleep(min(exc.retry_after, 60.0))
            except discord.HTTPException as exc:
                if attempt == tries - 1 or not (exc.status == 429 or exc.status >= 500):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")
