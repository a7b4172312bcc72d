"""Shared fixtures. Stand-ins for the outside world live in tests/sim/."""

from __future__ import annotations

import os

import pytest

# Never let a developer's real .env or environment leak into the tests.
for _var in list(os.environ):
    if _var.startswith(("VASTAI_", "DISCORD_", "R2_", "LORABOT_")) or _var == "HF_TOKEN":
        del os.environ[_var]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read ./.env: run each test in an empty folder so no stray file is picked up.
    monkeypatch.chdir(tmp_path)
