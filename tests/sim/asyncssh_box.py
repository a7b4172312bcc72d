"""The rented box without OpenSSH's sshd: an asyncssh server in this process, for `lorabot demo` on a machine
(a laptop, the Docker image) where sshd is not installed. The tests keep using the real sshd (tests/sim/sshd.py).

It serves what lorabot asks of a box: key authentication against one client key, `exec` of a command by
the user's shell in their home (as sshd does: `$SHELL -c COMMAND`, a clean environment), stdin streamed
to it and stdout/stderr streamed back as bytes, the exit status, and SFTP. Commands run as the current
user; processes a command detaches (the supervisor) outlive the connection, as with sshd.

Same surface as `SshdServer`: `info`, `start()`, `stop()`, `restart(new_host_key=...)`, `deny_auth()`,
`allow_auth()`, `cut_connections()`, `running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh

from tests.sim.sshd import SshdInfo, _write_key, free_port

CHUNK = 256 * 1024


class _Server(asyncssh.SSHServer):
    def __init__(self, box: AsyncsshBox) -> None:
        self.box = box
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.box._conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.box._conns.discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == self.box.info.user and self.box._authorized and key.public_data == self.box._client_key


class AsyncsshBox:
    def __init__(self, base_dir: Path, *, user: str | None = None, port: int | None = None) -> None:
        self.dir = Path(base_dir) / "sshd"
        self.dir.mkdir(parents=True, exist_ok=True)
        root_dir = Path(base_dir) / "box"
        root_dir.mkdir(parents=True, exist_ok=True)
        self._host_key = self.dir / "ssh_host_ed25519_key"
        host_pub = _write_key(self._host_key)
        client_key = self.dir / "client_ed25519"
        _write_key(client_key)
        self._client_key = asyncssh.read_public_key(str(client_key) + ".pub").public_data
        self._authorized = True
        self.info = SshdInfo(host="127.0.0.1", port=port or free_port(), user=user or getpass.getuser(),
                             client_key_path=client_key, host_key_pub=host_pub, root_dir=root_dir)
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self._server: asyncssh.SSHAcceptor | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asyncssh-box", daemon=True)
        self._thread.start()

    # --- running commands as sshd does ----------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        home = str(Path.home())
        return {"HOME": home, "USER": self.info.user, "LOGNAME": self.info.user, "SHELL": self._shell(),
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8", "SHLVL": "1"}

    @staticmethod
    def _shell() -> str:
        try:
            shell = pwd.getpwuid(os.getuid()).pw_shell
        except KeyError:
            shell = ""
        return shell if shell and os.access(shell, os.X_OK) else "/bin/sh"

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.command is None:
            process.stderr.write(b"the simulated box has no interactive shell; pass a command\n")
            process.exit(1)
            return
        proc = await asyncio.create_subprocess_exec(
            self._shell(), "-c", process.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=Path.home(), env=self._environment())
        assert proc.stdin and proc.stdout and proc.stderr

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                while chunk := await process.stdin.read(CHUNK):
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            except (asyncssh.Error, OSError, BrokenPipeError, ConnectionError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.close()

        async def pump(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
            while chunk := await src.read(CHUNK):
                try:
                    dst.write(chunk)
                    await dst.drain()
                except (asyncssh.Error, OSError):  # the client went away: as sshd closing the pipes (SIGPIPE)
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
                    return

        feeder = asyncio.ensure_future(feed())
        try:
            await asyncio.gather(pump(proc.stdout, process.stdout), pump(proc.stderr, process.stderr))
            rc = await proc.wait()
        except asyncio.CancelledError:  # the connection went away: end the command, not what it detached
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            raise
        finally:
            feeder.cancel()
        with contextlib.suppress(asyncssh.Error, OSError):
            process.exit(rc if rc >= 0 else 128 - rc)

    # --- lifecycle ------------------------------------------------------------------------------------
    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            return

        async def listen() -> asyncssh.SSHAcceptor:
            return await asyncssh.create_server(
                lambda: _Server(self), "127.0.0.1", self.info.port, server_host_keys=[str(self._host_key)],
                process_factory=self._handle, encoding=None, sftp_factory=True, allow_scp=False,
                keepalive_interval=15)

        self._server = self._call(listen())  # type: ignore[assignment]

    def stop(self) -> None:
        self.cut_connections()
        server, self._server = self._server, None
        if server is not None:
            async def close() -> None:  # on the box's loop: asyncio's Server is not thread-safe (closed
                server.close()          # from here, it raced the aborted connections' detach and raised)
                await server.wait_closed()

            self._call(close())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def restart(self, *, new_host_key: bool = False) -> None:
        self.stop()
        if new_host_key:
            self.info.host_key_pub = _write_key(self._host_key)
        self.start()

    def deny_auth(self) -> None:
        self._authorized = False

    def allow_auth(self) -> None:
        self._authorized = True

    def cut_connections(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            self._loop.call_soon_threadsafe(conn.abort)
        return len(conns)

    @property
    def running(self) -> bool:
        return self._server is not None


@contextlib.contextmanager
def run_asyncssh_box(base_dir: Path | str, *, user: str | None = None) -> Iterator[AsyncsshBox]:
    box = AsyncsshBox(Path(base_dir), user=user)
    try:
        box.start()
        yield box
    finally:
        box.close()
