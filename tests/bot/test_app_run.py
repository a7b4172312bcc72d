"""`python -m bot` / `lorabot run` as a real process against the fake Discord (test-only endpoint variables)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sim.discord import FakeDiscord
from tests.sim.vast import VastEmulator


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VASTAI_", "DISCORD_", "R2_", "LORABOT_")) and k != "HF_TOKEN"}
    env.update(extra)
    return env


MISSING = "error: DISCORD_TOKEN is not set (needed to connect to Discord); put it in the environment or ./.env"


def test_missing_token_is_one_clear_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bot"], capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [MISSING], r.stderr


def test_lorabot_run_without_token(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import app

    with pytest.raises(SystemExit) as exc:
        app(["run"], standalone_mode=False)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == MISSING


def test_the_bot_process_serves_slash_commands(tmp_path: Path) -> None:
    with FakeDiscord() as fake, VastEmulator() as vast:
        env = clean_env(**fake.env(), VASTAI_API_KEY=vast.api_key, VASTAI_API_URL=vast.url,
                        LORABOT_DB_PATH=str(tmp_path / "db.sqlite3"), LORABOT_WORK_DIR=str(tmp_path / "work"),
                        LORABOT_MAX_PRICE="2.0")
        proc = subprocess.Popen([sys.executable, "-m", "bot"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert fake.wait_identified(30), "the bot never identified on the gateway"
            assert fake.command_puts and fake.command_puts[0][0] == str(fake.guild_id)
            time.sleep(2.2)  # discord.py waits guild_ready_timeout (2 s) before it is ready
            ix = fake.slash("offers", {"limit": 2})
            deadline = time.monotonic() + 10
            while not fake.answered(ix) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fake.answered(ix)
            assert "would rent now" in fake.responses(ix)[0].embeds[0]["description"]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
