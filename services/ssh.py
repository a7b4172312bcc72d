"""SSH transport to the rented box, on asyncssh.

- `wait_ready`: staged readiness (tcp -> auth -> probe), each stage with its own deadline and an error
  naming the stage; direct endpoints before proxy ones. The host key seen on first contact is returned
  so the caller can pin it for the rest of the job.
- `Box`: one pinned connection with keepalives and `reconnect()`. Every remote command is an argv list
  joined with `shlex.join`; callers never hand us a shell string.
- `Box.upload_dataset`: a tar stream built on the fly from (folder, manifest) into `tar -x` on the box,
  with the box hashing each file as soon as tar has finished it; every manifest file's sha256 must
  match or the upload fails naming the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shlex
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import asyncssh

from services import openssh
from services.dataset.manifest import Manifest, ManifestFile

log = logging.getLogger(__name__)
# asyncssh logs every command line at INFO, presigned URLs included (review M5): warnings only
logging.getLogger("asyncssh").setLevel(logging.WARNING)

StageCallback = Callable[[str, str], Awaitable[None]]
ProgressCallback = Callable[[int, int], None]

# Throughput knobs (see benchmarks/ship.py): AES-GCM is hardware-accelerated in `cryptography`, and
# big reads keep the per-chunk overhead of the event loop and thread hops small.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes128-ctr", "aes256-ctr")
CIPHERS = _CIPHERS  # also what `lorabot ssh` offers
_WINDOW = 8 * 1024 * 1024
_MAX_PKTSIZE = 256 * 1024
_CHUNK = 1024 * 1024
_SENDFILE_CHUNK = 8 * 1024 * 1024  # per call: bounds how late a stop request is seen
_PREFETCH = 8  # chunks read ahead by the packing thread: bounds memory at ~8 MiB
_TAR_BLOCK = 512
# Below this a dataset goes over the open asyncssh connection: a second handshake for the OpenSSH
# client costs more than it saves (benchmarks/pipeline.py), above it ssh's C crypto wins (ship.py).
OPENSSH_FROM = 32 * 1024 * 1024

# Hashing on the box runs in its Python (always there: ai-toolkit needs it) because hashlib uses
# OpenSSL's SHA-NI code, ~8x faster than coreutils' sha256sum. Names arrive one per line on stdin;
# output is sha256sum's format. The lagged variant reads `tar -v` output: tar names a member before
# extracting it, so a name is only hashed once the next one (or EOF) shows the file is complete.
_HASHER = """
import hashlib, sys
def h(n):
    d = hashlib.sha256()
    try:
        with open(n, 'rb') as f:
            for b in iter(lambda: f.read(1 << 20), b''):
                d.update(b)
    except OSError as e:
        sys.stderr.write('%s: %s\\n' % (n, e.strerror))
        return
    sys.stdout.write(d.hexdigest() + '  ' + n + '\\n')
    sys.stdout.flush()
"""
# The upload's remote command starts in the box's Python only to widen the pipe from sshd into tar
# from 64 KiB to 1 MiB (fewer hand-offs between them; benchmarks/ship.py 1.05 -> 0.88x OpenSSH's
# tar|ssh), then execs the shell script; where the pipe cannot be widened it just execs.
_WIDE_STDIN = """
import fcntl, os, sys
try:
    fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, 1 << 20)
except (OSError, AttributeError):
    pass
os.execvp(sys.argv[1], sys.argv[1:])
"""
_HASHER_ALL = _HASHER + """
for line in sys.stdin:
    h(line.rstrip('\\n'))
"""
_HASHER_LAGGED = _HASHER + """
prev = None
for line in sys.stdin:
    if prev is not None:
        h(prev)
    prev = line.rstrip('\\n')
if prev is not None:
    h(prev)
"""


# --------------------------------------------------------------------------------------------------
# errors and small types


class SSHError(Exception):
    """Anything that went wrong talking to the box."""


class ReadinessError(SSHError):
    """The box did not become usable; `stage` is one of "api", "tcp", "auth", "probe"."""

    def __init__(self, stage: str, message: str, endpoint: Endpoint | None = None) -> None:
        self.stage = stage
        self.endpoint = endpoint
        super().__init__(f"{stage} stage failed: {message}")


class HostKeyMismatch(SSHError):
    """The box presented a host key other than the one pinned for this job."""


class ConnectionLostError(SSHError):
    """The link dropped while a command was running."""


class RemoteCommandError(SSHError):
    def __init__(self, argv: Sequence[str], exit_status: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.exit_status = exit_status
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:]
        super().__init__(f"{argv[0] if argv else '?'} exited with {exit_status}: {' | '.join(tail)}")


class VerificationError(SSHError):
    """A transferred file's sha256 did not match; `files` names them."""

    def __init__(self, what: str, files: Sequence[str]) -> None:
        self.files = list(files)
        shown = ", ".join(self.files[:10]) + (f" (+{len(self.files) - 10} more)" if len(self.files) > 10 else "")
        super().__init__(f"{what}: {shown}")


class TooLargeError(VerificationError):
    """A file from the box passed the size cap this host allows (an untrusted box, review M7)."""

    def __init__(self, message: str) -> None:
        SSHError.__init__(self, message)
        self.files = []


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str = "root"
    kind: Literal["direct", "proxy"] = "direct"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port} ({self.kind})"


@dataclass
class ReadinessDeadlines:
    """Seconds each stage may take, counted from the moment the stage is entered."""

    api: float = 600.0
    tcp: float = 300.0
    auth: float = 300.0
    probe: float = 300.0

    @classmethod
    def coerce(cls, value: ReadinessDeadlines | dict[str, float]) -> ReadinessDeadlines:
        if isinstance(value, ReadinessDeadlines):
            return value
        unknown = set(value) - {"api", "tcp", "auth", "probe"}
        if unknown:
            raise ValueError(f"unknown readiness stages: {sorted(unknown)}")
        return cls(**value)


@dataclass
class ReadyBox:
    endpoint: Endpoint
    host_key: str  # OpenSSH public-key text, to pin for the rest of the job


@dataclass
class Result:
    argv: list[str]
    exit_status: int
    stdout: str
    stderr: str


@dataclass
class _Backoff:
    delay: float = 0.2
    factor: float = 1.6
    cap: float = 5.0
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next = self.delay

    async def sleep(self, until: float) -> None:
        await asyncio.sleep(max(0.0, min(self._next, until - time.monotonic())))
        self._next = min(self._next * self.factor, self.cap)


# --------------------------------------------------------------------------------------------------
# connecting


def _load_key(key_path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(Path(key_path).expanduser()))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise SSHError(f"cannot read SSH key {key_path}: {exc}") from exc


def _import_host_key(text: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_public_key(text.strip())
    except asyncssh.KeyImportError as exc:
        raise SSHError(f"invalid pinned host key: {exc}") from exc


def host_key_text(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def fingerprint(host_key: str) -> str:
    """SHA256 fingerprint as OpenSSH prints it."""
    return str(_import_host_key(host_key).get_fingerprint("sha256"))


def _install_ignore_skip() -> None:
    """Skip asyncssh's empty SSH_MSG_IGNORE before every packet on our connections.

    It is the countermeasure for CBC ciphers' predictable IVs (RFC 4251 §9.3.1) and doubles the
    per-packet work, which bounds bulk throughput (benchmarks/ship.py: ~30 % faster without it). We
    only negotiate AEAD and CTR ciphers (_CIPHERS), which do not need it. If asyncssh's internals
    differ from what this expects, nothing is patched and asyncssh behaves as shipped.
    """
    module = getattr(asyncssh, "connection", None)
    cls = getattr(module, "SSHConnection", None)
    ignore = getattr(module, "MSG_IGNORE", None)
    orig = getattr(cls, "send_packet", None)
    if cls is None or ignore is None or orig is None or getattr(orig, "_lorabot", False):
        return
    empty = asyncssh.packet.String(b"")

    def send_packet(self: Any, pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if pkttype == ignore and args == (empty,) and getattr(self, "_lorabot_skip_ignore", False):
            return None
        return orig(self, pkttype, *args, **kwargs)

    send_packet._lorabot = True  # type: ignore[attr-defined]
    cls.send_packet = send_packet


_install_ignore_skip()


class _Client(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.lost = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def _open(
    endpoint: Endpoint,
    key: asyncssh.SSHKey,
    host_key: str | None,
    *,
    connect_timeout: float,
    keepalive_interval: float = 0.0,
    keepalive_count_max: int = 3,
) -> tuple[asyncssh.SSHClientConnection, _Client]:
    known_hosts: Any = None  # trust on first use: the caller pins what we return
    if host_key is not None:
        known_hosts = ([_import_host_key(host_key)], [], [])
    client = _Client()
    try:
        conn = await asyncssh.connect(
            endpoint.host,
            endpoint.port,
            username=endpoint.user,
            client_keys=[key],
            known_hosts=known_hosts,
            client_factory=lambda: client,
            config=[],  # never read the operator's ~/.ssh/config
            agent_path=None,
            preferred_auth="publickey",
            connect_timeout=connect_timeout,
            login_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max,
            encryption_algs=list(_CIPHERS),
            compression_algs=["none"],  # images do not compress; zlib would only burn CPU
            window=_WINDOW,
            max_pktsize=_MAX_PKTSIZE,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyMismatch(f"host key of {endpoint} does not match the pinned key: {exc.reason}") from exc
    if "cbc" not in str(conn.get_extra_info("send_cipher", "cbc")):
        conn._lorabot_skip_ignore = True  # type: ignore[attr-defined]  # see _install_ignore_skip
    return conn, client


def _is_auth_failure(exc: BaseException) -> bool:
    return isinstance(exc, asyncssh.PermissionDenied)


# --------------------------------------------------------------------------------------------------
# readiness


async def wait_ready(
    endpoints: list[Endpoint],
    key_path: Path,
    *,
    probe: str | Sequence[str],
    deadlines: dict[str, float] | ReadinessDeadlines,
    known_host_key: str | None = None,
    on_stage: StageCallback | None = None,
    api_poll: Callable[[], Awaitable[list[Endpoint] | None]] | None = None,
    connect_timeout: float = 10.0,
) -> ReadyBox:
    """Wait until the box answers TCP, accepts our key and passes the probe.

    `api_poll`, when given, is polled first (stage "api") until it returns endpoints. Each stage has
    its own deadline, counted from when it is entered; the furthest stage reached by any endpoint is
    the current one. A pinned `known_host_key` that does not match raises HostKeyMismatch at once.
    """
    limits = ReadinessDeadlines.coerce(deadlines)
    key = _load_key(key_path)
    probe_argv = shlex.split(probe) if isinstance(probe, str) else list(probe)
    if not probe_argv:
        raise ValueError("empty readiness probe")

    async def announce(stage: str, detail: str) -> None:
        if on_stage is not None:
            await on_stage(stage, detail)

    if api_poll is not None:
        await announce("api", "waiting for the instance to run")
        backoff = _Backoff(delay=1.0, cap=10.0)
        deadline = time.monotonic() + limits.api
        while True:
            found = await api_poll()
            if found:
                endpoints = list(found)
                break
            if time.monotonic() >= deadline:
                raise ReadinessError("api", f"instance not running with an SSH endpoint after {limits.api:.0f}s")
            await backoff.sleep(deadline)
    if not endpoints:
        raise ReadinessError("api", "no SSH endpoint to try")
    ordered = sorted(endpoints, key=lambda e: 0 if e.kind == "direct" else 1)

    stages = ("tcp", "auth", "probe")
    stage = "tcp"
    await announce("tcp", "waiting for the SSH port of " + ", ".join(map(str, ordered)))
    deadline = time.monotonic() + limits.tcp
    last_error: dict[str, str] = {}
    last_ep: Endpoint | None = None
    backoff = _Backoff()

    async def advance(to: str, detail: str) -> None:
        nonlocal stage, deadline
        if stages.index(to) > stages.index(stage):
            stage = to
            deadline = time.monotonic() + getattr(limits, to)
            await announce(to, detail)

    while True:
        for ep in ordered:
            # stage tcp
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port), connect_timeout)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            except (OSError, TimeoutError) as exc:
                last_error["tcp"] = f"{ep}: {exc or type(exc).__name__}"
                continue
            await advance("auth", f"port open on {ep}; trying key auth")
            # stage auth
            try:
                conn, _client = await _open(ep, key, known_host_key, connect_timeout=connect_timeout)
            except HostKeyMismatch:
                raise
            except (OSError, TimeoutError, asyncssh.Error) as exc:
                kind = "permission denied" if _is_auth_failure(exc) else (str(exc) or type(exc).__name__)
                last_error["auth"] = f"{ep}: {kind}"
                continue
            last_ep = ep
            try:
                host_key = host_key_text(conn.get_server_host_key())  # type: ignore[arg-type]
                await advance("probe", f"logged in on {ep}; probing")
                # stage probe
                try:
                    res = await asyncio.wait_for(
                        conn.run(shlex.join(probe_argv), check=False), max(connect_timeout, 30.0)
                    )
                except (OSError, TimeoutError, asyncssh.Error) as exc:
                    last_error["probe"] = f"{ep}: {exc or type(exc).__name__}"
                    continue
                if res.exit_status == 0:
                    await announce("ready", f"{ep} passed `{shlex.join(probe_argv)}`")
                    return ReadyBox(endpoint=ep, host_key=host_key)
                err = str(res.stderr or res.stdout or "").strip().splitlines()
                last_error["probe"] = f"{ep}: `{shlex.join(probe_argv)}` exited {res.exit_status}" + (
                    f": {err[-1]}" if err else ""
                )
            finally:
                conn.close()
        if time.monotonic() >= deadline:
            raise ReadinessError(
                stage,
                f"{last_error.get(stage, 'no answer')} (gave up after {getattr(limits, stage):.0f}s)",
                last_ep,
            )
        await backoff.sleep(deadline)


# --------------------------------------------------------------------------------------------------
# the box


class CommandTimeout(SSHError):
    """A command or transfer on the box did not end in time while the link stayed up (a hung box)."""


class Box:
    """One SSH connection to the box, pinned to its host key. Use as `async with await Box.connect(...)`.

    Every command ends within `command_timeout` seconds unless its caller gives another bound, and
    every transfer within `command_timeout` plus its size at `floor_bytes_s`: a box that hangs a
    command while sshd stays up raises CommandTimeout instead of holding the job forever."""

    def __init__(
        self,
        endpoint: Endpoint,
        key_path: Path,
        host_key: str,
        *,
        connect_timeout: float = 15.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 4,
        python: str = "python3",
        openssh_from: int | None = OPENSSH_FROM,
        command_timeout: float = 120.0,
        floor_bytes_s: float = 1e6,
    ) -> None:
        self.endpoint = endpoint
        self.command_timeout = command_timeout
        self.floor_bytes_s = floor_bytes_s
        self.openssh_from = openssh_from  # datasets this big go through the OpenSSH client; None: never
        self.python = python  # the box's Python, used for fast hashing
        self.key_path = Path(key_path)
        self.host_key = host_key.strip()
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self._key = _load_key(self.key_path)
        _import_host_key(self.host_key)  # fail early on a malformed pin
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, endpoint: Endpoint, key_path: Path, host_key: str, **kwargs: Any) -> Box:
        box = cls(endpoint, key_path, host_key, **kwargs)
        await box.reconnect()
        return box

    async def __aenter__(self) -> Box:
        if not self.connected:
            await self.reconnect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._client is not None and not self._client.lost.is_set()

    async def reconnect(self) -> None:
        """Drop the current connection (if any) and open a fresh one; the host key must still match."""
        async with self._lock:
            await self._drop()
            try:
                self._conn, self._client = await _open(
                    self.endpoint,
                    self._key,
                    self.host_key,
                    connect_timeout=self.connect_timeout,
                    keepalive_interval=self.keepalive_interval,
                    keepalive_count_max=self.keepalive_count_max,
                )
            except HostKeyMismatch:
                raise
            except (OSError, TimeoutError, asyncssh.Error) as exc:
                raise SSHError(f"cannot connect to {self.endpoint}: {exc or type(exc).__name__}") from exc

    async def _drop(self) -> None:
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _connection(self) -> asyncssh.SSHClientConnection:
        # Reconnecting before a command is safe: nothing has run yet. A command cut mid-way is not
        # retried here because it may not be idempotent; `_retrying` does that for read-only ones.
        if not self.connected:
            await self.reconnect()
        assert self._conn is not None
        return self._conn

    async def _retrying(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """Run a read-only operation; if the link dropped under it, reconnect and try once more."""
        try:
            return await op()
        except ConnectionLostError:
            await self.reconnect()
            return await op()

    def transfer_timeout(self, nbytes: int) -> float:
        """How long moving `nbytes` may take: the command timeout plus the bytes at the floor rate."""
        return self.command_timeout + max(0, nbytes) / self.floor_bytes_s

    # --- commands ---------------------------------------------------------------------------------
    @staticmethod
    def _command(argv: Sequence[str]) -> str:
        if isinstance(argv, str) or not argv:
            raise TypeError("argv must be a non-empty list of strings")
        for arg in argv:
            if not isinstance(arg, str) or "\0" in arg:
                raise ValueError(f"invalid argument {arg!r}")
        return shlex.join(argv)

    async def _run_raw(
        self, argv: Sequence[str], input: bytes | None = None, timeout: float | None = None  # noqa: ASYNC109
    ) -> tuple[int, bytes, bytes]:
        cmd = self._command(argv)
        if timeout is None:
            timeout = self.transfer_timeout(len(input)) if input else self.command_timeout
        conn = await self._connection()
        try:
            # without input, stdin must still see EOF (asyncssh leaves it open), or a reader hangs
            stdin: dict[str, Any] = {"input": input} if input else {"stdin": asyncssh.DEVNULL}
            res = await asyncio.wait_for(conn.run(cmd, encoding=None, check=False, **stdin), timeout)
        except TimeoutError:
            raise CommandTimeout(f"{argv[0]} timed out after {timeout:.0f}s on {self.endpoint}") from None
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionLostError(f"connection to {self.endpoint} lost running {argv[0]}: {exc}") from exc
        if res.exit_status is None:
            # killed by a signal, or the channel closed without a status: the link went away
            raise ConnectionLostError(f"no exit status for {argv[0]} (signal {res.exit_signal})")
        out = res.stdout if isinstance(res.stdout, bytes) else b""
        err = res.stderr if isinstance(res.stderr, bytes) else b""
        return res.exit_status, out, err

    async def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the public API; applies to the whole command
    ) -> Result:
        """Run argv on the box (quoted with shlex.join). With check, a non-zero exit raises."""
        data = input.encode() if isinstance(input, str) else input
        status, out, err = await self._run_raw(argv, data, timeout)
        result = Result(list(argv), status, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and status != 0:
            raise RemoteCommandError(argv, status, result.stderr)
        return result

    async def exists(self, path: str) -> bool:
        async def op() -> bool:
            status, _o, _e = await self._run_raw(["test", "-e", path])
            return status == 0

        return bool(await self._retrying(op))

    async def tail(
        self, remote_path: str, offset: int, max_bytes: int = 256 * 1024, *, touch: str | None = None
    ) -> tuple[bytes, int]:
        """Bytes of `remote_path` from `offset` (at most max_bytes), and the offset to read on from.

        A missing file reads as empty. A file shorter than `offset` (rotated) restarts from 0.
        `touch`: a file to touch in the same round trip (the bot's heartbeat for the dead-man's switch).
        """
        if offset < 0 or max_bytes <= 0:
            raise ValueError("offset must be >= 0 and max_bytes > 0")
        script = (
            '[ -z "$4" ] || touch -- "$4" 2>/dev/null; '
            '[ -f "$1" ] || exit 3; size=$(wc -c < "$1"); echo "$size"; '
            '[ "$size" -gt "$2" ] || exit 0; tail -c +"$(($2 + 1))" -- "$1" | head -c "$3"'
        )

        async def op() -> tuple[bytes, int]:
            status, out, err = await self._run_raw(["sh", "-c", script, "tail", remote_path, str(offset),
                                                   str(max_bytes), touch or ""])
            if status == 3:
                return b"", offset
            if status != 0:
                raise RemoteCommandError(["tail", remote_path], status, err.decode(errors="replace"))
            head, _, data = out.partition(b"\n")
            size = int(head or b"0")
            if size < offset:  # truncated or rotated: read from the start next time
                return b"", 0
            return data, offset + len(data)

        result: tuple[bytes, int] = await self._retrying(op)
        return result

    # --- files ------------------------------------------------------------------------------------
    async def put_bytes(self, data: bytes, remote: str, mode: int = 0o600) -> None:
        """Write `data` to `remote` atomically with `mode` (created private, then chmod, then renamed)."""
        script = (
            'set -e; umask 077; mkdir -p -- "$(dirname -- "$1")"; tmp="$1.part.$$"; '
            'cat > "$tmp"; chmod "$2" "$tmp"; sha256sum -- "$tmp" | cut -c1-64; mv -f -- "$tmp" "$1"'
        )
        res = await self.run(["sh", "-c", script, "put", remote, format(mode, "o")], input=data)
        if res.stdout.strip() != hashlib.sha256(data).hexdigest():
            raise VerificationError("sha256 mismatch writing", [remote])

    async def put_file(self, local: Path, remote: str, mode: int = 0o644) -> None:
        """Stream a local file to `remote` (verified by sha256, written atomically)."""
        local = Path(local)
        script = (
            'set -e; umask 077; mkdir -p -- "$(dirname -- "$1")"; tmp="$1.part.$$"; '
            'cat > "$tmp"; chmod "$2" "$tmp"; sha256sum -- "$tmp" | cut -c1-64; mv -f -- "$tmp" "$1"'
        )
        cmd = self._command(["sh", "-c", script, "put", remote, format(mode, "o")])
        size = (await asyncio.to_thread(local.stat)).st_size
        conn = await self._connection()
        digest = hashlib.sha256()
        limit = self.transfer_timeout(size)
        try:
            async with asyncio.timeout(limit):
                proc = await conn.create_process(cmd, encoding=None)
                try:
                    fh = await asyncio.to_thread(local.open, "rb")
                    with fh:
                        while chunk := await asyncio.to_thread(fh.read, _CHUNK):
                            digest.update(chunk)
                            proc.stdin.write(chunk)
                            await proc.stdin.drain()
                    proc.stdin.write_eof()
                    res = await proc.wait()
                finally:
                    if not proc.is_closing():
                        proc.close()
        except TimeoutError:
            raise CommandTimeout(f"upload of {local.name} took longer than {limit:.0f}s") from None
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionLostError(f"upload of {local.name} interrupted: {exc}") from exc
        if res.exit_status != 0:
            raise RemoteCommandError(["put", remote], res.exit_status, _text(res.stderr))
        if _text(res.stdout).strip() != digest.hexdigest():
            raise VerificationError("sha256 mismatch uploading", [remote])

    async def sha256(self, remote: str) -> str:
        res = await self.run(["sha256sum", "--", remote])
        return res.stdout.split(" ", 1)[0].strip()

    async def download(
        self, remote: str, local: Path, *, sha256: str | None = None, max_bytes: int | None = None
    ) -> Path:
        """Copy a remote file to `local` (atomically), verified against `sha256` or the box's own hash.

        `max_bytes` caps what an untrusted box may make this host store (review M7).
        """
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256 or await self.sha256(remote)
        tmp = local.with_name(local.name + ".part")
        cmd = self._command(["cat", "--", remote])
        conn = await self._connection()
        digest = hashlib.sha256()
        t0 = time.monotonic()
        received = 0

        async def next_chunk() -> bytes:
            # a head start of one command timeout, then at least the floor rate on average
            allowed = t0 + self.command_timeout + (received + _CHUNK) / self.floor_bytes_s - time.monotonic()
            try:
                return bytes(await asyncio.wait_for(proc.stdout.read(_CHUNK), max(0.0, allowed)))
            except TimeoutError:
                proc.close()
                raise CommandTimeout(f"download of {remote} fell below {self.floor_bytes_s / 1e6:g} MB/s") from None

        try:
            proc = await conn.create_process(cmd, encoding=None, stdin=asyncssh.DEVNULL)
            fh = await asyncio.to_thread(tmp.open, "wb")
            with fh:
                buf: list[bytes] = []
                pending = 0
                while chunk := await next_chunk():
                    received += len(chunk)
                    if max_bytes is not None and received > max_bytes:
                        proc.kill()
                        raise TooLargeError(f"{remote} is larger than {max_bytes} bytes")
                    digest.update(chunk)
                    buf.append(chunk)
                    pending += len(chunk)
                    if pending >= _CHUNK:
                        await asyncio.to_thread(fh.write, b"".join(buf))
                        buf, pending = [], 0
                if buf:
                    await asyncio.to_thread(fh.write, b"".join(buf))
            res = await asyncio.wait_for(proc.wait(), self.command_timeout)
        except (CommandTimeout, TooLargeError):
            tmp.unlink(missing_ok=True)
            raise
        except TimeoutError:
            tmp.unlink(missing_ok=True)
            proc.close()
            raise CommandTimeout(f"download of {remote}: no exit status within {self.command_timeout:.0f}s") from None
        except (OSError, asyncssh.Error) as exc:
            tmp.unlink(missing_ok=True)
            raise ConnectionLostError(f"download of {remote} interrupted: {exc}") from exc
        if res.exit_status != 0:
            tmp.unlink(missing_ok=True)
            raise RemoteCommandError(["cat", remote], res.exit_status, _text(res.stderr))
        if digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise VerificationError("sha256 mismatch downloading", [remote])
        tmp.replace(local)
        return local

    # --- datasets ---------------------------------------------------------------------------------
    async def upload_dataset(
        self,
        folder: Path,
        manifest: Manifest,
        dest: str,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Stream the manifest's files from `folder` as a tar into `tar -x` under `dest` and verify them.

        The box hashes each file as soon as tar has finished writing it (tar -v names a member before
        extracting it, so the previous name is complete); the hashes come back on stdout and are
        compared with the manifest here. Missing or different files raise VerificationError.
        A dataset of `openssh_from` bytes or more goes through the OpenSSH client when there is one
        (see services/openssh.py); a smaller one, or one ssh cannot carry, through this connection.
        """
        folder = Path(folder)
        script = (
            'mkdir -p -- "$1" && cd -- "$1" || exit 97; '
            "{ tar -x -v -f - --no-same-owner; echo $? > .lorabot-tar-status; } | \"$2\" -c \"$3\"; "
            "s=$(cat .lorabot-tar-status); rm -f .lorabot-tar-status; exit $s"
        )
        cmd = self._command([self.python, "-c", _WIDE_STDIN, "sh", "-c", script, "upload", dest, self.python,
                             _HASHER_LAGGED])
        big = self.openssh_from is not None and manifest.total_bytes >= self.openssh_from
        binary = openssh.available() if big else None
        result = None
        limit = self.transfer_timeout(manifest.total_bytes)
        try:
            async with asyncio.timeout(limit):  # both transports together: a fallback does not reset it
                if binary is not None:
                    try:
                        result = await self._upload_openssh(binary, cmd, folder, manifest, progress)
                    except openssh.OpenSSHUnusable as exc:
                        log.warning("OpenSSH could not ship to %s (%s); using the built-in client",
                                    self.endpoint, exc)
                if result is None:
                    result = await self._upload_asyncssh(cmd, folder, manifest, progress)
        except TimeoutError:
            raise CommandTimeout(f"dataset upload to {self.endpoint} took longer than {limit:.0f}s") from None
        status, out, err = result
        if status == 97:
            raise RemoteCommandError(["mkdir", dest], 97, _text(err))
        if status == 255:
            raise ConnectionLostError(f"dataset upload to {self.endpoint} interrupted: {_text(err).strip()}")
        bad = _compare(manifest, _parse_sha256sum(_text(out)))
        if bad:
            raise VerificationError(f"sha256 mismatch on the box under {dest}", bad)
        if status != 0:
            raise RemoteCommandError(["tar", "-x"], status, _text(err))

    async def _upload_asyncssh(
        self, cmd: str, folder: Path, manifest: Manifest, progress: ProgressCallback | None
    ) -> tuple[int, bytes, bytes]:
        conn = await self._connection()
        total = manifest.total_bytes
        sent = 0
        try:
            proc = await conn.create_process(cmd, encoding=None)
            collect = asyncio.ensure_future(proc.stdout.read())
            try:
                async for chunk, n in _tar_chunks(folder, manifest):
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
                    if n:
                        sent += n
                        if progress is not None:
                            progress(sent, total)
                proc.stdin.write_eof()
                out = await collect
                res = await proc.wait()
            finally:
                collect.cancel()
                if not proc.is_closing():
                    proc.close()
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionLostError(f"dataset upload to {self.endpoint} interrupted: {exc}") from exc
        status = res.exit_status if res.exit_status is not None else 255
        return status, out, res.stderr if isinstance(res.stderr, bytes) else b""

    async def _upload_openssh(
        self, binary: str, cmd: str, folder: Path, manifest: Manifest, progress: ProgressCallback | None
    ) -> tuple[int, bytes, bytes]:
        loop = asyncio.get_running_loop()
        total = manifest.total_bytes
        done = 0

        def report(n: int) -> None:  # in the writer thread
            nonlocal done
            done += n
            if progress is not None:
                loop.call_soon_threadsafe(progress, done, total)

        def feed(fd: int, stop: threading.Event) -> None:
            _write_tar(fd, folder, manifest, stop, report)

        try:
            return await openssh.run_fed(
                binary, host=self.endpoint.host, port=self.endpoint.port, user=self.endpoint.user,
                key_path=self.key_path, host_key=self.host_key, remote_command=cmd, feed=feed,
                connect_timeout=self.connect_timeout, keepalive_interval=self.keepalive_interval,
                keepalive_count_max=self.keepalive_count_max, ciphers=_CIPHERS,
            )
        except openssh.OpenSSHHostKeyMismatch as exc:
            raise HostKeyMismatch(f"host key of {self.endpoint} does not match the pinned key: {exc}") from exc
        except OSError as exc:
            raise SSHError(f"cannot read the dataset: {exc}") from exc

    async def verify_dataset(self, dest: str, manifest: Manifest) -> None:
        """Hash every manifest file under `dest` on the box; raise VerificationError naming mismatches."""
        listing = "".join(f"{f.path}\n" for f in manifest.files)
        script = 'cd -- "$1" && exec "$2" -c "$3"'
        res = await self.run(["sh", "-c", script, "verify", dest, self.python, _HASHER_ALL], input=listing, check=False,
                             timeout=self.transfer_timeout(manifest.total_bytes))
        bad = _compare(manifest, _parse_sha256sum(res.stdout))
        if bad:
            raise VerificationError(f"sha256 mismatch on the box under {dest}", bad)


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return str(data or "")


def _parse_sha256sum(out: str) -> dict[str, str]:
    got: dict[str, str] = {}
    for line in out.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64:
            got[name] = digest
    return got


def _compare(manifest: Manifest, got: dict[str, str]) -> list[str]:
    return [f.path for f in manifest.files if got.get(f.path) != f.sha256]


def _tar_header(path: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(path)
    info.size = size
    info.mode = 0o644
    info.mtime = int(mtime)
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


@contextlib.contextmanager
def _member(folder: Path, entry: ManifestFile) -> Iterator[tuple[BinaryIO, bytes]]:
    """The open file of one manifest entry and its tar header; refuses a file whose size changed."""
    with (folder / entry.path).open("rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size != entry.size:
            raise SSHError(f"{entry.path} changed since the manifest was built ({st.st_size} != {entry.size})")
        yield fh, _tar_header(entry.path, entry.size, st.st_mtime)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _TAR_BLOCK)


_TAR_END = b"\0" * (2 * _TAR_BLOCK)
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP}


def _iter_tar(folder: Path, manifest: Manifest, stop: threading.Event) -> Iterator[tuple[bytes, int]]:
    """(bytes to send, how many of them are file content) for a tar of exactly the manifest's files."""
    for entry in manifest.files:
        if stop.is_set():
            return
        with _member(folder, entry) as (fh, header):
            remaining = entry.size
            first = True
            while remaining > 0:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise SSHError(f"{entry.path} shrank while it was being sent")
                remaining -= len(chunk)
                yield (header + chunk if first else chunk), len(chunk)
                first = False
                if stop.is_set():
                    return
            if first:
                yield header, 0
            if pad := _padding(entry.size):
                yield pad, 0
    yield _TAR_END, 0


def _write_tar(
    fd: int, folder: Path, manifest: Manifest, stop: threading.Event, sent: Callable[[int], None]
) -> None:
    """The same tar as _iter_tar, written into `fd` (a pipe); file content goes by sendfile, uncopied."""

    def write_all(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def copy(fh: BinaryIO, offset: int, count: int) -> int:
        fh.seek(offset)
        data = fh.read(min(_CHUNK, count))
        write_all(data)
        return len(data)

    zero_copy = True
    for entry in manifest.files:
        if stop.is_set():
            return
        with _member(folder, entry) as (fh, header):
            write_all(header)
            offset = 0
            while offset < entry.size:
                if stop.is_set():
                    return
                count = min(_SENDFILE_CHUNK, entry.size - offset)
                try:
                    n = os.sendfile(fd, fh.fileno(), offset, count) if zero_copy else copy(fh, offset, count)
                except OSError as exc:
                    if not zero_copy or exc.errno not in _NO_SENDFILE:
                        raise
                    zero_copy = False  # a system that cannot sendfile into a pipe: copy instead
                    continue
                if n == 0:
                    raise SSHError(f"{entry.path} shrank while it was being sent")
                offset += n
                sent(n)
            write_all(_padding(entry.size))
    write_all(_TAR_END)


async def _tar_chunks(folder: Path, manifest: Manifest) -> AsyncIterator[tuple[bytes, int]]:
    """Read and frame the tar in a thread, `_PREFETCH` chunks ahead: disk reads overlap the network."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bytes, int] | BaseException | None] = asyncio.Queue(_PREFETCH)
    stop = threading.Event()

    def produce() -> None:
        def put(item: tuple[bytes, int] | BaseException | None) -> None:
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            while not stop.is_set():
                try:
                    fut.result(timeout=0.5)
                    return
                except TimeoutError:
                    continue
            fut.cancel()

        try:
            for item in _iter_tar(folder, manifest, stop):
                put(item)
                if stop.is_set():
                    return
            put(None)
        except BaseException as exc:
            put(exc)

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                if isinstance(item, OSError):
                    raise SSHError(f"cannot read the dataset: {item}") from item
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await worker
