"""The synced slash-command payload passes Discord's validation rules (no network needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bot.app import EXTENSIONS, LoraBot
from services.settings import load_settings

NAME = re.compile(r"^[-_'\w]{1,32}$")


def _check_options(options: list[dict[str, Any]], where: str) -> None:
    assert len(options) <= 25, where
    names = [o["name"] for o in options]
    assert len(names) == len(set(names)), f"duplicate option names in {where}"
    seen_optional = False
    for o in options:
        here = f"{where}.{o['name']}"
        assert NAME.match(o["name"]) and o["name"] == o["name"].lower(), here
        assert 1 <= len(o["description"]) <= 100, here
        if o["type"] in (1, 2):  # subcommand / group
            _check_options(o.get("options", []), here)
            continue
        required = o.get("required", False)
        assert not (required and seen_optional), f"required option after an optional one: {here}"
        seen_optional = seen_optional or not required
        choices = o.get("choices") or []
        assert len(choices) <= 25, here
        assert not (choices and o.get("autocomplete")), f"choices and autocomplete together: {here}"
        for c in choices:
            assert 1 <= len(c["name"]) <= 100, here
            if isinstance(c["value"], str):
                assert len(c["value"]) <= 100, here
        for key in ("min_length", "max_length"):
            if key in o:
                assert 0 <= o[key] <= 6000, here
        for key in ("min_value", "max_value"):
            if key in o:
                assert abs(o[key]) <= 2**53, here


def _chars(node: Any) -> int:
    """name + description + values, as Discord counts them per command."""
    if isinstance(node, dict):
        return sum(len(str(v)) if k in ("name", "description", "value") else _chars(v) for k, v in node.items())
    if isinstance(node, list):
        return sum(_chars(v) for v in node)
    return 0


@pytest.fixture
async def payload(tmp_path: Path) -> list[dict[str, Any]]:
    bot = LoraBot(load_settings(db_path=str(tmp_path / "db.sqlite3")), start_worker=False, sync_commands=False)
    for ext in EXTENSIONS:
        await bot.load_extension(ext)
    return bot.command_payload()


async def test_payload_passes_discords_rules(payload: list[dict[str, Any]]) -> None:
    assert 1 <= len(payload) <= 100
    names = [c["name"] for c in payload]
    assert len(names) == len(set(names))
    for cmd in payload:
        assert NAME.match(cmd["name"]) and cmd["name"] == cmd["name"].lower(), cmd["name"]
        assert 1 <= len(cmd["description"]) <= 100, cmd["name"]
        _check_options(cmd.get("options", []), cmd["name"])
        assert _chars(cmd) <= 8000, cmd["name"]
    assert len(json.dumps(payload)) < 20_000


async def test_the_commands_people_need_are_there(payload: list[dict[str, Any]]) -> None:
    by = {c["name"]: c for c in payload}
    assert {"offers", "train", "status", "cancel", "reconcile", "balance"} <= set(by)
    train = {o["name"]: o for o in by["train"]["options"]}
    assert train["dataset"]["type"] == 11  # an attachment
    assert train["name"]["required"] and train["trigger_word"]["required"]
    assert {c["value"] for c in train["preset"]["choices"]} == {"character", "style", "fast"}
    assert by["cancel"]["options"][0]["autocomplete"] is True
    assert by["status"]["options"][0]["autocomplete"] is True
    # admin commands are hidden from non-admins in the UI (and checked server-side by the bot)
    assert int(by["reconcile"]["default_member_permissions"]) == 1 << 5


async def test_payload_hash_is_stable(tmp_path: Path) -> None:
    hashes = []
    for _ in range(2):
        bot = LoraBot(load_settings(db_path=str(tmp_path / "db.sqlite3")), start_worker=False, sync_commands=False)
        for ext in EXTENSIONS:
            await bot.load_extension(ext)
        hashes.append(bot._payload_hash())
    assert hashes[0] == hashes[1]
