"""A real S3 server on loopback standing in for Cloudflare R2: moto's server mode in a subprocess.

A subprocess (not moto's in-process ThreadedMotoServer) keeps its state and its GIL apart from the
process under test, so several servers can coexist and benchmarks measure HTTP, not lock contention.

Two entry points:
- `run_s3_server()`: a plain context manager (no pytest import), also used by `lorabot demo`.
- pytest fixtures `s3_server` (session-wide, no auth) and `s3_auth_server` (signatures checked), to be
  imported by test modules: `from tests.sim.s3 import s3_server  # noqa: F401`.

With `auth=True` moto checks SigV4 signatures of SDK requests against IAM keys it knows; it cannot
then serve presigned URLs (it expects an Authorization header), hence two separate servers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from services.settings import Settings

DEFAULT_BUCKET = "lorabot-test"
_ADMIN_POLICY = (
    '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    bucket: str
    auth: bool = False

    def env(self) -> dict[str, str]:
        """The R2_* variables that point lorabot at this server."""
        return {
            "R2_ENDPOINT_URL": self.endpoint_url,
            "R2_ACCESS_KEY_ID": self.access_key_id,
            "R2_SECRET_ACCESS_KEY": self.secret_access_key,
            "R2_BUCKET": self.bucket,
        }

    def settings(self, **overrides: Any) -> Settings:
        from services.settings import load_settings

        values: dict[str, Any] = {k.lower(): v for k, v in self.env().items()}
        values.update(overrides)
        return load_settings(**values)

    def client(self) -> S3Client:
        """A plain boto3 client, for tests that inspect or tamper with the server's state."""
        return _client(self.endpoint_url, self.access_key_id, self.secret_access_key)


@functools.lru_cache(maxsize=16)  # building a boto3 client costs ~0.3 s; these are reused a lot
def _client(endpoint_url: str, access_key_id: str, secret_access_key: str) -> S3Client:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    return False


def _enable_auth(server: S3Server) -> S3Server:
    """Create an IAM user with full rights, then make moto check every SDK request's signature."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=server.endpoint_url,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",  # unauthenticated phase: any value works
        region_name="us-east-1",
    )
    iam.create_user(UserName="lorabot")
    iam.put_user_policy(UserName="lorabot", PolicyName="all", PolicyDocument=_ADMIN_POLICY)
    key = iam.create_access_key(UserName="lorabot")["AccessKey"]
    authed = S3Server(
        endpoint_url=server.endpoint_url,
        access_key_id=key["AccessKeyId"],
        secret_access_key=key["SecretAccessKey"],
        bucket=server.bucket,
        auth=True,
    )
    req = urllib.request.Request(
        f"{server.endpoint_url}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
    )
    with urllib.request.urlopen(req, timeout=10):
        pass
    return authed


@contextlib.contextmanager
def run_s3_server(
    bucket: str | None = DEFAULT_BUCKET, *, auth: bool = False, start_timeout_s: float = 30.0
) -> Iterator[S3Server]:
    """Start moto's S3 server on a free loopback port, create `bucket` (unless None), yield, stop.

    Independent of pytest: `lorabot demo` uses it too.
    """
    env = dict(os.environ)
    # moto keeps objects above this size in temp files: keep big benchmark uploads off the heap
    env.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(8 * 1024 * 1024))
    last_error = "did not start"
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            if not _wait_ready(url, proc, start_timeout_s):
                log.seek(0)
                last_error = log.read()[-2000:].decode(errors="replace") or "no output"
                continue
            server = S3Server(
                endpoint_url=url,
                access_key_id="test-" + secrets.token_hex(8),
                secret_access_key=secrets.token_urlsafe(30),
                bucket=bucket or DEFAULT_BUCKET,
            )
            if bucket is not None:
                server.client().create_bucket(Bucket=bucket)
            if auth:
                server = _enable_auth(server)
            yield server
            return
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    raise RuntimeError(f"moto S3 server failed to start: {last_error}")


# --- pytest fixtures (pytest imported lazily so that the demo does not need it) -------------------
try:
    import pytest
except ImportError:  # pragma: no cover - outside the test environment
    pass
else:

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[S3Server]:
        """One moto S3 server for the whole session, with the bucket `lorabot-test`, no auth."""
        with run_s3_server() as server:
            yield server

    @pytest.fixture(scope="session")
    def s3_auth_server() -> Iterator[S3Server]:
        """A moto S3 server that checks SigV4 signatures against its own IAM keys."""
        with run_s3_server(auth=True) as server:
            yield server
