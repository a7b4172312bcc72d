"""A real OpenSSH sshd that plays the rented GPU box, on a free loopback port, as the current user.

Outside pytest (the Vast.ai emulator, `lorabot demo`):

    with run_sshd(tmpdir) as sshd:
        print(sshd.info.host, sshd.info.port, sshd.info.client_key_path)

The server reads only its own config (`-f`), runs in the foreground (`-D -e`) with generated host and
user keys under the temp dir, and offers the knobs a flaky rented box needs: `stop()` (port closed),
`deny_auth()`/`allow_auth()` (keys not installed yet), `restart(new_host_key=True)` (a re-imaged
box) and `cut_connections()` (the link drops; detached processes on the box live on).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


class SshdUnavailable(RuntimeError):
    """OpenSSH's sshd is not installed here (apt-get install openssh-server)."""


def find_sshd() -> str | None:
    for cand in (os.environ.get("LORABOT_SIM_SSHD", ""), *SSHD_CANDIDATES, shutil.which("sshd") or ""):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sshd_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _write_key(path: Path) -> str:
    """Generate an ed25519 key in OpenSSH format; return the public key line."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    pub = key.export_public_key().decode().strip()
    path.with_name(path.name + ".pub").write_text(pub + "\n")
    return pub


@dataclass
class SshdInfo:
    host: str
    port: int
    user: str
    client_key_path: Path
    host_key_pub: str  # OpenSSH public-key text of the current host key
    root_dir: Path  # a scratch folder the tests use as the box's filesystem root


class SshdServer:
    def __init__(self, base_dir: Path, *, user: str | None = None, port: int | None = None) -> None:
        binary = find_sshd()
        if binary is None:
            raise SshdUnavailable("OpenSSH sshd not found (install openssh-server; LORABOT_SIM_SSHD overrides)")
        self.binary = binary
        self.dir = Path(base_dir) / "sshd"
        self.dir.mkdir(parents=True, exist_ok=True)
        root_dir = Path(base_dir) / "box"
        root_dir.mkdir(parents=True, exist_ok=True)
        self.user = user or getpass.getuser()
        self._host_key = self.dir / "ssh_host_ed25519_key"
        host_pub = _write_key(self._host_key)
        client_key = self.dir / "client_ed25519"
        self._client_pub = _write_key(client_key)
        self._authorized = self.dir / "authorized_keys"
        self.allow_auth()
        self.info = SshdInfo(
            host="127.0.0.1",
            port=port or free_port(),
            user=self.user,
            client_key_path=client_key,
            host_key_pub=host_pub,
            root_dir=root_dir,
        )
        self._config = self.dir / "sshd_config"
        self._log = self.dir / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    # --- config -------------------------------------------------------------------------------
    def _write_config(self) -> None:
        lines = [
            f"Port {self.info.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self._host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self._authorized}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            "Subsystem sftp internal-sftp",
            "MaxStartups 200",
            "MaxSessions 100",
            "LogLevel ERROR",
            "PrintMotd no",
            "UseDNS no",
            # bash skips ~/.bashrc for sshd sessions when SHLVL is already set: a developer's heavy
            # rc file (pyenv init...) would otherwise add ~0.3 s to every remote command
            "SetEnv SHLVL=1",
        ]
        if _sshd_version(self.binary) >= (9, 8):
            # newer sshd penalises sources that fail auth; readiness retries would be locked out
            lines.append("PerSourcePenalties no")
        self._config.write_text("\n".join(lines) + "\n")

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if os.geteuid() == 0:
            # sshd running as root insists on its privilege-separation directory
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = self._log.open("ab")
        self._proc = subprocess.Popen(
            [self.binary, "-D", "-e", "-f", str(self._config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C in the terminal must not reach it before we stop it
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self._proc.returncode}: {self.log_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.info.port), 0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd did not listen on port {self.info.port}: {self.log_text()[-2000:]}")

    def stop(self) -> None:
        """Close the port: the listener and every live connection go away."""
        self.cut_connections()
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self, *, new_host_key: bool = False) -> None:
        self.stop()
        if new_host_key:
            self.info.host_key_pub = _write_key(self._host_key)
        self.start()

    # --- faults -------------------------------------------------------------------------------
    def deny_auth(self) -> None:
        """Key auth fails ("Permission denied"), as on a box whose keys are not installed yet."""
        self._authorized.write_text("")

    def allow_auth(self) -> None:
        self._authorized.write_text(self._client_pub + "\n")

    def cut_connections(self) -> int:
        """Kill the per-connection sshd processes: clients see the link drop. Returns how many."""
        if self._proc is None:
            return 0
        killed = 0
        for pid in _children(self._proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        return killed

    def log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parens: fields resume after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


@contextlib.contextmanager
def run_sshd(base_dir: Path | str, *, start: bool = True, user: str | None = None) -> Iterator[SshdServer]:
    """Start sshd in `base_dir`; stop it on exit. Raises SshdUnavailable when sshd is missing."""
    server = SshdServer(Path(base_dir), user=user)
    try:
        if start:
            server.start()
        yield server
    finally:
        server.stop()


# --- pytest fixtures (import them into a test module or conftest) ----------------------------------
try:
    import pytest
except ImportError:  # `lorabot demo` outside a dev install
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def skip_without_sshd() -> None:
        """Skip the calling test or fixture, with the reason, when sshd is not installed."""
        if find_sshd() is None:
            pytest.skip("OpenSSH sshd not installed (apt-get install openssh-server, as .ci/run does)")

    @pytest.fixture
    def sshd(tmp_path: Path) -> Iterator[SshdServer]:
        """A running sshd for this test; skipped with a clear reason when sshd is not installed."""
        skip_without_sshd()
        with run_sshd(tmp_path) as server:
            yield server

    @pytest.fixture
    def sshd_stopped(tmp_path: Path) -> Iterator[SshdServer]:
        """Configured but not started: the port is closed until the test calls start()."""
        skip_without_sshd()
        with run_sshd(tmp_path, start=False) as server:
            yield server
