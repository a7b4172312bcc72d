"""`lorabot doctor`, `lorabot invite` and `lorabot run`'s preflight as an operator runs them, and the README's
own "First run" commands from a fresh copy, against the stand-ins."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bot.cli.setup import application_id
from bot.permissions import REQUIRED_PERMISSIONS
from tests.services.test_doctor import APP_ID, TOKEN, Stands, make_key, s3, stands  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VASTAI_", "DISCORD_", "R2_", "LORABOT_", "HF_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def lorabot(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "lorabot"), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


# --- invite ----------------------------------------------------------------------------------------
def test_invite_url_carries_the_preflight_permissions(tmp_path: Path) -> None:
    r = lorabot("invite", env=clean_env(DISCORD_TOKEN=TOKEN), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "discord.com", "/oauth2/authorize")
    q = parse_qs(parts.query)
    assert q["client_id"] == [str(APP_ID)]
    assert q["scope"] == ["bot applications.commands"]
    assert int(q["permissions"][0]) == REQUIRED_PERMISSIONS.value
    # the integer is exactly the listed permissions: attach files and make threads are in, admin is not
    assert REQUIRED_PERMISSIONS.attach_files and REQUIRED_PERMISSIONS.create_public_threads
    assert not int(q["permissions"][0]) & (1 << 3)


def test_application_id_from_real_shaped_tokens() -> None:
    assert application_id(TOKEN) == APP_ID
    assert application_id("Bot " + TOKEN) == APP_ID
    with pytest.raises(ValueError, match="does not look like a bot token"):
        application_id("fake-discord-token")


@pytest.mark.parametrize(("env", "message"), [
    ({}, "error: DISCORD_TOKEN is not set"),
    ({"DISCORD_TOKEN": "not-a-token"}, "error: DISCORD_TOKEN does not look like a bot token"),
    ({"DISCORD_TOKEN": TOKEN, "LORABOT_MAX_PRICE": "cheap"}, "error: invalid setting LORABOT_MAX_PRICE"),
])
def test_invite_bad_input_is_one_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    r = lorabot("invite", env=clean_env(**env), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message) and "Traceback" not in r.stderr, r.stderr


# --- doctor ----------------------------------------------------------------------------------------
def test_doctor_json_and_a_failing_line_with_its_fix(stands: Stands, tmp_path: Path) -> None:  # noqa: F811
    env = clean_env(**stands.env())
    r = lorabot("doctor", "--json", env=env, cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] is True, [c for c in doc["checks"] if not c["ok"]]
    assert all(set(c) >= {"name", "ok", "detail", "fix"} for c in doc["checks"])
    assert stands.discord.token not in r.stdout + r.stderr and stands.vast.api_key not in r.stdout

    stands.hub.accepted.clear()
    stands.vast.credit = 0.0
    r = lorabot("doctor", env=env, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    credit = next(line for line in lines if "vast.credit" in line)
    assert credit.startswith("✗") and "→ add credit at https://cloud.vast.ai/billing/" in credit
    model = next(line for line in lines if "hf.model" in line)
    assert model.startswith("✗") and "accept the licence" in model
    assert next(line for line in lines if line.startswith("✓ vast.key"))
    assert "not ready" in r.stdout and "2 failed" in r.stdout


def test_doctor_bad_settings_is_one_line(tmp_path: Path) -> None:
    r = lorabot("doctor", env=clean_env(LORABOT_MAX_PRICE="cheap"), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[0].startswith("✗ settings.load: invalid setting LORABOT_MAX_PRICE")
    r = lorabot("doctor", "--json", env=clean_env(LORABOT_MAX_PRICE="cheap"), cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["checks"][0]["name"] == "settings.load" and doc["checks"][0]["fix"]


# --- lorabot run's preflight -----------------------------------------------------------------------
def test_run_refuses_to_start_on_a_critical_local_failure(tmp_path: Path) -> None:
    env = clean_env(DISCORD_TOKEN=TOKEN, LORABOT_DB_PATH=str(tmp_path / "db.sqlite3"),
                    LORABOT_WORK_DIR=str(tmp_path / "work"))
    r = lorabot("run", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DISCORD_GUILD_ID" in errors[0], r.stderr

    key = tmp_path / "key"
    key.write_text("not a key")
    key.chmod(0o600)
    r = lorabot("run", env={**env, "DISCORD_GUILD_ID": "1", "VASTAI_SSH_KEY_PATH": str(key)}, cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ssh.key:") and "ssh-keygen" in errors[0], r.stderr


# --- the README's "First run", from a fresh copy ------------------------------------------------------
def first_run_commands() -> list[str]:
    """The shell commands of README's "First run" section (indented code lines), in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## First run", 1)[1].split("\n## ", 1)[0]
    return [line[4:] for line in section.splitlines() if re.match(r"    (lorabot|cp|ssh-keygen|mkdir|docker) ", line)]


def fill(env_file: Path, values: dict[str, str]) -> None:
    """What the operator does in an editor: put each value after its `NAME=` (adding the few knobs that
    point at the stand-ins' speed, which .env.example lists only as commented-out defaults)."""
    out, done = [], set()
    for line in env_file.read_text().splitlines():
        name = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and name in values:
            line = f"{name}={values[name]}"
            done.add(name)
        out.append(line)
    out += [f"{k}={v}" for k, v in values.items() if k not in done]
    env_file.write_text("\n".join(out) + "\n")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_readme_first_run_leads_to_a_green_doctor(stands: Stands, tmp_path: Path) -> None:  # noqa: F811
    commands = first_run_commands()
    assert commands[:3] == ["lorabot invite", "mkdir -p -m 700 ~/.ssh",
                            "ssh-keygen -t ed25519 -N '' -f ~/.ssh/lorabot"]
    assert ["cp .env.example .env", "lorabot doctor", "lorabot run"] == commands[3:6]
    assert "docker compose run --rm lorabot lorabot doctor" in commands

    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("README.md", ".env.example", "compose.yaml", "Dockerfile"):
        shutil.copy(ROOT / name, clone / name)
    home = tmp_path / "home"
    home.mkdir()
    # only the test-only endpoints come from the environment; everything else is in .env
    env = clean_env(HOME=str(home), HF_ENDPOINT=stands.hub.url, LORABOT_DISCORD_API_BASE=stands.discord.api_base)

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=clone, timeout=120)

    values = {k: v for k, v in stands.env().items() if k not in ("VASTAI_SSH_KEY_PATH", "LORABOT_DB_PATH",
                                                                  "LORABOT_WORK_DIR", "HF_ENDPOINT",
                                                                  "LORABOT_DISCORD_API_BASE")}
    values.update({"LORABOT_VASTAI_BACKOFF_S": "0.01", "LORABOT_VASTAI_MIN_INTERVAL_S": "0"})
    for command in commands[1:5]:  # mkdir, ssh-keygen, cp, then (after filling .env) doctor
        if command == "lorabot doctor":
            fill(clone / ".env", values)
        r = sh(command)
        assert r.returncode == 0, (command, r.stdout, r.stderr)
    assert (home / ".ssh" / "lorabot").is_file() and (home / ".ssh" / "lorabot.pub").is_file()
    assert "✗" not in r.stdout and "ready:" in r.stdout and "not ready" not in r.stdout, r.stdout
    assert f"{home}/.ssh/lorabot" in r.stdout  # the key from .env.example's VASTAI_SSH_KEY_PATH
    assert (clone / "data" / "lorabot.sqlite3").is_file()  # the store's default path, in the clone
    r = sh(commands[0])  # lorabot invite, now that the token is in .env
    assert r.returncode == 0 and f"client_id={APP_ID}" in r.stdout
