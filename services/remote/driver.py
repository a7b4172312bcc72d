"""The bot's side of one training job on the box: install, launch, poll, read the log, stop, collect.

Everything goes through services.ssh.Box (argv lists, shlex-quoted); the supervisor script
(services/remote/supervisor.py) does the work on the box and survives SSH disconnects, so a
RemoteJob can be rebuilt at any time from (box, job_dir) and carry on.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.settings import Settings
from services.ssh import Box, SSHError

SUPERVISOR_SOURCE = Path(__file__).with_name("supervisor.py")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# ai-toolkit prints this banner after SIGINT and still exits 0 (reference §4)
STOPPED_BANNER = "Job stopped"


class RemoteJobError(SSHError):
    """The supervisor on the box misbehaved or answered something unreadable."""


@dataclass
class RemoteStatus:
    phase: str  # absent | starting | running | stopping | exited
    heartbeat: float | None = None
    trainer_pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    stop_requested: bool = False
    supervisor_alive: bool = False
    trainer_alive: bool = False
    log_size: int = 0
    error: str | None = None
    launched: bool | None = None  # only set by launch(): False when a trainer was already there
    box_time: float | None = None  # the box's clock when this was read (heartbeat ages use it)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.phase == "exited"

    @property
    def lost(self) -> bool:
        """Started, not finished, and nobody is watching it on the box any more."""
        return self.phase in ("starting", "running", "stopping") and not self.supervisor_alive

    def heartbeat_age(self) -> float | None:
        if self.heartbeat is None or self.box_time is None:
            return None
        return max(0.0, self.box_time - self.heartbeat)

    @classmethod
    def from_json(cls, text: str) -> RemoteStatus:
        try:
            raw = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise RemoteJobError(f"unreadable supervisor status: {text[:200]!r}") from exc
        return cls(
            phase=str(raw.get("phase", "absent")),
            heartbeat=raw.get("heartbeat"),
            trainer_pid=raw.get("trainer_pid"),
            exit_code=raw.get("exit_code"),
            signal=raw.get("signal"),
            started_at=raw.get("started_at"),
            finished_at=raw.get("finished_at"),
            stop_requested=bool(raw.get("stop_requested")),
            supervisor_alive=bool(raw.get("supervisor_alive")),
            trainer_alive=bool(raw.get("trainer_alive")),
            log_size=int(raw.get("log_size") or 0),
            error=raw.get("error"),
            launched=raw.get("launched"),
            box_time=raw.get("now"),
            raw=raw,
        )


@dataclass
class RemoteOutcome:
    """The minimal §4 rule; services.progress.classify_exit names the failure class from the log."""

    success: bool
    exit_code: int | None
    final_exists: bool
    stopped_banner: bool
    reason: str


class RemoteJob:
    def __init__(self, box: Box, job_dir: str, settings: Settings) -> None:
        if not posixpath.isabs(job_dir):
            raise ValueError("job_dir must be an absolute path on the box")
        self.box = box
        self.job_dir = posixpath.normpath(job_dir)
        self.settings = settings
        self.python = settings.remote_python

    # --- paths ------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return posixpath.join(self.job_dir, name)

    @property
    def supervisor_path(self) -> str:
        return self.path("supervisor.py")

    @property
    def log_path(self) -> str:
        return self.path("log.txt")

    @property
    def heartbeat_path(self) -> str:
        return self.path("bot_heartbeat")

    @property
    def config_path(self) -> str:
        return self.path(self._config_name)

    _config_name = "config.yaml"

    def _supervisor(self, *args: str) -> list[str]:
        return [self.python, self.supervisor_path, *args, "--job-dir", self.job_dir]

    # --- lifecycle --------------------------------------------------------------------------------
    async def install(self, config_text: str, env: dict[str, str], *, config_name: str = "config.yaml") -> None:
        """Ship the supervisor, the job config and the env file (mode 600; HF_TOKEN goes here only)."""
        if "/" in config_name or not config_name.endswith((".yaml", ".yml", ".json")):
            raise ValueError("config_name must be a plain .yaml/.yml/.json file name")
        lines = []
        for key, value in env.items():
            if not _ENV_KEY.match(key) or "\n" in value or "\0" in value:
                raise ValueError(f"invalid environment entry {key!r}")
            lines.append(f"{key}={value}\n")
        self._config_name = config_name
        source = await asyncio.to_thread(SUPERVISOR_SOURCE.read_bytes)
        # one round trip instead of three: the channels share the connection
        await asyncio.gather(
            self.box.put_bytes(source, self.supervisor_path, 0o755),
            self.box.put_bytes(config_text.encode(), self.config_path, 0o644),
            self.box.put_bytes("".join(lines).encode(), self.path("env"), 0o600),
        )

    async def launch(self, deadline_in: float = 0.0) -> RemoteStatus:
        """Start the trainer through the supervisor; a job already launched is left as it is.

        The supervisor's dead-man's switch ends the rental when the bot has not touched the heartbeat
        for LORABOT_DEADMAN_S, or `deadline_in` seconds from now (0: no deadline) have passed."""
        s = self.settings
        await self.touch()  # a re-attach after a long outage must not find the switch already tripped
        res = await self.box.run(
            self._supervisor(
                "launch",
                "--config", self.config_path,
                "--python", self.python,
                "--aitoolkit", s.aitoolkit_dir,
                "--grace-int", str(s.remote_stop_grace_s),
                "--grace-term", str(s.remote_kill_grace_s),
                "--heartbeat", str(s.remote_heartbeat_s),
                "--deadman", str(s.deadman_s),
                "--deadline-in", str(max(0.0, deadline_in)),
                "--vast-api-url", s.vastai_api_url,
                "--container-environ", s.box_container_environ,
                "--container-pid", str(s.box_container_pid),
            ),
            timeout=60,
        )
        return RemoteStatus.from_json(res.stdout)

    async def status(self) -> RemoteStatus:
        # a job folder without the supervisor was never installed: report "absent", not an error
        script = '[ -f "$1" ] || { echo \'{"phase": "absent"}\'; exit 0; }; shift; exec "$@"'

        async def op() -> RemoteStatus:
            res = await self.box.run(["sh", "-c", script, "status", self.supervisor_path,
                                      *self._supervisor("status")], timeout=min(30.0, self.box.command_timeout))
            return RemoteStatus.from_json(res.stdout)

        result: RemoteStatus = await self.box._retrying(op)
        return result

    async def read_log(self, offset: int, max_bytes: int = 256 * 1024) -> tuple[bytes, int]:
        """New log bytes from `offset` and the offset to read on from (persist it to resume later)."""
        return await self.box.tail(self.log_path, offset, max_bytes, touch=self.heartbeat_path)

    async def touch(self) -> None:
        """Tell the box's dead-man's switch the bot is still here."""
        await self.box.run(["sh", "-c", 'mkdir -p -- "$(dirname -- "$1")" && touch -- "$1"', "touch",
                            self.heartbeat_path])

    async def stop(self, grace_s: float | None = None) -> RemoteStatus:
        """Ask the supervisor to stop (SIGINT, SIGTERM, SIGKILL over its grace periods) and wait up to
        `grace_s` (default: both grace periods plus a margin) for the trainer to exit."""
        s = self.settings
        wait = grace_s if grace_s is not None else s.remote_stop_grace_s + s.remote_kill_grace_s + 5.0
        await self.box.run(self._supervisor("stop"), timeout=min(30.0, self.box.command_timeout))
        return await self.wait(wait)

    async def wait(self, timeout: float, poll_s: float = 0.2) -> RemoteStatus:  # noqa: ASYNC109
        """Poll until the trainer has exited (or the supervisor is gone) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        st = await self.status()
        while not st.done and not st.lost and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
            st = await self.status()
        return st

    # --- results ----------------------------------------------------------------------------------
    async def collect(self, final_path: str, local_dir: Path, *, extra: list[str] | None = None) -> list[Path]:
        """Download the final LoRA (and `extra` remote files), each verified by sha256."""
        local_dir = Path(local_dir)
        got = []
        for remote in [final_path, *(extra or [])]:
            local = local_dir / posixpath.basename(remote)
            got.append(await self.box.download(remote, local))
        return got

    async def outcome(self, final_path: str, status: RemoteStatus | None = None) -> RemoteOutcome:
        """Success = exit 0 AND the final LoRA exists AND no "Job stopped" banner in the log."""
        st = status or await self.status()
        final_exists = await self.box.exists(final_path)
        stopped = await self._log_has(STOPPED_BANNER)
        ok = st.done and st.exit_code == 0 and final_exists and not stopped
        if ok:
            reason = "finished; final LoRA present"
        elif not st.done:
            reason = f"trainer has not exited (phase {st.phase})"
        elif st.exit_code != 0:
            reason = f"trainer exited with {st.exit_code}" + (f" ({st.signal})" if st.signal else "")
        elif stopped:
            reason = "trainer was stopped (Job stopped banner)"
        else:
            reason = "trainer exited 0 but the final LoRA is missing"
        return RemoteOutcome(ok, st.exit_code, final_exists, stopped, reason)

    async def log_tail(self, max_bytes: int = 64 * 1024) -> str:
        """The last `max_bytes` of the log, for failure classification and reports."""
        res = await self.box.run(["tail", "-c", str(max_bytes), "--", self.log_path], check=False)
        return res.stdout

    async def _log_has(self, needle: str) -> bool:
        res = await self.box.run(["grep", "-q", "-F", "--", needle, self.log_path], check=False)
        return res.exit_status == 0
