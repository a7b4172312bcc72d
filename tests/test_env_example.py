""".env.example names every setting exactly once, each under a one-line comment, and nothing else (issue 17):
the active lines are the operator's first run, the rest are commented-out defaults that change nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.settings import Settings, env_name, load_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / ".env.example"
SETTING = re.compile(r"^(# )?([A-Z][A-Z0-9_]*)=(.*)$")


def entries() -> list[tuple[int, bool, str, str]]:
    """(line index, active?, name, value) of each `NAME=` or `# NAME=` line."""
    out = []
    for i, line in enumerate(EXAMPLE.read_text().splitlines()):
        m = SETTING.match(line)
        if m:
            out.append((i, m.group(1) is None, m.group(2), m.group(3)))
    return out


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the test runner's environment leaks into Settings."""
    for key in list(os.environ):
        if key.startswith(("VASTAI_", "DISCORD_", "R2_", "LORABOT_", "HF_")):
            monkeypatch.delenv(key)


def test_every_setting_is_named_once_and_nothing_else() -> None:
    names = [name for _, _, name, _ in entries()]
    settings = {env_name(field) for field in Settings.model_fields}
    assert sorted(settings - set(names)) == [], "settings missing from .env.example"
    assert sorted(set(names) - settings) == [], ".env.example names variables that are not settings"
    assert sorted(n for n in set(names) if names.count(n) > 1) == [], "named twice"


def test_each_setting_has_a_one_line_comment_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, _, name, _ in entries():
        above = lines[i - 1]
        assert above.startswith("# ") and not SETTING.match(above) and len(above) > 4, name


def test_secrets_are_empty() -> None:
    secrets = {env_name(f) for f, info in Settings.model_fields.items() if SecretStr in _types(info.annotation)}
    assert {"DISCORD_TOKEN", "VASTAI_API_KEY", "R2_SECRET_ACCESS_KEY", "HF_TOKEN"} <= secrets
    assert [(name, value) for _, _, name, value in entries() if name in secrets and value] == []


def _types(annotation: object) -> set[object]:
    return {annotation, *getattr(annotation, "__args__", ())}


def test_commented_lines_are_the_defaults(clean_env: None, tmp_path: Path) -> None:
    """Uncommenting every optional line loads the very same settings as the file as shipped, which are the
    defaults apart from the few active lines with a value (the SSH key path the README's ssh-keygen makes)."""
    text = EXAMPLE.read_text()
    shipped = load_settings(_env_file=EXAMPLE)
    uncommented = tmp_path / ".env"
    uncommented.write_text("\n".join(line[2:] if SETTING.match(line) and line.startswith("# ") else line
                                     for line in text.splitlines()) + "\n")
    assert load_settings(_env_file=uncommented).model_dump() == shipped.model_dump()

    active = {name for _, is_active, name, value in entries() if is_active and value}
    assert active == {"VASTAI_SSH_KEY_PATH"}
    defaults = Settings(_env_file=None).model_dump()  # type: ignore[call-arg]
    differ = {env_name(f) for f, v in shipped.model_dump().items() if defaults[f] != v}
    assert differ == active


def test_the_active_lines_filled_in_still_load(clean_env: None, tmp_path: Path) -> None:
    """What an operator ends up with after `cp .env.example .env` and filling the empty required values."""
    values = {"DISCORD_TOKEN": "t" * 30, "DISCORD_GUILD_ID": "1, 2", "LORABOT_TRAIN_ROLES": "3",
              "LORABOT_ADMIN_ROLES": "4", "LORABOT_ADMIN_CHANNEL_ID": "5", "LORABOT_LINKS_BY_DM": "true",
              "VASTAI_API_KEY": "k" * 20, "R2_ACCOUNT_ID": "acct", "R2_ACCESS_KEY_ID": "id",
              "R2_SECRET_ACCESS_KEY": "secret", "R2_BUCKET": "loras", "HF_TOKEN": "hf_x",
              "LORABOT_MAX_PRICE": "0.8", "LORABOT_WARM_REUSE": "false"}
    filled = tmp_path / ".env"
    filled.write_text("\n".join(f"{m.group(2)}={values[m.group(2)]}"
                                if (m := SETTING.match(line)) and not m.group(1) and m.group(2) in values else line
                                for line in EXAMPLE.read_text().splitlines()) + "\n")
    s = load_settings(_env_file=filled)
    assert s.discord_guild_ids == [1, 2] and s.train_roles == [3] and s.admin_channel_id == 5 and s.links_by_dm
    assert s.max_price == 0.8 and s.warm_reuse is False and s.r2_bucket == "loras"
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_x"
