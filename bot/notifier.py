"""DiscordNotifier: turns job events into channel messages (the Notifier protocol of services.jobs.events).

- One status message per job, edited in place: throttled to one edit per `discord_edit_interval_s`,
  coalescing (only the newest state is written), and replaced by a fresh message before Discord's
  cap on edits of messages older than an hour (`discord_status_refresh_s`).
- Readiness steps and progress go into that status message, with a persistent Cancel button; log
  snippets (code blocks) and sample images go to a thread under it (its id, the message's, is stored);
  the end of a job is a final message (link in text and embed, expiry, duration, cost, loss and a
  loss-curve PNG; or the failure with advice and what was charged; or what a cancel destroyed).
- The result always arrives: refused, it is posted again without the file and image, then sent by
  DM; where it went is stored, and a restart re-sends an undelivered one (bot/delivery.py). A channel
  that refuses the bot mutes the job there, and its owner hears it once by DM.
- Only the owner is ever pinged, and only by the result or a final failure.
- Everything goes through the channel with the bot token (never an interaction token, which dies
  after 15 minutes), and every text passes through `settings.redact` first.
- A failing Discord never stops a job: 429s and 5xx are retried here on top of discord.py's own
  retries (never the edit cap 30046, an archived thread or a Cloudflare ban), other errors are logged.
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
from PIL import Image

from bot import embeds
from bot.controls import status_view
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
from services.jobs.model import Job, JobState
from services.settings import Settings, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

StatusMessageHook = Callable[[str, int], Awaitable[None]]
FieldsHook = Callable[[str, dict[str, Any]], Awaitable[None]]  # job id, Job fields to store

# a post refused for what it carries or where it goes: retried without the file and image, then by DM
UNDELIVERABLE_CODES = frozenset({50001, 50013, 40005, 50045})
# answered at once, never retried: the edit cap of hour-old messages (a 429!) and archived threads
NO_RETRY_CODES = frozenset({30046, 50083})


def _forbidden(exc: discord.HTTPException) -> bool:
    return exc.status == 403 or exc.code in (50001, 50013)


def _cloudflare_ban(exc: discord.HTTPException) -> bool:
    """A 429 without Discord's Via header comes from Cloudflare: retrying only lengthens the ban."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return exc.status == 429 and headers is not None and not headers.get("Via")


@dataclass
class _Track:
    job: Job
    channel_id: int
    message_id: int | None = None
    message_born: float = 0.0  # wall time the current status message was created
    continued: bool = False
    last_edit: float = 0.0  # monotonic
    steps: list[tuple[str, str, float]] = field(default_factory=list)  # (step, detail, started at)
    queue_position: int | None = None
    thread_id: int | None = None
    thread_failed: bool = False  # no thread possible here (a thread channel, no permission): stop trying
    muted: bool = False  # posting in the channel fails: no more status posts there (issue 15)
    capped: bool = False  # the current status message hit the edit cap (30046): it cannot be edited
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
        on_fields: FieldsHook | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.edit_interval_s = settings.discord_edit_interval_s
        self.refresh_after_s = settings.discord_status_refresh_s
        self.on_status_message = on_status_message
        self.on_fields = on_fields
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
            track.thread_id = job.samples_thread_id  # and posts samples in the thread it had
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
            if track.steps and track.steps[-1][0] == event.step:
                track.steps[-1] = (event.step, event.detail, track.steps[-1][2])  # new details, same step
            else:
                track.steps.append((event.step, event.detail, time.time()))
            await self._touch(track)
        elif isinstance(event, StateChanged | CostUpdate):
            await self._touch(track)
        elif isinstance(event, LogSnippet):
            if track.muted:
                return
            target = await self._thread(track) or track.channel_id  # with the samples, not the channel
            await self._send(target, content=embeds.log_message(job, event.text, self._secrets), track=track)
        elif isinstance(event, SampleImage):
            await self._sample(track, event)
        elif isinstance(event, Finished | Failed | Cancelled):
            await self._final(track, event)

    # --- the status message -----------------------------------------------------------------------
    async def _touch(self, track: _Track) -> None:
        if track.done or track.muted:
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
                                continued=track.continued, thread_id=track.thread_id)
        return embeds.redact_embed(e, self._secrets)

    def _jump_url(self, track: _Track, message_id: int) -> str:
        guild = track.job.guild_id or self.settings.discord_guild_id or "@me"
        return f"https://discord.com/channels/{guild}/{track.channel_id}/{message_id}"

    async def _post_status(self, track: _Track) -> None:
        old = track.message_id if track.continued else None
        msg = await self._send(track.channel_id, embed=self._status_embed(track), track=track,
                               view=status_view(track.job))
        if msg is None:
            return
        if old is not None and not track.capped:
            # the old message is still under an hour old: point it at its successor instead of freezing
            partial = self._channel(track.channel_id, track.job).get_partial_message(old)
            pointer = discord.Embed(description=f"↪ continued below: {self._jump_url(track, msg.id)}",
                                    color=embeds.COLOR_MUTED)
            pointer.set_footer(text=f"job {track.job.id}")
            with contextlib.suppress(discord.HTTPException):
                await partial.edit(embed=pointer, view=None)
        track.capped = False
        track.message_id = msg.id
        track.message_born = time.time()
        track.last_edit = time.monotonic()
        if old is None and not track.job.result_owed:
            # from now on the owner is owed a result message: a restart delivers it if it never arrived
            await self._store(track.job.id, result_owed=True)
            track.job = track.job.model_copy(update={"result_owed": True})
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
                # the Cancel button while the job lives; none once it has ended
                await self._retry(lambda: partial.edit(embed=self._status_embed(track), view=status_view(track.job)))
            except discord.NotFound:
                track.message_id = None  # someone deleted it: post a new one
                await self._post_status(track)
                return
            except discord.HTTPException as exc:
                if exc.code == 30046:  # edit cap reached anyway (a 429, answered at once by _retry)
                    track.continued = True
                    track.capped = True
                    await self._post_status(track)
                    return
                if _forbidden(exc):
                    await self._mute(track)
                    return
                raise
            track.last_edit = time.monotonic()

    # --- samples, the end -------------------------------------------------------------------------
    async def _thread(self, track: _Track) -> int | None:
        """The samples thread under the first status message (its id is that message's id)."""
        if track.thread_id is not None or track.thread_failed or track.message_id is None or track.muted:
            return track.thread_id
        partial = self._channel(track.channel_id, track.job).get_partial_message(track.message_id)
        name = embeds.truncate(f"samples · {track.job.name or track.job.id}", 100)
        try:
            thread = await self._retry(lambda: partial.create_thread(name=name, auto_archive_duration=1440))
            track.thread_id = thread.id
        except discord.HTTPException as exc:
            if exc.code == 160004:  # made before (a restart that forgot it): same id as the message
                track.thread_id = track.message_id
            else:  # a thread channel (50024), no Create Public Threads (50013): stop asking
                track.thread_failed = True
                log.warning("discord notifier: no thread for job %s (%s); posting in the channel", track.job.id,
                            exc.code)
        except ValueError:
            track.thread_failed = True
        if track.thread_id is not None:
            await self._store(track.job.id, samples_thread_id=track.thread_id)
        return track.thread_id

    async def _store(self, job_id: str, **fields: Any) -> None:
        if self.on_fields is None:
            return
        try:
            await self.on_fields(job_id, fields)
        except Exception:
            log.exception("discord notifier: could not store %s of job %s", sorted(fields), job_id)

    async def _sample(self, track: _Track, ev: SampleImage) -> None:
        if track.muted:
            return
        target = await self._thread(track) or track.channel_id
        raw = await asyncio.to_thread(ev.path.read_bytes)
        try:
            data, ext = await asyncio.to_thread(embeds.shrink_image, raw)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # box output: not a sample we show
            log.warning("discord notifier: sample %s of job %s not posted: %s", ev.path.name, track.job.id, exc)
            return
        filename = ev.path.stem + (ext or ev.path.suffix)
        caption = f"step {ev.step}" if ev.step is not None else "sample"
        if ev.prompt:
            caption += f": {ev.prompt}"
        await self._send(target, content=embeds.message(redact(caption, self._secrets)),
                         file_factory=lambda: discord.File(io.BytesIO(data), filename=filename), track=track)

    async def _final(self, track: _Track, ev: JobEvent) -> None:
        await self._settle(track)
        if isinstance(ev, Finished) and not track.job.state.terminal:
            # the result goes out before the machine is released (it may wait for a queued job): for the
            # user the job is done now, not "saving the LoRA" for the length of that wait
            track.job = track.job.model_copy(update={"state": JobState.SUCCEEDED})
        if track.message_id is not None and not track.muted:
            try:
                await self._write_status(track)
            except Exception:
                log.exception("discord notifier: final status edit of job %s failed", track.job.id)
        track.done = True
        job = track.job
        owner = int(job.user_id) if job.user_id.isdigit() else None
        mention = f"<@{owner}> " if owner is not None else ""
        if isinstance(ev, Finished):
            await self._deliver(track, ev)
        elif isinstance(ev, Failed):
            e = embeds.redact_embed(embeds.failed_embed(job, ev, self._secrets), self._secrets)
            # a failure that retries on another machine is news, not a call to act: no ping
            ping = owner if not ev.retrying else None
            text = embeds.message(f"{mention if ping else ''}job `{job.id}` failed"
                                  + (", retrying on another machine." if ev.retrying else "."))
            if track.muted:
                if not ev.retrying:
                    await self._dm(job, content=text, embed=e)
            else:
                await self._send(track.channel_id, content=text, embed=e, ping=ping, track=track)
        elif isinstance(ev, Cancelled):
            e = embeds.cancelled_embed(job, ev)
            if not track.muted and (track.message_id is not None or job.started_at is not None):
                # a job nobody else saw (cancelled at its quote) gets no public notice
                await self._send(track.channel_id, embed=embeds.redact_embed(e, self._secrets), track=track)
        if not (isinstance(ev, Failed) and ev.retrying):
            self._tracks.pop(job.id, None)
        else:
            track.done = False

    async def deliver_result(self, job: Job, ev: Finished) -> str | None:
        """Deliver a finished job's result again (a restart found it undelivered); where it went."""
        if job.channel_id is None:
            return None
        track = _Track(job=job, channel_id=job.channel_id)
        return await self._deliver(track, ev)

    async def _deliver(self, track: _Track, ev: Finished) -> str | None:
        """The link in text and embed: in the channel (with the loss curve; without the file and image
        when the channel refuses them), else by DM. Records where it went."""
        job = track.job
        owner = int(job.user_id) if job.user_id.isdigit() else None
        mention = f"<@{owner}> " if owner is not None else ""
        by_dm = self.settings.links_by_dm
        link_line = f"<{ev.lora_url}>"  # in angle brackets: the link works, no preview card
        public = embeds.message(f"{mention}your LoRA **{job.name}** is ready"
                                + (": the link is in your DMs." if by_dm else f": {link_line}"))
        private = embeds.message(f"Your LoRA **{job.name}** (job `{job.id}`) is ready: {link_line}")
        with_link = embeds.redact_embed(embeds.finished_embed(job, ev), self._secrets)
        shown = embeds.redact_embed(embeds.finished_embed(job, ev, link=not by_dm), self._secrets)
        png = await asyncio.to_thread(embeds.loss_curve_png, ev.loss_curve) if ev.loss_curve else None
        where: str | None = None
        if not track.muted:
            with_image = shown.copy()
            if png is not None:
                with_image.set_image(url="attachment://loss.png")
            try:
                await self._post(track.channel_id, content=public, embed=with_image, ping=owner,
                                 file_factory=(lambda: discord.File(io.BytesIO(png), filename="loss.png"))
                                 if png else None)
                where = "channel"
            except discord.HTTPException as exc:
                log.warning("discord notifier: result of job %s refused (%s %s); trying without the file",
                            job.id, exc.status, exc.code)
                if exc.status == 403 or exc.code in UNDELIVERABLE_CODES:
                    try:
                        await self._post(track.channel_id, content=public, embed=shown, ping=owner)
                        where = "channel"
                    except discord.HTTPException as exc2:
                        log.warning("discord notifier: result of job %s refused again (%s %s)", job.id,
                                    exc2.status, exc2.code)
        if by_dm or where is None:
            if await self._dm(job, content=private, embed=with_link) is not None:
                where = where if where is not None and not by_dm else "dm"
            elif by_dm:
                where = None  # the link itself never arrived
        if where is not None:
            await self._store(job.id, result_delivered_at=time.time(), result_delivered_to=where)
        else:
            log.error("discord notifier: the result of job %s reached nobody; /status and /link still show it",
                      job.id)
        return where

    async def _dm(self, job: Job, *, content: str, embed: discord.Embed | None = None) -> discord.Message | None:
        if not job.user_id.isdigit():
            return None
        try:
            channel = await self.client.create_dm(discord.Object(id=int(job.user_id)))
            kwargs: dict[str, Any] = {"content": embeds.message(redact(content, self._secrets)),
                                      "allowed_mentions": discord.AllowedMentions.none()}
            if embed is not None:
                kwargs["embed"] = embeds.fit_embed(embed)
            return await self._retry(lambda: channel.send(**kwargs))
        except discord.HTTPException as exc:
            log.warning("discord notifier: could not DM the owner of job %s (%s %s)", job.id, exc.status, exc.code)
            return None

    async def _mute(self, track: _Track) -> None:
        """The channel refuses the bot: stop posting there (no storm toward the invalid-request limit)
        and tell the owner once, by DM, where to look instead."""
        if track.muted:
            return
        track.muted = True
        job = track.job
        await self._dm(job, content=(
            f"I can no longer post in <#{track.channel_id}> (missing permissions), so job `{job.id}` "
            f"(**{job.name}**) goes on without updates there. `/status {job.id}` shows its progress, "
            "and I will send you the result here."))

    def _channel(self, channel_id: int, job: Job | None = None) -> discord.PartialMessageable:
        """The channel by id, with the bot token (never an interaction's): works hours later."""
        guild_id = (job.guild_id if job else None) or self.settings.discord_guild_id
        return self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    # --- sending --------------------------------------------------------------------------------
    async def _post(self, channel_id: int, *, content: str | None = None, embed: discord.Embed | None = None,
                    file_factory: Callable[[], discord.File] | None = None,
                    ping: int | None = None, view: discord.ui.View | None = None) -> discord.Message:
        """One post, retried on 429/5xx; raises what Discord finally answered."""
        channel = self._channel(channel_id)
        if content is not None:
            content = embeds.message(redact(content, self._secrets))
        # nobody is pinged by trainer or user text; only the owner, only where `ping` says so
        mentions = (discord.AllowedMentions(users=[discord.Object(ping)], roles=False, everyone=False,
                                            replied_user=False)
                    if ping is not None else discord.AllowedMentions.none())
        kwargs: dict[str, Any] = {"allowed_mentions": mentions}
        if content is not None:
            kwargs["content"] = content
        if embed is not None:
            kwargs["embed"] = embeds.fit_embed(embed)
        if view is not None:
            kwargs["view"] = view

        async def go() -> discord.Message:
            if file_factory is not None:
                return await channel.send(file=file_factory(), **kwargs)  # a fresh File per try
            return await channel.send(**kwargs)

        return await self._retry(go)

    async def _send(self, channel_id: int, *, content: str | None = None, embed: discord.Embed | None = None,
                    file_factory: Callable[[], discord.File] | None = None, ping: int | None = None,
                    track: _Track | None = None, view: discord.ui.View | None = None) -> discord.Message | None:
        try:
            return await self._post(channel_id, content=content, embed=embed, file_factory=file_factory, ping=ping,
                                    view=view)
        except discord.HTTPException as exc:
            log.warning("discord notifier: could not post to channel %s (%s %s)", channel_id, exc.status, exc.code)
            if track is not None and _forbidden(exc) and channel_id == track.channel_id:
                await self._mute(track)
            elif track is not None and _forbidden(exc) and channel_id == track.thread_id:
                track.thread_failed, track.thread_id = True, None  # the thread refuses: use the channel
            return None

    async def _retry(self, fn: Callable[[], Awaitable[T]], tries: int = 6) -> T:
        """discord.py already retries 429s a few times; a longer storm or a 5xx is retried here.
        The edit cap (30046, a 429), an archived thread and a Cloudflare ban are answered at once."""
        delay = 0.5
        for attempt in range(tries):
            try:
                return await fn()
            except discord.RateLimited as exc:
                if attempt == tries - 1:
                    raise
                await asyncio.sleep(min(exc.retry_after, 60.0))
            except discord.HTTPException as exc:
                if exc.code in NO_RETRY_CODES or _cloudflare_ban(exc):
                    raise
                if attempt == tries - 1 or not (exc.status == 429 or exc.status >= 500):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")
