"""Setting up: `lorabot doctor` (is every service configured right?) and `lorabot invite` (the install URL).

The checks live in services/doctor; this module renders them, one line each, and gives them the one
thing they need from discord.py: the permissions of bot/permissions.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import sys
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlencode

import typer

from bot.cli.common import EXIT_NOT_READY, EXIT_OK, EXIT_USAGE, console, fail, print_json
from services.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from services.doctor import CheckResult
    from services.settings import Settings

AUTHORIZE_URL = "https://discord.com/oauth2/authorize"
SCOPES = "bot applications.commands"
MARK = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]", "skip": "[dim]–[/]"}


def required_permissions() -> dict[str, int]:
    """Permission name -> bit, from the one list the /train preflight uses too."""
    import discord

    from bot.permissions import REQUIRED_PERMISSIONS

    return {name: getattr(discord.Permissions, name).flag for name, on in REQUIRED_PERMISSIONS if on}


def application_id(token: str) -> int:
    """The application (bot user) id: a bot token's first segment is the base64 of that id."""
    head = token.strip().removeprefix("Bot ").split(".")[0]
    try:
        raw = base64.b64decode(head.replace("-", "+").replace("_", "/") + "=" * (-len(head) % 4), validate=True)
        text = raw.decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.isdigit():
        raise ValueError("DISCORD_TOKEN does not look like a bot token (its first part is the base64 of the "
                         "application id); copy it again from the Developer Portal > your application > Bot")
    return int(text)


def invite_url(app_id: int, permissions: int) -> str:
    query = urlencode({"client_id": app_id, "scope": SCOPES, "permissions": permissions}).replace("+", "%20")
    return f"{AUTHORIZE_URL}?{query}"


def _line(r: CheckResult) -> str:
    from rich.markup import escape

    kind = "skip" if r.skipped else "fail" if not r.ok else "warn" if r.warn else "ok"
    text = f"{MARK[kind]} [bold]{escape(r.name)}[/]: {escape(r.detail)}"
    if r.fix and kind != "ok":
        text += f" [dim]→[/] {escape(r.fix)}"
    return text


def _one_line(r: CheckResult) -> str:
    return f"{r.name}: {r.detail}" + (f" → {r.fix}" if r.fix else "")


async def _checks(s: Settings, *, local_only: bool, show: bool) -> list[CheckResult]:
    from services.doctor import Doctor, run_checks

    doc = Doctor(s, required_permissions=required_permissions())
    on_result = (lambda r: console.print(_line(r), highlight=False, soft_wrap=True)) if show else None
    return await run_checks(doc, local_only=local_only, on_result=on_result)


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """Check every configured service with the real credentials (spends nothing): one line per check.

    Settings, store and disk; Vast.ai key, credit, SSH key, offers now; R2 bucket, round trip, links,
    token scope; Hugging Face token and base model licence; Discord token, Public Bot, guilds, commands.
    Exit codes: 0 all pass (warnings allowed); 1 a check failed.
    """
    from services.doctor import CheckResult

    try:
        s = load_settings()
    except SettingsError as exc:
        results = [CheckResult(False, str(exc), "correct it in .env (see .env.example)", name="settings.load")]
    else:
        try:
            results = asyncio.run(_checks(s, local_only=False, show=not as_json))
        except KeyboardInterrupt:
            fail("interrupted; nothing was changed", 130)
    ok = all(r.ok for r in results)
    if as_json:
        print_json({"ok": ok, "checks": [r.doc() for r in results]})
    else:
        if results and results[0].name == "settings.load":
            console.print(_line(results[0]), highlight=False, soft_wrap=True)
        failed = sum(not r.ok and not r.skipped for r in results)
        skipped = sum(r.skipped for r in results)
        warns = sum(r.ok and r.warn for r in results)
        summary = (f"{len(results) - failed - skipped} passed ({warns} with a warning), {failed} failed"
                   + (f", {skipped} not checked" if skipped else ""))
        console.print(f"\n[{'green' if ok else 'red'}]{'ready' if ok else 'not ready'}[/]: {summary}",
                      highlight=False)
    raise typer.Exit(EXIT_OK if ok else EXIT_NOT_READY)


def preflight(s: Settings) -> None:
    """`lorabot run`'s start: the fast local checks; a critical failure refuses to start, one line each.

    The SSH key only refuses the start when VASTAI_SSH_KEY_PATH was set (the default path may simply
    not be used yet); without it the bot still serves /offers and /status, and says why /train fails."""
    from services.doctor.core import critical_names

    critical = critical_names()
    if "vastai_ssh_key_path" not in s.model_fields_set:
        critical.discard("ssh.key")
    results = asyncio.run(_checks(s, local_only=True, show=False))
    fatal = [r for r in results if not r.ok and r.name in critical]
    for r in results:
        if r not in fatal and (not r.ok or r.warn):
            sys.stderr.write(f"warning: {_one_line(r)}\n")
    for r in fatal:
        sys.stderr.write(f"error: {_one_line(r)}\n")
    if fatal:
        raise SystemExit(EXIT_USAGE)


def invite() -> None:
    """Print the bot's OAuth2 install URL: scopes `bot applications.commands` and exactly the permissions it needs.

    The application id is read from DISCORD_TOKEN. Open the URL as an admin of the server.
    """
    from bot.permissions import REQUIRED_PERMISSIONS

    try:
        s = load_settings()
    except SettingsError as exc:
        fail(str(exc))
    if s.discord_token is None or not s.discord_token.get_secret_value().strip():
        fail("DISCORD_TOKEN is not set (the application id is read from it); put it in the environment or ./.env")
    try:
        app_id = application_id(s.discord_token.get_secret_value())
    except ValueError as exc:
        fail(str(exc))
    sys.stdout.write(invite_url(app_id, REQUIRED_PERMISSIONS.value) + "\n")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
    app.command("invite")(invite)
