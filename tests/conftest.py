"""Shared fixtures. Stand-ins for the outside world live in tests/sim/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# fixtures shared by every test: the S3 server (tests/sim/s3.py) and the whole simulator, `world`
# (tests/sim/world.py); s3 first, so that pytest rewrites its asserts before world imports it
pytest_plugins = ["tests.sim.s3", "tests.sim.world"]

# Never let a developer's real .env or environment leak into the tests.
for _var in list(os.environ):
    if _var.startswith(("VASTAI_", "DISCORD_", "R2_", "LORABOT_")) or _var == "HF_TOKEN":
        del os.environ[_var]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read ./.env: run each test in an empty folder so no stray file is picked up.
    monkeypatch.chdir(tmp_path)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Locally, tests that need OpenSSH's sshd skip with a reason; in CI a missing sshd must not
    # turn the end-to-end suite into a silent row of skips.
    if os.environ.get("CI"):
        from tests.sim.sshd import find_sshd

        if find_sshd() is None:
            pytest.exit("CI: OpenSSH sshd is not installed (apt-get install openssh-server)", returncode=3)


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    # A non-daemon thread left running (an aiosqlite connection nobody closed, say) would keep the
    # interpreter from exiting after the summary, and CI would wait out its whole timeout. Name it
    # loudly, then leave with pytest's own exit status instead of hanging.
    import sys
    import threading

    leaked = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    if leaked and _exit_status:
        sys.stderr.write("leaked non-daemon threads (a resource a test did not close): "
                         + ", ".join(t.name for t in leaked) + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(_exit_status[-1])
