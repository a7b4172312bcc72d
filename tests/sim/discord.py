"""A fake Discord on loopback: REST under /api/v10 and a gateway websocket, enough to drive the
real discord.py client end to end (login, command sync, READY/GUILD_CREATE, INTERACTION_CREATE,
interaction callbacks, webhook followups and edits, channel messages with files, threads).

It runs in its own thread and event loop (like tests/sim/vast.py), so a test's event loop, a
subprocess (`lorabot run`) or a person's shell can all use it:

    with FakeDiscord() as fake:
        fake.patch_discord()            # or set LORABOT_DISCORD_API_BASE / LORABOT_DISCORD_GATEWAY
        ...
        ix = fake.slash("offers", {"gpu": "RTX 4090"})
        await fake.wait_for(lambda: fake.followups(ix))

Knobs: `rate_limit(...)` answers the next N matching requests with 429 + retry_after (global or
per route, or Cloudflare's HTML 429), `token_lifetime_s` makes interaction tokens expire (401/50027
on webhooks, 10062 on callbacks), `advance(s)` moves the fake's clock (token expiry, the 30046 cap on
edits of hour-old messages), `latency_s` delays every REST answer, `set_bot_permissions(channel,
bits)` drives `app_permissions` and the 403s (50001/50013), `dm_closed` refuses DMs (50007),
`archive_thread`, `enforce_buckets`. It refuses what Discord refuses: message bodies (50035 with the
field path, 50006), 160004/50024/50083 on threads, options that do not match the synced commands,
presses on messages the presser cannot see. Everything received is recorded: `requests` (with the raw
body), `rejected`, `messages` (with every edit, file and who each write pinged), the callbacks.

Wire details follow ../shared/reference/discord.md §3c (exact `application/json` content type, a
`Via` header on 429s, the `interaction` object in callback answers, the first followup after a
deferral editing the loading message).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
API = "/api/v10"
EPHEMERAL = 64

# permission bits (developers/topics/permissions.mdx)
CREATE_INSTANT_INVITE, ADMINISTRATOR = 1 << 0, 1 << 3
VIEW_CHANNEL, SEND_MESSAGES, MANAGE_MESSAGES = 1 << 10, 1 << 11, 1 << 13
EMBED_LINKS, ATTACH_FILES, READ_MESSAGE_HISTORY, MENTION_EVERYONE = 1 << 14, 1 << 15, 1 << 16, 1 << 17
CREATE_PUBLIC_THREADS, SEND_MESSAGES_IN_THREADS = 1 << 35, 1 << 38
# what a bot invited with the usual text permissions has (no Mention Everyone, no Administrator)
DEFAULT_BOT_PERMISSIONS = (VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY
                           | CREATE_PUBLIC_THREADS | SEND_MESSAGES_IN_THREADS | (1 << 6) | (1 << 31))
DM_CHANNEL_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY
# message limits (developers/resources/message.mdx)
EMBED_LIMITS = {"title": 256, "description": 4096, "fields": 25, "field.name": 256, "field.value": 1024,
                "footer.text": 2048, "author.name": 256}
OLD_MESSAGE_S = 3600.0  # edits of messages older than this are capped (30046)
MENTION_RE = re.compile(r"<@!?(\d+)>")


def _iso(ts: float | None = None) -> str:
    t = time.gmtime(ts if ts is not None else time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", t)


@dataclass
class RateLimitRule:
    pattern: str  # a regex searched in "METHOD /path"
    count: int
    retry_after: float
    global_: bool = False
    hits: int = 0
    cloudflare: bool = False  # a 429 without a Via header: Cloudflare's ban, not Discord's limiter
    code: int | None = None


@dataclass
class FakeFile:
    filename: str
    data: bytes
    content_type: str | None = None
    id: int = 0  # the attachment id, stable across reads and edits (set when stored)


@dataclass
class FakeMessage:
    id: int
    channel_id: int
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    files: list[FakeFile] = field(default_factory=list)
    flags: int = 0
    author_id: int = 0
    webhook_token: str | None = None  # set when it came through an interaction token
    interaction_id: int | None = None
    deferred: bool = False  # a "thinking..." placeholder
    edits: list[dict[str, Any]] = field(default_factory=list)  # every PATCH body, in order
    created_at: float = field(default_factory=time.time)
    thread_id: int | None = None
    recipient_id: int | None = None  # who sees it, for an ephemeral interaction response
    mentions: list[int] = field(default_factory=list)  # users this message pinged (after allowed_mentions)
    mentions_per_write: list[list[int]] = field(default_factory=list)  # who each create/edit pinged
    old_edits: int = 0  # edits made while older than an hour

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    def text(self) -> str:
        """Everything a person could read in this message (content and embeds), for assertions."""
        return self.content + "\n" + json.dumps(self.embeds, ensure_ascii=False)


@dataclass
class FakeInteraction:
    id: int
    token: str
    type: int
    name: str
    user_id: int
    channel_id: int
    created_at: float
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # {"type", "data"}
    original_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)


class FakeDiscord:
    """Start with `with FakeDiscord() as fake:`; `fake.api_base` and `fake.gateway_url` are the URLs."""

    def __init__(
        self,
        *,
        token: str = "fake-discord-token",
        guild_id: int = 900_000_000_000_000_001,
        channel_id: int = 900_000_000_000_000_010,
        app_id: int = 900_000_000_000_000_100,
        bot_user_id: int = 900_000_000_000_000_100,
        roles: dict[str, int] | None = None,
        heartbeat_interval_ms: int = 41_250,
        token_lifetime_s: float = 15 * 60,
        latency_s: float = 0.0,
        other_guilds: Sequence[int] = (),
        old_edit_cap: int = 3,
        bucket_limit: int = 50,
        bucket_window_s: float = 1.0,
    ) -> None:
        self.token = token
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.app_id = app_id
        self.bot_user_id = bot_user_id
        self.roles = roles if roles is not None else {"Trainers": 900_000_000_000_000_201,
                                                      "Admins": 900_000_000_000_000_202}
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.token_lifetime_s = token_lifetime_s
        self.latency_s = latency_s
        self.other_guilds = list(other_guilds)  # guilds the bot is already in at READY (not the operator's)
        self.left_guilds: list[int] = []  # DELETE /users/@me/guilds/{id}
        self.cdn_latency_s = 0.0  # a slow attachment download
        # what `lorabot doctor` reads (issue 17): the application's Public Bot flag, and the bot's
        # permissions in the guild (None: the bot is not a member); an invite grants exactly these
        self.bot_public = False
        self.guild_permissions: int | None = _required_permissions()

        self.requests: list[dict[str, Any]] = []  # method, path, status, body (raw bytes)
        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}  # "global" | str(guild_id) -> payload
        self.command_puts: list[tuple[str, list[dict[str, Any]]]] = []
        self.command_creates: dict[str, int] = {}  # new command names per scope "today" (200 a day: 30034)
        self.max_command_creates = 200
        self.threads: dict[int, dict[str, Any]] = {}
        self.attachments: dict[int, FakeFile] = {}
        self.downloads: list[int] = []  # attachment ids fetched by the bot
        self.identifies = 0
        self.resumes = 0
        self.heartbeats = 0
        self.rate_limits: list[RateLimitRule] = []
        self.rate_limited: list[str] = []  # "METHOD /path" of every 429 sent
        self._sources: dict[int, int] = {}  # component interaction id -> the message clicked
        # the bot's permissions per channel (threads inherit their parent's); the default channel has
        # the usual text permissions. `set_bot_permissions` changes them; interactions carry them.
        self.bot_permissions: dict[int, int] = {channel_id: DEFAULT_BOT_PERMISSIONS}
        self.text_channels: dict[int, str] = {channel_id: "training"}
        self.dm_channels: dict[int, int] = {}  # user id -> DM channel id
        self.dm_closed: set[int] = set()  # users who do not accept DMs from the bot (50007)
        self.clock_offset = 0.0  # `advance()` moves the fake's clock (token expiry, message age)
        self.old_edit_cap = old_edit_cap  # edits of an hour-old message before 30046
        self.bucket_limit = bucket_limit
        self.bucket_window_s = bucket_window_s
        self.enforce_buckets = False  # True: exceeding a bucket gets a real 429 (shared headers always sent)
        self._buckets: dict[str, list[float]] = {}
        self.rejected: list[dict[str, Any]] = []  # every 4xx answer: method, path, status, code, message

        self.api_base = ""
        self.gateway_url = ""
        self.base_url = ""
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._identified = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> FakeDiscord:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeDiscord:
        self._thread = threading.Thread(target=self._serve, name="fake-discord", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Discord did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._runner:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                fut.result(5)
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    async def _shutdown(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        assert self._runner is not None
        await self._runner.cleanup()

    def patch_discord(self) -> Callable[[], None]:
        """Point discord.py at this fake (Route.BASE and DEFAULT_GATEWAY); returns an undo."""
        import discord.gateway
        import discord.http
        import yarl

        old = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

        def undo() -> None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old

        return undo

    def env(self) -> dict[str, str]:
        """Environment for a bot process pointed at this fake (test-only variables)."""
        return {
            "DISCORD_TOKEN": self.token,
            "DISCORD_GUILD_ID": str(self.guild_id),
            "LORABOT_DISCORD_API_BASE": self.api_base,
            "LORABOT_DISCORD_GATEWAY": self.gateway_url,
            "LORABOT_TEST_ENDPOINTS": "1",
        }

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        r = app.router
        r.add_get("/gateway", self._gateway)
        r.add_get("/cdn/attachments/{id}/{name}", self._attachment)
        a = API
        r.add_get(a + "/gateway/bot", self._gateway_bot)
        r.add_get(a + "/gateway", self._gateway_bot)
        r.add_get(a + "/users/@me", self._me)
        r.add_post(a + "/users/@me/channels", self._open_dm)
        r.add_get(a + "/users/{uid}", self._get_user)
        r.add_get(a + "/users/@me/guilds", self._my_guilds)
        r.add_get(a + "/oauth2/applications/@me", self._app_info)
        r.add_get(a + "/applications/@me", self._app_info)
        r.add_put(a + "/applications/{app}/commands", self._put_commands)
        r.add_get(a + "/applications/{app}/commands", self._get_commands)
        r.add_put(a + "/applications/{app}/guilds/{gid}/commands", self._put_commands)
        r.add_get(a + "/applications/{app}/guilds/{gid}/commands", self._get_commands)
        r.add_post(a + "/interactions/{iid}/{token}/callback", self._callback)
        r.add_post(a + "/webhooks/{app}/{token}", self._followup)
        r.add_get(a + "/webhooks/{app}/{token}/messages/{mid}", self._webhook_get)
        r.add_patch(a + "/webhooks/{app}/{token}/messages/{mid}", self._webhook_edit)
        r.add_delete(a + "/webhooks/{app}/{token}/messages/{mid}", self._webhook_delete)
        r.add_get(a + "/channels/{cid}", self._get_channel)
        r.add_post(a + "/channels/{cid}/messages", self._channel_send)
        r.add_get(a + "/channels/{cid}/messages/{mid}", self._channel_get)
        r.add_patch(a + "/channels/{cid}/messages/{mid}", self._channel_edit)
        r.add_delete(a + "/channels/{cid}/messages/{mid}", self._channel_delete)
        r.add_post(a + "/channels/{cid}/messages/{mid}/threads", self._start_thread)
        r.add_post(a + "/channels/{cid}/typing", self._typing)
        r.add_delete(a + "/users/@me/guilds/{gid}", self._leave_guild)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_base = self.base_url + API
        self.gateway_url = f"ws://127.0.0.1:{port}/gateway"
        self._ready.set()
        loop.run_forever()
        loop.close()

    # --- small helpers ------------------------------------------------------------------------
    def snowflake(self) -> int:
        with self._lock:
            n = next(self._ids)
        return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (n & 0x3FFFFF)

    @staticmethod
    def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        # discord.py parses only an exact `application/json` content type
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return web.Response(status=status, body=json.dumps(body).encode(), headers=h)

    def _error(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
        body: dict[str, Any] = {"code": code, "message": message, **extra}
        if errors:
            body["errors"] = errors
        with self._lock:
            self.rejected.append({"status": status, "code": code, "message": message})
        return self._json(body, status, headers)

    def _form_error(self, path: str, message: str, code: str = "BASE_TYPE_MAX_LENGTH") -> web.Response:
        """400 / 50035 with the field path, as Discord nests it ("embeds.0.title" -> nested dicts)."""
        errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
        for part in reversed(path.split(".")):
            errors = {part: errors}
        return self._error(400, 50035, "Invalid Form Body", errors)

    # --- clock, channels and permissions ------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock: tokens expire and messages age as if `seconds` had passed."""
        with self._lock:
            self.clock_offset += seconds

    def set_bot_permissions(self, channel_id: int, permissions: int) -> None:
        """What the bot may do in a channel (and its threads): drives `app_permissions` and 403s."""
        with self._lock:
            self.bot_permissions[channel_id] = permissions
            self.text_channels.setdefault(channel_id, f"channel-{channel_id % 10_000}")

    def add_text_channel(self, name: str = "other", permissions: int = DEFAULT_BOT_PERMISSIONS) -> int:
        cid = self.snowflake()
        with self._lock:
            self.text_channels[cid] = name
            self.bot_permissions[cid] = permissions
        return cid

    def archive_thread(self, thread_id: int, *, locked: bool = False) -> None:
        with self._lock:
            meta = self.threads[thread_id]["thread_metadata"]
            meta["archived"], meta["locked"] = True, locked

    def _parent(self, cid: int) -> int:
        thread = self.threads.get(cid)
        return int(thread["parent_id"]) if thread is not None else cid

    def permissions_for(self, cid: int) -> int:
        if cid in self.dm_channels.values():
            return DM_CHANNEL_PERMISSIONS
        return self.bot_permissions.get(self._parent(cid), 0)

    def dms(self, user_id: int) -> list[FakeMessage]:
        """Messages the bot sent to this user's DM channel, oldest first."""
        cid = self.dm_channels.get(user_id)
        return [] if cid is None else self.channel_messages(cid)

    def _mentions(self, payload: dict[str, Any]) -> list[int]:
        """Who a message body pings: the mentions in its content that `allowed_mentions` lets through."""
        ids = [int(x) for x in MENTION_RE.findall(payload.get("content") or "")]
        allowed = payload.get("allowed_mentions")
        if allowed is None:
            return sorted(set(ids))
        if "users" in (allowed.get("parse") or []):
            return sorted(set(ids))
        listed = {int(u) for u in allowed.get("users") or []}
        return sorted(set(ids) & listed)

    def _validate_message(self, payload: dict[str, Any], files: list[FakeFile], *, create: bool) -> web.Response | None:
        """What Discord refuses in any message body (create or edit, channel or interaction route)."""
        content = payload.get("content")
        if content is not None and len(content) > 2000:
            return self._form_error("content", "Must be 2000 or fewer in length.")
        embeds = payload.get("embeds") or []
        if len(embeds) > 10:
            return self._form_error("embeds", "Must be 10 or fewer in length.")
        for i, e in enumerate(embeds):
            for key, limit in EMBED_LIMITS.items():
                if key == "fields":
                    if len(e.get("fields") or []) > limit:
                        return self._form_error(f"embeds.{i}.fields", f"Must be {limit} or fewer in length.")
                    continue
                if key.startswith("field."):
                    sub = key.split(".")[1]
                    for j, f in enumerate(e.get("fields") or []):
                        if not f.get(sub):
                            return self._form_error(f"embeds.{i}.fields.{j}.{sub}", "This field is required",
                                                    "BASE_TYPE_REQUIRED")
                        if len(f[sub]) > limit:
                            return self._form_error(f"embeds.{i}.fields.{j}.{sub}",
                                                    f"Must be {limit} or fewer in length.")
                    continue
                outer, _, inner = key.partition(".")
                value = (e.get(outer) or {}).get(inner) if inner else e.get(outer)
                if value is not None and len(str(value)) > limit:
                    return self._form_error(f"embeds.{i}.{key}", f"Must be {limit} or fewer in length.")
        if sum(_embed_len(e) for e in embeds) > 6000:
            return self._form_error("embeds", "Embed size exceeds maximum size of 6000")
        for r, row in enumerate(payload.get("components") or []):
            for c, comp in enumerate(row.get("components") or []):
                if len(comp.get("custom_id") or "") > 100:
                    return self._form_error(f"components.{r}.components.{c}.custom_id",
                                            "Must be 100 or fewer in length.")
        if any(len(f.data) > 10 * 1024**2 for f in files):
            return self._error(413, 40005, "Request entity too large")
        if create and not (content or embeds or files or payload.get("components") or payload.get("sticker_ids")
                           or payload.get("poll")):
            return self._error(400, 50006, "Cannot send an empty message")
        return None

    def _check_send(self, cid: int, payload: dict[str, Any], files: list[FakeFile], *,
                    create: bool) -> web.Response | None:
        """The bot token's permissions in a channel; may drop embeds Discord would not show."""
        perms = self.permissions_for(cid)
        if cid in self.dm_channels.values():
            user = next(u for u, c in self.dm_channels.items() if c == cid)
            if user in self.dm_closed:
                return self._error(403, 50007, "Cannot send messages to this user")
            return None
        if not perms & VIEW_CHANNEL:
            return self._error(403, 50001, "Missing Access")
        thread = self.threads.get(cid)
        if create:
            needed = SEND_MESSAGES_IN_THREADS if thread is not None else SEND_MESSAGES
            if not perms & needed:
                return self._error(403, 50013, "Missing Permissions")
        if thread is not None:
            meta = thread["thread_metadata"]
            if meta["locked"] or (meta["archived"] and not create):
                return self._error(400, 50083, "Thread is archived")
            meta["archived"] = False  # a new message unarchives it
        if files and not perms & ATTACH_FILES:
            return self._error(403, 50013, "Missing Permissions")
        if payload.get("embeds") and not perms & EMBED_LINKS:
            if create and not (payload.get("content") or files):
                return self._error(403, 50013, "Missing Permissions")
            payload["embeds"] = []  # with text present, the embed is simply not shown
        return None

    def user_json(self, user_id: int, name: str | None = None, *, bot: bool = False) -> dict[str, Any]:
        return {
            "id": str(user_id), "username": name or f"user{user_id % 10_000}", "discriminator": "0",
            "global_name": name, "avatar": None, "bot": bot, "public_flags": 0,
        }

    def _bot_user(self) -> dict[str, Any]:
        return self.user_json(self.bot_user_id, "lorabot", bot=True)

    def channel_json(self, channel_id: int) -> dict[str, Any]:
        thread = self.threads.get(channel_id)
        if thread is not None:
            return thread
        for user_id, dm in self.dm_channels.items():
            if dm == channel_id:
                return {"id": str(dm), "type": 1, "last_message_id": None, "flags": 0,
                        "recipients": [self.user_json(user_id)]}
        return {
            "id": str(channel_id), "type": 0, "guild_id": str(self.guild_id),
            "name": self.text_channels.get(channel_id, "training"),
            "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
            "rate_limit_per_user": 0, "last_message_id": None, "flags": 0,
        }

    def _message_json(self, m: FakeMessage) -> dict[str, Any]:
        return {
            "id": str(m.id), "channel_id": str(m.channel_id), "type": 0 if not m.interaction_id else 20,
            "content": m.content, "author": self._bot_user(), "attachments": [
                {"id": str(f.id), "filename": f.filename, "size": len(f.data),
                 "url": f"{self.base_url}/cdn/attachments/{m.id}/{f.filename}",
                 "proxy_url": f"{self.base_url}/cdn/attachments/{m.id}/{f.filename}",
                 "content_type": f.content_type}
                for f in m.files
            ],
            "embeds": m.embeds, "mentions": [self.user_json(u) for u in m.mentions], "mention_roles": [],
            "pinned": False, "mention_everyone": False,
            "tts": False, "timestamp": _iso(m.created_at), "edited_timestamp": _iso() if m.edits else None,
            "flags": m.flags, "components": m.components,
            **({} if m.channel_id in self.dm_channels.values() else {"guild_id": str(self.guild_id)}),
            "webhook_id": str(self.app_id) if m.webhook_token else None,
        }

    async def _read_payload(self, request: web.Request) -> tuple[dict[str, Any], list[FakeFile], bytes]:
        """JSON body, or multipart with payload_json + files[n]."""
        raw = await request.read()
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            # the middleware already read the body, so parse the bytes (stdlib MIME parser)
            msg = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw, policy=email.policy.HTTP)
            payload: dict[str, Any] = {}
            files: list[FakeFile] = []
            for part in msg.iter_parts():
                data = part.get_payload(decode=True) or b""
                assert isinstance(data, bytes)
                if part.get_param("name", header="content-disposition") == "payload_json":
                    payload = json.loads(data)
                else:
                    files.append(FakeFile(part.get_filename() or "file", data, part.get_content_type()))
            return payload, files, raw
        if not raw:
            return {}, [], raw
        body = json.loads(raw)
        return (body if isinstance(body, dict) else {"_list": body}), [], raw

    # --- middleware: record, latency, rate limits, auth ---------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/gateway" or request.path.startswith("/cdn/"):
            return await handler(request)
        raw = await request.read()
        entry: dict[str, Any] = {"method": request.method, "path": request.path, "query": dict(request.query),
                                 "body": raw, "at": time.time(), "status": None}
        with self._lock:
            self.requests.append(entry)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        key = f"{request.method} {request.path}"
        rule = self._match_rate_limit(key)
        if rule is not None:
            entry["status"] = 429
            with self._lock:
                self.rate_limited.append(key)
            body = {"message": "You are being rate limited.", "retry_after": rule.retry_after,
                    "global": rule.global_}
            if rule.code is not None:
                body["code"] = rule.code
            headers = {"Via": "1.1 google", "Retry-After": str(max(1, int(rule.retry_after)))}
            if rule.cloudflare:  # Cloudflare's HTML answer: no Via, not JSON
                return web.Response(status=429, text="<html>error code: 1015</html>",
                                    headers={"Retry-After": headers["Retry-After"]}, content_type="text/html")
            if rule.global_:
                headers["X-RateLimit-Global"] = "true"
            else:
                headers["X-RateLimit-Scope"] = "user"
            return self._json(body, 429, headers)
        is_interaction_route = request.path.startswith((API + "/webhooks/", API + "/interactions/"))
        if not is_interaction_route and request.headers.get("Authorization") != f"Bot {self.token}":
            entry["status"] = 401
            return self._error(401, 0, "401: Unauthorized")
        bucket, limited = self._take_bucket(request)
        if limited is not None:
            entry["status"] = 429
            with self._lock:
                self.rate_limited.append(key)
            return limited
        resp = await handler(request)
        entry["status"] = resp.status
        if bucket is not None and resp.status < 300:
            resp.headers.update(bucket)
        return resp

    def _take_bucket(self, request: web.Request) -> tuple[dict[str, str] | None, web.Response | None]:
        """X-RateLimit-* headers per route and major parameter (channel, webhook), as Discord sends them."""
        info = request.match_info
        major = info.get("cid") or info.get("token") or info.get("app") or ""
        route = getattr(request.match_info.route.resource, "canonical", request.path)
        key = f"{request.method} {route} {major}"
        now = time.monotonic()
        with self._lock:
            hits = [t for t in self._buckets.get(key, []) if now - t < self.bucket_window_s]
            over = len(hits) >= self.bucket_limit
            if not over or not self.enforce_buckets:
                hits.append(now)
            self._buckets[key] = hits
        reset_after = max(0.001, self.bucket_window_s - (now - hits[0])) if hits else self.bucket_window_s
        headers = {"X-RateLimit-Limit": str(self.bucket_limit),
                   "X-RateLimit-Remaining": str(max(0, self.bucket_limit - len(hits))),
                   "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                   "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                   "X-RateLimit-Bucket": hashlib.sha1(key.encode()).hexdigest()[:16]}
        if over and self.enforce_buckets:
            body = {"message": "You are being rate limited.", "retry_after": round(reset_after, 3), "global": False}
            headers.update({"Via": "1.1 google", "Retry-After": str(max(1, round(reset_after))),
                            "X-RateLimit-Scope": "user"})
            return None, self._json(body, 429, headers)
        return headers, None

    def _match_rate_limit(self, key: str) -> RateLimitRule | None:
        with self._lock:
            for rule in self.rate_limits:
                if rule.hits < rule.count and re.search(rule.pattern, key):
                    rule.hits += 1
                    return rule
        return None

    # --- knobs --------------------------------------------------------------------------------
    def rate_limit(self, pattern: str = ".", *, count: int = 1, retry_after: float = 0.05,
                   global_: bool = False, cloudflare: bool = False) -> RateLimitRule:
        """Answer the next `count` requests whose "METHOD /path" matches `pattern` with a 429
        (`cloudflare`: the HTML 429 without a Via header that a Cloudflare ban gives)."""
        rule = RateLimitRule(pattern, count, retry_after, global_, cloudflare=cloudflare)
        with self._lock:
            self.rate_limits.append(rule)
        return rule

    def expire_tokens(self) -> None:
        """Every interaction token issued so far is now expired."""
        with self._lock:
            for ix in self.interactions.values():
                ix.created_at -= self.token_lifetime_s + 1

    # --- REST: login and commands -------------------------------------------------------------
    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return self._json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})

    async def _me(self, request: web.Request) -> web.Response:
        return self._json(self._bot_user())

    async def _get_user(self, request: web.Request) -> web.Response:
        return self._json(self.user_json(int(request.match_info["uid"])))

    async def _open_dm(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read() or b"{}")
        user_id = int(body.get("recipient_id") or 0)
        if not user_id:
            return self._form_error("recipient_id", "This field is required", "BASE_TYPE_REQUIRED")
        with self._lock:
            cid = self.dm_channels.setdefault(user_id, self.snowflake())
        return self._json(self.channel_json(cid))

    async def _my_guilds(self, request: web.Request) -> web.Response:
        # partial guilds; `permissions` is the bot's total in the guild (roles, no channel overwrites)
        if self.guild_permissions is None:
            return self._json([])
        return self._json([{"id": str(gid), "name": "fake guild" if gid == self.guild_id else f"other guild {gid}",
                            "icon": None, "banner": None, "owner": False, "permissions": str(self.guild_permissions),
                            "features": [], "approximate_member_count": 3, "approximate_presence_count": 1}
                           for gid in [self.guild_id, *self.other_guilds] if gid not in self.left_guilds])

    async def _app_info(self, request: web.Request) -> web.Response:
        return self._json({
            "id": str(self.app_id), "name": "lorabot", "description": "", "icon": None, "bot_public": self.bot_public,
            "bot_require_code_grant": False, "owner": self.user_json(1, "owner"), "verify_key": "00", "flags": 0,
            "team": None, "summary": "",
        })

    def _scope(self, request: web.Request) -> str:
        return request.match_info.get("gid", "global")

    def _invalid_commands(self, body: list[Any]) -> web.Response | None:
        """What Discord refuses in a bulk overwrite (application-commands.mdx)."""
        if len(body) > 100:
            return self._form_error("_", "Must be 100 or fewer in length.")
        for i, cmd in enumerate(body):
            if not re.fullmatch(r"[-_\w]{1,32}", str(cmd.get("name", ""))) or cmd["name"] != cmd["name"].lower():
                return self._form_error(f"{i}.name", "Command name is invalid", "APPLICATION_COMMAND_INVALID_NAME")
            if cmd.get("type", 1) == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
                return self._form_error(f"{i}.description", "Must be between 1 and 100 in length.")
            options = cmd.get("options") or []
            if len(options) > 25:
                return self._form_error(f"{i}.options", "Must be 25 or fewer in length.")
            seen_optional = False
            for j, opt in enumerate(options):
                if not 1 <= len(opt.get("description") or "") <= 100:
                    return self._form_error(f"{i}.options.{j}.description", "Must be between 1 and 100 in length.")
                if len(opt.get("choices") or []) > 25:
                    return self._form_error(f"{i}.options.{j}.choices", "Must be 25 or fewer in length.")
                if opt.get("required") and seen_optional:
                    return self._form_error(f"{i}.options.{j}.required", "Required options must be placed before "
                                            "non-required options", "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID")
                seen_optional = seen_optional or not opt.get("required")
            if len(json.dumps(cmd)) > 8000 * 2:  # name + description + values <= 8000 (JSON overhead allowed)
                return self._form_error(f"{i}", "Command exceeds maximum size (8000)")
        return None

    async def _put_commands(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if not isinstance(body, list):
            return self._error(400, 50035, "Invalid Form Body")
        invalid = self._invalid_commands(body)
        if invalid is not None:
            return invalid
        scope = self._scope(request)
        known = {c.get("name") for c in self.commands.get(scope, [])}
        with self._lock:
            self.command_creates[scope] = self.command_creates.get(scope, 0) + sum(
                1 for c in body if c.get("name") not in known)
            if self.command_creates[scope] > self.max_command_creates:
                return self._error(429, 30034, "Max number of daily application command creates has been reached "
                                   "(200)", headers={"Via": "1.1 google", "Retry-After": "86400"},
                                   retry_after=86400, **{"global": False})  # type: ignore[arg-type]
        out = []
        for cmd in body:
            stored = dict(cmd, id=str(self.snowflake()), application_id=str(self.app_id), version="1")
            if scope != "global":
                stored["guild_id"] = scope
            out.append(stored)
        with self._lock:
            self.commands[scope] = out
            self.command_puts.append((scope, body))
        return self._json(out)

    async def _get_commands(self, request: web.Request) -> web.Response:
        return self._json(self.commands.get(self._scope(request), []))

    # --- REST: interactions and webhooks ------------------------------------------------------
    def _interaction_by_token(self, token: str) -> FakeInteraction | None:
        with self._lock:
            return next((i for i in self.interactions.values() if i.token == token), None)

    def _expired(self, ix: FakeInteraction) -> bool:
        return self.now() - ix.created_at > self.token_lifetime_s

    def _new_message(self, channel_id: int, payload: dict[str, Any], files: list[FakeFile], *,
                     token: str | None = None, interaction_id: int | None = None, deferred: bool = False,
                     author_id: int | None = None) -> FakeMessage:
        for f in files:
            f.id = f.id or self.snowflake()
        mentions = self._mentions(payload)
        m = FakeMessage(
            id=self.snowflake(), channel_id=channel_id, content=payload.get("content") or "",
            embeds=payload.get("embeds") or [], components=payload.get("components") or [], files=files,
            flags=int(payload.get("flags") or 0), author_id=author_id or self.bot_user_id, webhook_token=token,
            interaction_id=interaction_id, deferred=deferred, created_at=self.now(), mentions=mentions,
            mentions_per_write=[mentions],
        )
        if interaction_id is not None:
            m.recipient_id = self.interactions[interaction_id].user_id
        with self._lock:
            self.messages[m.id] = m
        return m

    def _apply_edit(self, m: FakeMessage, payload: dict[str, Any], files: list[FakeFile]) -> None:
        for f in files:
            f.id = f.id or self.snowflake()
        with self._lock:
            m.edits.append(dict(payload, _files=[f.filename for f in files]))
            if "content" in payload:
                # an edit notifies only users who were not mentioned before (Discord never re-pings)
                now_mentioned = self._mentions(payload)
                m.mentions_per_write.append([u for u in now_mentioned if u not in m.mentions])
                m.mentions = now_mentioned
            for key in ("content", "embeds", "components", "flags"):
                if key in payload:
                    value = payload[key]
                    if key == "content":
                        m.content = value or ""
                    elif key == "flags":
                        m.flags = int(value or 0) | (m.flags & EPHEMERAL)
                    else:
                        setattr(m, key, value or [])
            if "attachments" in payload:
                keep_ids = {str(a["id"]) for a in payload["attachments"] if "id" in a}
                kept = [f for f in m.files if str(f.id) in keep_ids]
                m.files = kept + files
            elif files:
                m.files = m.files + files
            m.deferred = False

    async def _callback(self, request: web.Request) -> web.Response:
        iid = int(request.match_info["iid"])
        token = request.match_info["token"]
        ix = self.interactions.get(iid)
        if ix is None or ix.token != token:
            return self._error(404, 10062, "Unknown interaction")
        if self.now() - ix.created_at > 3.0 + self.latency_s * 2 and not ix.callbacks and self._strict_3s:
            return self._error(404, 10062, "Unknown interaction")
        if self._expired(ix):
            return self._error(404, 10062, "Unknown interaction")
        if ix.callbacks and ix.type != 4:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        payload, files, _ = await self._read_payload(request)
        kind = int(payload.get("type", 0))
        data = payload.get("data") or {}
        if kind in (6, 7) and ix.type != 3:
            return self._form_error("type", "Interaction callback type is not valid here", "INTERACTION_TYPE")
        if kind in (4, 7):
            invalid = self._validate_message(data, files, create=kind == 4)
            if invalid is not None:
                return invalid
        with self._lock:
            ix.callbacks.append({"type": kind, "data": data, "at": time.time()})
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            m = self._new_message(ix.channel_id, data if kind == 4 else {"flags": data.get("flags", 0)}, files,
                                  token=token, interaction_id=iid, deferred=kind == 5)
            ix.original_id = m.id
            resource["message"] = self._message_json(m)
        elif kind in (6, 7):
            source = self._source_message_id(ix)
            ix.original_id = source  # @original of a component interaction is the pressed message
            if kind == 7 and source in self.messages:
                self._apply_edit(self.messages[source], data, files)
                resource["message"] = self._message_json(self.messages[source])
        answer = {"interaction": {"id": str(iid), "type": ix.type, "response_message_loading": kind == 5,
                                  "response_message_ephemeral": bool(int(data.get("flags") or 0) & EPHEMERAL),
                                  "response_message_id": str(ix.original_id) if ix.original_id else None},
                  "resource": resource}
        return self._json(answer)

    _strict_3s = False  # answer 10062 to a first callback later than 3 s (off: CI machines are slow)

    def _source_message_id(self, ix: FakeInteraction) -> int | None:
        return self._sources.get(ix.id)

    def _webhook_ix(self, request: web.Request) -> tuple[FakeInteraction | None, web.Response | None]:
        ix = self._interaction_by_token(request.match_info["token"])
        if ix is None or self._expired(ix):
            return None, self._error(401, 50027, "Invalid Webhook Token")
        return ix, None

    async def _followup(self, request: web.Request) -> web.Response:
        ix, err = self._webhook_ix(request)
        if err is not None:
            return err
        assert ix is not None
        payload, files, _ = await self._read_payload(request)
        original = self.messages.get(ix.original_id or 0)
        invalid = self._validate_message(payload, files, create=True)
        if invalid is not None:
            return invalid
        if original is not None and original.deferred:
            # the first followup after a thinking defer edits the loading message, and keeps the
            # deferral's visibility: its own ephemeral flag is ignored (receiving-and-responding.mdx)
            flags = original.flags
            self._apply_edit(original, payload, files)
            original.flags = flags
            m = original
        else:
            m = self._new_message(ix.channel_id, payload, files, token=ix.token, interaction_id=ix.id)
        with self._lock:
            ix.followup_ids.append(m.id)
        return self._json(self._message_json(m))

    def _webhook_message(self, ix: FakeInteraction, mid: str) -> FakeMessage | None:
        if mid == "@original":
            return self.messages.get(ix.original_id or 0)
        m = self.messages.get(int(mid))
        return m if m is not None and m.webhook_token == ix.token else None

    async def _webhook_get(self, request: web.Request) -> web.Response:
        ix, err = self._webhook_ix(request)
        if err is not None:
            return err
        assert ix is not None
        m = self._webhook_message(ix, request.match_info["mid"])
        return self._json(self._message_json(m)) if m else self._error(404, 10008, "Unknown Message")

    async def _webhook_edit(self, request: web.Request) -> web.Response:
        ix, err = self._webhook_ix(request)
        if err is not None:
            return err
        assert ix is not None
        m = self._webhook_message(ix, request.match_info["mid"])
        if m is None:
            return self._error(404, 10008, "Unknown Message")
        payload, files, _ = await self._read_payload(request)
        invalid = self._validate_message(payload, files, create=False)
        if invalid is not None:
            return invalid
        self._apply_edit(m, payload, files)
        return self._json(self._message_json(m))

    async def _webhook_delete(self, request: web.Request) -> web.Response:
        ix, err = self._webhook_ix(request)
        if err is not None:
            return err
        assert ix is not None
        m = self._webhook_message(ix, request.match_info["mid"])
        if m is None:
            return self._error(404, 10008, "Unknown Message")
        with self._lock:
            self.messages.pop(m.id, None)
        return web.Response(status=204)

    # --- REST: channels -----------------------------------------------------------------------
    def _known_channel(self, cid: int) -> bool:
        return cid in self.text_channels or cid in self.threads or cid in self.dm_channels.values()

    async def _get_channel(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["cid"])
        if not self._known_channel(cid):
            return self._error(404, 10003, "Unknown Channel")
        return self._json(self.channel_json(cid))

    async def _channel_send(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["cid"])
        if not self._known_channel(cid):
            return self._error(404, 10003, "Unknown Channel")
        payload, files, _ = await self._read_payload(request)
        refused = self._check_send(cid, payload, files, create=True) or self._validate_message(payload, files,
                                                                                                create=True)
        if refused is not None:
            return refused
        m = self._new_message(cid, payload, files)
        return self._json(self._message_json(m))

    async def _channel_get(self, request: web.Request) -> web.Response:
        m = self.messages.get(int(request.match_info["mid"]))
        if m is not None and m.channel_id != int(request.match_info["cid"]):
            m = None
        return self._json(self._message_json(m)) if m else self._error(404, 10008, "Unknown Message")

    async def _channel_edit(self, request: web.Request) -> web.Response:
        m = self.messages.get(int(request.match_info["mid"]))
        if m is None or m.channel_id != int(request.match_info["cid"]):
            return self._error(404, 10008, "Unknown Message")
        if m.ephemeral:
            return self._error(404, 10008, "Unknown Message")  # ephemerals are only editable by token
        payload, files, _ = await self._read_payload(request)
        refused = self._check_send(m.channel_id, payload, files, create=False) or self._validate_message(
            payload, files, create=False)
        if refused is not None:
            return refused
        if self.now() - m.created_at > OLD_MESSAGE_S:
            with self._lock:
                m.old_edits += 1
                capped = m.old_edits > self.old_edit_cap
            if capped:  # it arrives as a 429 (aikaterna/aikaterna-cogs#302)
                return self._error(429, 30046, "Maximum number of edits to messages older than 1 hour reached. "
                                   "Try again later", headers={"Via": "1.1 google", "Retry-After": "1"},
                                   retry_after=0.05, **{"global": False})  # type: ignore[arg-type]
        self._apply_edit(m, payload, files)
        return self._json(self._message_json(m))

    async def _channel_delete(self, request: web.Request) -> web.Response:
        with self._lock:
            self.messages.pop(int(request.match_info["mid"]), None)
        return web.Response(status=204)

    async def _start_thread(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["cid"])
        mid = int(request.match_info["mid"])
        m = self.messages.get(mid)
        if m is None or m.channel_id != cid:
            return self._error(404, 10008, "Unknown Message")
        if cid in self.threads:
            return self._error(400, 50024, "Cannot execute action on this channel type")
        perms = self.permissions_for(cid)
        if not perms & VIEW_CHANNEL:
            return self._error(403, 50001, "Missing Access")
        if not perms & CREATE_PUBLIC_THREADS:
            return self._error(403, 50013, "Missing Permissions")
        if m.thread_id is not None or mid in self.threads:
            return self._error(400, 160004, "A thread has already been created for this message")
        body = json.loads(await request.read() or b"{}")
        thread_id = mid  # Discord gives a thread started from a message the message's id
        thread = {
            "id": str(thread_id), "type": 11, "guild_id": str(self.guild_id), "parent_id": str(cid),
            "owner_id": str(self.bot_user_id), "name": body.get("name", "thread"), "last_message_id": None,
            "rate_limit_per_user": 0, "message_count": 0, "member_count": 1, "flags": 0,
            "thread_metadata": {"archived": False, "auto_archive_duration": body.get("auto_archive_duration", 1440),
                                "archive_timestamp": _iso(), "locked": False},
        }
        with self._lock:
            self.threads[thread_id] = thread
            m.thread_id = thread_id
        for ws in list(self._sockets):  # the guilds intent receives it, as from Discord
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._dispatch(ws, "THREAD_CREATE", dict(thread, newly_created=True))
        return self._json(thread, 201)

    async def _typing(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _leave_guild(self, request: web.Request) -> web.Response:
        gid = int(request.match_info["gid"])
        with self._lock:
            self.left_guilds.append(gid)
        for ws in list(self._sockets):
            await self._dispatch(ws, "GUILD_DELETE", {"id": str(gid)})
        return web.Response(status=204)

    async def _attachment(self, request: web.Request) -> web.Response:
        if self.cdn_latency_s:
            await asyncio.sleep(self.cdn_latency_s)
        f = self.attachments.get(int(request.match_info["id"]))
        with self._lock:
            self.downloads.append(int(request.match_info["id"]))
        if f is None:
            return web.Response(status=404)
        return web.Response(body=f.data, headers={"Content-Type": f.content_type or "application/octet-stream"})

    # --- gateway ------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame.get("op")
                if op == 1:
                    self.heartbeats += 1
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    if frame["d"].get("token") != self.token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    self.identifies += 1
                    await self._send_ready(ws)
                    self._identified.set()
                elif op == 6:
                    self.resumes += 1
                    await self._dispatch(ws, "RESUMED", {})
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
        return ws

    async def _dispatch(self, ws: web.WebSocketResponse, event: str, data: Any) -> None:
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    def guild_json(self, guild_id: int | None = None) -> dict[str, Any]:
        gid = guild_id or self.guild_id
        everyone = {"id": str(gid), "name": "@everyone", "permissions": "1071698660929", "position": 0,
                    "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
        roles = [everyone] + [
            {"id": str(rid), "name": name, "permissions": "0", "position": i + 1, "color": 0, "hoist": False,
             "managed": False, "mentionable": False, "flags": 0}
            for i, (name, rid) in enumerate(self.roles.items())
        ]
        return {
            "id": str(gid), "name": "fake guild" if gid == self.guild_id else f"other guild {gid}", "icon": None,
            "owner_id": "1", "roles": roles, "emojis": [], "stickers": [], "features": [],
            "channels": [self.channel_json(c) for c in self.text_channels],
            "threads": [], "members": [], "voice_states": [], "presences": [], "member_count": 3,
            "large": False, "unavailable": False, "premium_tier": 0, "joined_at": _iso(),
            "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "system_channel_flags": 0, "preferred_locale": "en-US",
            "nsfw_level": 0, "premium_subscription_count": 0, "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        await self._dispatch(ws, "READY", {
            "v": 10, "user": self._bot_user(),
            "guilds": [{"id": str(g), "unavailable": True} for g in [self.guild_id, *self.other_guilds]],
            "session_id": "fake-session", "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.app_id), "flags": 0}, "private_channels": [], "relationships": [],
        })
        await self._dispatch(ws, "GUILD_CREATE", self.guild_json())
        for gid in self.other_guilds:
            await self._dispatch(ws, "GUILD_CREATE", self.guild_json(gid))

    def join_guild(self, guild_id: int) -> None:
        """The bot is added to another guild (someone used its install link): GUILD_CREATE without
        `unavailable` (its presence, false, marks an outage ending, which discord.py reports as
        guild_available rather than guild_join)."""
        data = self.guild_json(guild_id)
        data.pop("unavailable")
        self._broadcast("GUILD_CREATE", data)

    def wait_identified(self, timeout: float = 10.0) -> bool:
        return self._identified.wait(timeout)

    def disconnect_gateway(self, code: int = 4000) -> None:
        """Close every gateway socket (the client should resume or re-identify)."""
        assert self._loop is not None

        async def close_all() -> None:
            for ws in list(self._sockets):
                await ws.close(code=code)

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)

    def _broadcast(self, event: str, data: dict[str, Any]) -> None:
        assert self._loop is not None

        async def send() -> None:
            if not self._sockets:
                raise RuntimeError("no gateway client is connected")
            for ws in list(self._sockets):
                await self._dispatch(ws, event, data)

        asyncio.run_coroutine_threadsafe(send(), self._loop).result(5)

    # --- injecting interactions ---------------------------------------------------------------
    def member_json(self, user_id: int, name: str | None = None, *, roles: Sequence[str] = (),
                    permissions: int = 0) -> dict[str, Any]:
        return {
            "user": self.user_json(user_id, name), "roles": [str(self.roles[r]) for r in roles],
            "joined_at": _iso(), "deaf": False, "mute": False, "flags": 0, "permissions": str(permissions),
            "nick": None, "avatar": None, "pending": False,
        }

    def add_attachment(self, filename: str, data: bytes, content_type: str | None = "application/zip",
                       *, size: int | None = None) -> dict[str, Any]:
        """Host bytes at a URL of this fake; returns the resolved-attachment dict (size may lie)."""
        aid = self.snowflake()
        self.attachments[aid] = FakeFile(filename, data, content_type)
        return {"id": str(aid), "filename": filename, "size": len(data) if size is None else size,
                "url": f"{self.base_url}/cdn/attachments/{aid}/{filename}",
                "proxy_url": f"{self.base_url}/cdn/attachments/{aid}/{filename}", "content_type": content_type}

    def _new_interaction(self, kind: int, name: str, user_id: int, data: dict[str, Any], *, user_name: str | None,
                         roles: Sequence[str], permissions: int, source: int | None = None,
                         guild_id: int | None = None, channel_id: int | None = None,
                         dm: bool = False) -> FakeInteraction:
        iid = self.snowflake()
        token = f"itoken-{iid}"
        if dm:
            with self._lock:
                channel_id = self.dm_channels.setdefault(user_id, self.snowflake())
        cid = channel_id or self.channel_id
        ix = FakeInteraction(iid, token, kind, name, user_id, cid, self.now())
        with self._lock:
            self.interactions[iid] = ix
            if source is not None:  # registered before the event goes out: a fast UPDATE_MESSAGE finds it
                self._sources[iid] = source
        gid = guild_id or self.guild_id
        payload: dict[str, Any] = {
            "id": str(iid), "application_id": str(self.app_id), "type": kind, "token": token, "version": 1,
            "channel_id": str(cid),
            "channel": self.channel_json(cid) if dm else dict(self.channel_json(cid), guild_id=str(gid)),
            # computed from the channel's permissions, as Discord does (an invitation's perms, overwrites)
            "app_permissions": str(self.permissions_for(cid)), "locale": "en-US",
            "attachment_size_limit": 10 * 1024**2, "entitlements": [], "data": data,
        }
        if dm:
            payload.update(user=self.user_json(user_id, user_name), context=1,
                           authorizing_integration_owners={"0": "0"})
            data.pop("guild_id", None)
        else:
            payload.update(guild_id=str(gid), guild_locale="en-US", context=0,
                           member=self.member_json(user_id, user_name, roles=roles, permissions=permissions),
                           authorizing_integration_owners={"0": str(gid)})
        if source is not None:
            payload["message"] = self._message_json(self.messages[source])
        self._broadcast("INTERACTION_CREATE", payload)
        return ix

    @staticmethod
    def _option(name: str, value: Any) -> dict[str, Any]:
        if isinstance(value, bool):
            kind = 5
        elif isinstance(value, int):
            kind = 4
        elif isinstance(value, float):
            kind = 10
        else:
            kind = 3
        return {"name": name, "type": kind, "value": value}

    def _synced(self, name: str, *, dm: bool, guild_id: int | None = None) -> dict[str, Any] | None:
        scopes = ["global"] if dm else [str(guild_id or self.guild_id), "global"]
        with self._lock:
            for scope in scopes:
                for cmd in self.commands.get(scope, []):
                    if cmd.get("name") == name:
                        return cmd
        return None

    def _typed_options(self, name: str, options: dict[str, Any], *, dm: bool, focused: str | None,
                       attachments: Sequence[str], guild_id: int | None = None) -> list[dict[str, Any]]:
        """Options as a Discord client would send them: only for a synced command, typed from its
        definition, with required options, choices and ranges enforced (the client refuses otherwise)."""
        if not self.commands:  # nothing synced (a test that skips the sync): guess the types
            return [self._option(k, v) for k, v in options.items()]
        cmd = self._synced(name, dm=dm, guild_id=guild_id)
        if cmd is None:
            raise ValueError(f"/{name} is not a synced command here; a Discord client cannot send it")
        defs = {o["name"]: o for o in cmd.get("options") or []}
        out = []
        for key, value in options.items():
            d = defs.get(key)
            if d is None:
                raise ValueError(f"/{name} has no option {key!r}")
            opt = {"name": key, "type": d["type"], "value": value}
            if key == focused:
                opt["focused"] = True
                out.append(opt)
                continue
            if d.get("choices") and value not in [c["value"] for c in d["choices"]]:
                raise ValueError(f"/{name} {key}: {value!r} is not one of the choices")
            if d["type"] in (4, 10):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or (
                        d["type"] == 4 and not isinstance(value, int)):
                    raise ValueError(f"/{name} {key}: {value!r} is not a number of type {d['type']}")
                if ("min_value" in d and value < d["min_value"]) or ("max_value" in d and value > d["max_value"]):
                    raise ValueError(f"/{name} {key}: {value!r} is out of range")
            if d["type"] == 3:
                if not isinstance(value, str):
                    raise ValueError(f"/{name} {key}: {value!r} is not a string")
                if len(value) < d.get("min_length", 0) or len(value) > d.get("max_length", 6000):
                    raise ValueError(f"/{name} {key}: {value!r} has the wrong length")
            if d["type"] == 5 and not isinstance(value, bool):
                raise ValueError(f"/{name} {key}: {value!r} is not a boolean")
            out.append(opt)
        if focused is None:
            given = set(options) | set(attachments)
            missing = [n for n, d in defs.items() if d.get("required") and n not in given]
            if missing:
                raise ValueError(f"/{name} needs {', '.join(missing)}")
        return out

    def slash(self, name: str, options: dict[str, Any] | None = None, *, user_id: int = 1001,
              user_name: str | None = None, roles: Sequence[str] = (), permissions: int = 0,
              attachments: dict[str, dict[str, Any]] | None = None, focused: str | None = None,
              guild_id: int | None = None, channel_id: int | None = None, dm: bool = False) -> FakeInteraction:
        """Send a slash command (or, with `focused`, an autocomplete request) to the bot.

        `attachments` maps an option name to a dict from `add_attachment`; `guild_id` sends it from
        another guild than the fake's own. `channel_id` picks the channel (or thread) it comes from;
        `dm` sends it from the user's DM with the bot. Options are checked against the synced
        definition, as a Discord client does (ValueError otherwise).
        """
        opts = self._typed_options(name, dict(options or {}), dm=dm, focused=focused,
                                   attachments=list(attachments or {}), guild_id=guild_id)
        if focused is not None:
            for o in opts:
                if o["name"] == focused:
                    o["focused"] = True
                    o["type"] = 3 if isinstance(o["value"], str) else o["type"]
        resolved: dict[str, Any] = {}
        for opt_name, att in (attachments or {}).items():
            opts.append({"name": opt_name, "type": 11, "value": att["id"]})
            resolved.setdefault("attachments", {})[att["id"]] = att
        data: dict[str, Any] = {"id": str(self.snowflake()), "name": name, "type": 1,
                                "guild_id": str(guild_id or self.guild_id), "options": opts}
        if resolved:
            data["resolved"] = resolved
        return self._new_interaction(4 if focused else 2, name, user_id, data, user_name=user_name, roles=roles,
                                     permissions=permissions, guild_id=guild_id, channel_id=channel_id, dm=dm)

    def click(self, message_id: int, custom_id: str, *, user_id: int = 1001, user_name: str | None = None,
              roles: Sequence[str] = (), permissions: int = 0) -> FakeInteraction:
        """Press a button on a message the bot sent (only someone who can see it can press it).
        `custom_id` may leave off a last `:<part>` when one button alone matches."""
        m = self.messages[message_id]
        if m.ephemeral and m.recipient_id is not None and m.recipient_id != user_id:
            raise PermissionError(f"user {user_id} cannot see the ephemeral message {message_id}")
        if m.channel_id in self.dm_channels.values() and self.dm_channels.get(user_id) != m.channel_id:
            raise PermissionError(f"user {user_id} cannot see a DM to someone else")
        ids = [c.get("custom_id") for row in m.components for c in row.get("components") or []]
        prefixed = [i for i in ids if i and i.startswith(custom_id + ":")]
        if custom_id not in ids and len(prefixed) == 1:  # "lorabot:confirm" for "lorabot:confirm:<job>"
            custom_id = prefixed[0]
        if custom_id not in ids:
            raise ValueError(f"message {message_id} has no component {custom_id!r} (it has {ids})")
        data = {"custom_id": custom_id, "component_type": 2}
        in_dm = m.channel_id in self.dm_channels.values()
        return self._new_interaction(3, custom_id, user_id, data, user_name=user_name, roles=roles,
                                     permissions=permissions, source=message_id,
                                     channel_id=None if in_dm else m.channel_id, dm=in_dm)

    # --- what tests look at -------------------------------------------------------------------
    def responses(self, ix: FakeInteraction) -> list[FakeMessage]:
        """The original response and the followups of an interaction, oldest first."""
        with self._lock:
            ids = ([ix.original_id] if ix.original_id else []) + [i for i in ix.followup_ids if i != ix.original_id]
            return [self.messages[i] for i in ids if i in self.messages]

    def answered(self, ix: FakeInteraction) -> bool:
        """True once the interaction has content (a message, a filled-in deferral, or an autocomplete)."""
        if any(cb["type"] in (4, 7, 8) for cb in ix.callbacks):
            return True
        return any(not m.deferred for m in self.responses(ix))

    def channel_messages(self, channel_id: int | None = None) -> list[FakeMessage]:
        """Messages posted with the bot token (not through an interaction), oldest first."""
        cid = channel_id or self.channel_id
        with self._lock:
            return [m for m in self.messages.values() if m.channel_id == cid and m.webhook_token is None]

    def all_messages(self) -> list[FakeMessage]:
        with self._lock:
            return list(self.messages.values())

    def received_text(self) -> str:
        """Every byte the bot sent us, decoded leniently: for 'never leaks' assertions."""
        with self._lock:
            bodies = [r["body"] for r in self.requests]
        return "\n".join(b.decode("utf-8", "replace") for b in bodies)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
        """Poll `predicate` from the test's event loop until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            await asyncio.sleep(interval)


def _required_permissions() -> int:
    from bot.permissions import REQUIRED_PERMISSIONS

    return REQUIRED_PERMISSIONS.value


def _embed_len(e: dict[str, Any]) -> int:
    total = len(e.get("title") or "") + len(e.get("description") or "")
    total += len((e.get("footer") or {}).get("text") or "") + len((e.get("author") or {}).get("name") or "")
    for f in e.get("fields") or []:
        total += len(f.get("name") or "") + len(f.get("value") or "")
    return total


@contextlib.asynccontextmanager
async def running_bot(fake: FakeDiscord, settings: Any, *, timeout: float = 15.0, **kwargs: Any) -> AsyncIterator[Any]:
    """Start the real LoraBot (real discord.py) against `fake` in the current event loop; close it on exit."""
    from bot.app import LoraBot

    undo = fake.patch_discord()
    kwargs.setdefault("guild_ready_timeout", 0.05)
    bot = LoraBot(settings, **kwargs)
    task = asyncio.create_task(bot.start(fake.token), name="lorabot-under-test")
    try:
        deadline = time.monotonic() + timeout
        while not bot.is_ready():
            if task.done():
                task.result()  # raises what stopped the bot
                raise RuntimeError("the bot stopped before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError("the bot did not become ready")
            await asyncio.sleep(0.02)
        yield bot
    finally:
        try:
            async with asyncio.timeout(30):  # a wedged client must fail the test, not hang the suite
                await bot.close()
        finally:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
            undo()


def main() -> None:
    """`python -m tests.sim.discord`: a fake Discord (and a Vast.ai emulator) for running the bot by hand."""
    from tests.sim.vast import VastEmulator

    with FakeDiscord() as fake, VastEmulator() as vast:
        env = dict(fake.env(), VASTAI_API_KEY=vast.api_key, VASTAI_API_URL=vast.url)
        print("# fake Discord and Vast.ai emulator are up; in another shell:")
        for key, value in env.items():
            print(f"export {key}={value}")
        print("python -m bot")
        print("# Ctrl-C here to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
