"""Checks of Discord over its REST API (httpx; services never import discord.py): the token, the Public
Bot flag, membership and permissions in every DISCORD_GUILD_ID guild, the slash commands there."""

from __future__ import annotations

from typing import Any

import httpx

from services.doctor.core import CheckResult, Doctor, check, failed, passed, warned
from services.doctor.local import guild_ids

API = "https://discord.com/api/v10"
API_BASE_ENV = "LORABOT_DISCORD_API_BASE"  # test-only, as in bot/app.py
PORTAL = "https://discord.com/developers/applications"
ADMINISTRATOR = 1 << 3
INVITE_FIX = "run `lorabot invite` and open the URL as a server admin (or give the bot's role these permissions)"


class DiscordAnswer(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


async def _get(doc: Doctor, path: str) -> Any:
    if "discord_http" not in doc.facts:
        base = (doc.env.get(API_BASE_ENV) or API).rstrip("/")
        token = doc.secret(doc.settings.discord_token)
        doc.facts["discord_http"] = await doc.stack.enter_async_context(httpx.AsyncClient(
            base_url=base, timeout=20,
            headers={"Authorization": f"Bot {token}", "User-Agent": "DiscordBot (lorabot doctor, 1)"}))
    http: httpx.AsyncClient = doc.facts["discord_http"]
    r = await http.get(path)
    if r.status_code != 200:
        raise DiscordAnswer(r.status_code)
    return r.json()


@check("discord.token")
async def token(doc: Doctor) -> CheckResult:
    if doc.settings.discord_token is None:
        return CheckResult(False, "not checked: DISCORD_TOKEN is not set", "fix `settings.discord` first",
                           skipped=True)
    try:
        me = await _get(doc, "/users/@me")
    except DiscordAnswer as exc:
        if exc.status == 401:
            return failed("Discord refused DISCORD_TOKEN (401)",
                          f"{PORTAL} > your application > Bot > Reset Token; put the new token in DISCORD_TOKEN")
        return failed(f"Discord answered {exc}", "try again later; check this machine's network")
    if not me.get("bot"):
        return failed("DISCORD_TOKEN is not a bot token", f"copy the token from {PORTAL} > your application > Bot")
    doc.facts["bot_user_id"] = int(me["id"])
    return passed(f"bot {me.get('username', '?')} ({me['id']})")


@check("discord.public_bot", needs=("discord.token",))
async def public_bot(doc: Doctor) -> CheckResult:
    app = await _get(doc, "/applications/@me")
    doc.facts["application_id"] = int(app["id"])
    if app.get("bot_public"):
        return warned("Public Bot is on: anybody can add this bot to their server",
                      f"{PORTAL} > your application > Bot > turn Public Bot off")
    return passed("Public Bot is off: only you can invite it")


def _missing_permissions(have: int, need: dict[str, int]) -> list[str]:
    if have & ADMINISTRATOR:
        return []
    return [name for name, bit in need.items() if not have & bit]


@check("discord.guilds", needs=("discord.token",))
async def guilds(doc: Doctor) -> list[CheckResult]:
    joined = {int(g["id"]): g for g in await _get(doc, "/users/@me/guilds")}
    out = []
    for gid in guild_ids(doc.settings):
        name = f"discord.guild {gid}"
        g = joined.get(gid)
        if g is None:
            out.append(CheckResult(False, f"the bot is not a member of guild {gid}",
                                   f"{INVITE_FIX}; check DISCORD_GUILD_ID (right-click the server > Copy Server ID)",
                                   name=name))
            continue
        missing = _missing_permissions(int(g.get("permissions") or 0), dict(doc.required_permissions))
        if missing:
            out.append(CheckResult(False, f"in {g.get('name', gid)!r} the bot lacks: {', '.join(missing)}",
                                   INVITE_FIX, name=name))
        else:
            out.append(CheckResult(True, f"member of {g.get('name', gid)!r} with the permissions it needs", name=name))
    return out


@check("discord.commands", needs=("discord.public_bot",))
async def commands(doc: Doctor) -> list[CheckResult]:
    app_id = doc.facts["application_id"]
    global_names = {c["name"] for c in await _get(doc, f"/applications/{app_id}/commands")}
    out = []
    for gid in guild_ids(doc.settings):
        name = f"discord.commands {gid}"
        try:
            names = {c["name"] for c in await _get(doc, f"/applications/{app_id}/guilds/{gid}/commands")}
        except DiscordAnswer as exc:  # 403 when the bot is not in the guild (reported above)
            out.append(CheckResult(False, f"cannot read the commands of guild {gid} ({exc})", INVITE_FIX, name=name))
            continue
        names |= global_names
        if "train" in names:
            out.append(CheckResult(True, f"registered: /{', /'.join(sorted(names))}", name=name))
        else:
            out.append(CheckResult(True, "slash commands not registered yet", "`lorabot run` registers them at start",
                                   warn=True, name=name))
    return out
