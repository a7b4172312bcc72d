"""services/storage.py and services/remote/upload_presigned.py against moto's S3 server over HTTP.

No in-process mocking: every call goes through a socket to `python -m moto.server` (tests/sim/s3.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from services.remote import upload_presigned
from services.remote.upload_presigned import UploadError, put_file, put_multipart, sha256_file
from services.storage import (
    MAX_LINK_EXPIRY_S,
    Link,
    PresignedMultipart,
    Storage,
    StorageError,
    clamp_expiry,
    job_keys,
    safe_key_part,
)

if TYPE_CHECKING:
    from tests.sim.s3 import S3Server


MiB = 1024 * 1024
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def _key(name: str = "obj.bin") -> str:
    return f"t/{uuid.uuid4().hex[:12]}/{name}"


def _file(tmp_path: Path, size: int, name: str = "data.bin") -> tuple[Path, str]:
    path = tmp_path / name
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def storage(s3_server: S3Server) -> Storage:
    return Storage.from_settings(s3_server.settings())


# --- uploads from this host ----------------------------------------------------------------------


async def test_upload_file_single_put_is_verified_and_readable(
    storage: Storage, s3_server: S3Server, tmp_path: Path
) -> None:
    path, digest = _file(tmp_path, 300_000)
    key = _key("model.safetensors")
    obj = await storage.upload_file(path, key, metadata={"job": "j1"})
    assert (obj.size, obj.sha256) == (300_000, digest)
    assert obj.metadata["job"] == "j1"
    assert obj.etag is not None and "-" not in obj.etag  # a single PUT
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert body == path.read_bytes()
    assert await storage.head(key) == obj


async def test_upload_file_goes_multipart_above_threshold(s3_server: S3Server, tmp_path: Path) -> None:
    storage = Storage.from_settings(s3_server.settings(r2_multipart_threshold_mb=5, r2_part_size_mb=6))
    path, digest = _file(tmp_path, 13 * MiB + 123)  # 6 + 6 + 1 MiB parts
    key = _key()
    obj = await storage.upload_file(path, key)
    assert obj.etag is not None and obj.etag.endswith("-3")  # S3's multipart ETag: md5-of-md5s-N
    assert (obj.size, obj.sha256) == (13 * MiB + 123, digest)
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == digest


async def test_upload_file_with_expected_sha256(storage: Storage, s3_server: S3Server, tmp_path: Path) -> None:
    path, digest = _file(tmp_path, 100_000)
    ok = await storage.upload_file(path, _key(), sha256=digest)
    assert ok.sha256 == digest
    key = _key()
    with pytest.raises(StorageError, match="does not match the expected sha256"):
        await storage.upload_file(path, key, sha256="0" * 64)
    assert await storage.head(key) is None  # the wrong bytes were removed again
    with pytest.raises(StorageError, match="64 hex"):
        await storage.upload_file(path, key, sha256="abc")


async def test_upload_missing_file_is_a_clear_error(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="upload"):
        await storage.upload_from_local(tmp_path / "nope.safetensors", _key())


async def test_upload_bytes_and_tamper_detection(storage: Storage, s3_server: S3Server) -> None:
    key = _key("job.json")
    data = b'{"state": "done"}'
    obj = await storage.upload_bytes(data, key)
    assert obj.content_type == "application/json"
    digest = hashlib.sha256(data).hexdigest()
    await storage.verify(key, len(data), digest)

    # someone replaces the bytes but keeps the old metadata: the size gives it away
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key=key, Body=b'{"state": "hacked!"}', Metadata={"sha256": digest}
    )
    with pytest.raises(StorageError, match="size"):
        await storage.verify(key, len(data), digest)
    # same size, different content and a forged-looking digest
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key=key, Body=b'{"state": "fail"}', Metadata={"sha256": "f" * 64}
    )
    with pytest.raises(StorageError, match="sha256"):
        await storage.verify(key, len(data), digest)
    # no metadata at all
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=data)
    with pytest.raises(StorageError, match="no sha256"):
        await storage.verify(key, len(data), digest)
    with pytest.raises(StorageError, match="missing"):
        await storage.verify(_key(), 1, digest)
    assert await storage.head(_key()) is None


async def test_metadata_must_be_ascii(storage: Storage) -> None:
    with pytest.raises(StorageError, match="ASCII"):
        await storage.upload_bytes(b"x", _key(), metadata={"name": "café"})


# --- links ---------------------------------------------------------------------------------------


async def test_presigned_get_fetched_with_httpx(storage: Storage) -> None:
    key = _key("my lora+v1.safetensors")  # spaces and '+' must survive the URL
    data = os.urandom(4096)
    await storage.upload_bytes(data, key)
    link = await storage.link(key, expires_s=3600)
    assert link.expires_at is not None and not link.is_public
    assert abs((link.expires_at - datetime.now(UTC)).total_seconds() - 3600) < 5
    async with httpx.AsyncClient() as client:
        resp = await client.get(link.url)
    assert resp.status_code == 200
    assert resp.content == data


async def test_a_presigned_link_survives_secret_redaction(s3_server: S3Server) -> None:
    """Every posted link is redacted first: the access key id it carries must not be (it is no secret)."""
    from services.settings import redact

    settings = s3_server.settings()
    storage = Storage.from_settings(settings)
    key = _key()
    await storage.upload_bytes(b"lora", key)
    link = await storage.link(key, expires_s=3600)
    assert s3_server.access_key_id in link.url
    assert redact(link.url, settings.secret_values()) == link.url
    assert redact(s3_server.secret_access_key, settings.secret_values()) == "[redacted]"


def _x_amz_expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


async def test_link_expiry_is_clamped_to_sigv4_bounds(s3_server: S3Server) -> None:
    storage = Storage.from_settings(s3_server.settings(link_expiry_s=2 * 86400))
    key = _key()
    assert _x_amz_expires((await storage.link(key)).url) == 2 * 86400  # the setting is the default
    assert _x_amz_expires((await storage.link(key, expires_s=5)).url) == 60
    long = await storage.link(key, expires_s=30 * 86400)
    assert _x_amz_expires(long.url) == MAX_LINK_EXPIRY_S == 7 * 86400
    assert long.expires_at is not None
    assert long.expires_at - datetime.now(UTC) <= timedelta(days=7, seconds=1)
    assert long.expiry_text().startswith("expires in 6 days 23 h") or long.expiry_text().startswith(
        "expires in 7 days"
    )
    assert clamp_expiry(-1) == 60 and clamp_expiry(None) == MAX_LINK_EXPIRY_S


def test_expiry_text() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert Link("u", now + timedelta(days=7)).expiry_text(now) == "expires in 7 days (2026-01-08 12:00 UTC)"
    assert Link("u", now + timedelta(hours=2, minutes=5)).expiry_text(now).startswith("expires in 2 h 5 min")
    assert Link("u", now + timedelta(seconds=30)).expiry_text(now).startswith("expires in 1 min")
    assert Link("u", now - timedelta(seconds=1)).expiry_text(now).startswith("expired")
    assert Link("u", None).expiry_text(now) == "permanent link"


async def test_public_base_url_links_do_not_expire(s3_server: S3Server) -> None:
    storage = Storage.from_settings(s3_server.settings(r2_public_base_url="https://cdn.example.com/files/"))
    link = await storage.link("loras/1/2/my lora.safetensors", expires_s=60)
    assert link.url == "https://cdn.example.com/files/loras/1/2/my%20lora.safetensors"
    assert link.expires_at is None and link.is_public
    assert link.expiry_text() == "permanent link"


# --- uploads from the box: presigned PUT and multipart -------------------------------------------


@needs_curl
async def test_presigned_put_with_curl(storage: Storage, tmp_path: Path) -> None:
    path, digest = _file(tmp_path, 200_000, "model.safetensors")
    key = _key("model.safetensors")
    put = await storage.presign_put(key, expires_s=600, sha256=digest)
    assert put.headers["x-amz-meta-sha256"] == digest
    args = [CURL or "curl", "-sS", "-f", "-o", "/dev/null", "-T", str(path)]
    for name, value in put.headers.items():
        args += ["-H", f"{name}: {value}"]
    subprocess.run([*args, put.url], check=True, timeout=30)
    await storage.verify(key, path.stat().st_size, digest)

    # an uploader that drops the signed headers leaves an object that does not verify
    key2 = _key()
    put2 = await storage.presign_put(key2, expires_s=600, sha256=digest)
    subprocess.run([CURL or "curl", "-sS", "-o", "/dev/null", "-T", str(path), put2.url], timeout=30, check=False)
    with pytest.raises(StorageError):
        await storage.verify(key2, path.stat().st_size, digest)


async def test_presigned_put_with_stdlib_uploader(storage: Storage, tmp_path: Path) -> None:
    path, digest = _file(tmp_path, 3 * MiB + 7)
    assert sha256_file(path) == digest
    key = _key()
    put = await storage.presign_put(key, expires_s=600, content_type="application/x-test", sha256=digest)
    etag = put_file(path, put.url, put.headers)
    assert etag == hashlib.md5(path.read_bytes()).hexdigest()  # S3's ETag of a single PUT
    obj = await storage.head(key)
    assert obj is not None and obj.content_type == "application/x-test"
    await storage.verify(key, path.stat().st_size, digest)


async def test_uploader_runs_standalone_from_a_copy(storage: Storage, tmp_path: Path) -> None:
    """The supervisor ships the file alone to the box: it must run with no lorabot package around."""
    script = tmp_path / "box" / "upload_presigned.py"
    script.parent.mkdir()
    shutil.copy(upload_presigned.__file__, script)
    path, digest = _file(tmp_path, 50_000)
    out = subprocess.run(
        [sys.executable, "-I", str(script), "sha256", str(path)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == {"sha256": digest, "size": 50_000}
    key = _key()
    put = await storage.presign_put(key, expires_s=600, sha256=digest)
    headers = [arg for name, value in put.headers.items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        [sys.executable, "-I", str(script), "put", str(path), put.url, *headers],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert json.loads(out.stdout)["size"] == 50_000
    await storage.verify(key, 50_000, digest)


async def test_multipart_with_stdlib_uploader(storage: Storage, tmp_path: Path) -> None:
    size = 2 * 6 * MiB + 1000  # two 6 MiB parts and a small last one
    path, digest = _file(tmp_path, size)
    key = _key("model.safetensors")
    m = await storage.start_multipart(key, size, 6 * MiB, 600, {"job": "j9"}, sha256=digest)
    assert len(m.part_urls) == 3 and m.sha256 == digest
    assert PresignedMultipart.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    etags = put_multipart(path, m.part_urls, m.part_size, workers=3)
    obj = await storage.complete_multipart(m, etags)
    assert (obj.size, obj.sha256, obj.metadata["job"]) == (size, digest, "j9")
    assert obj.etag is not None and obj.etag.endswith("-3")


@needs_curl
async def test_multipart_with_curl(storage: Storage, tmp_path: Path) -> None:
    part_size = 5 * MiB + 512 * 1024
    size = part_size + 100_000
    path, digest = _file(tmp_path, size)
    key = _key()
    m = await storage.start_multipart(key, size, part_size, 600, None, sha256=digest)
    data = path.read_bytes()
    etags = []
    for n, url in enumerate(m.part_urls):
        part = tmp_path / f"part{n}"
        part.write_bytes(data[n * part_size : (n + 1) * part_size])
        out = subprocess.run(
            [CURL or "curl", "-sS", "-f", "-o", "/dev/null", "-w", "%header{etag}", "-T", str(part), url],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        etags.append(out.stdout.strip())
    obj = await storage.complete_multipart(m, etags)
    assert (obj.size, obj.sha256) == (size, digest)


async def test_multipart_abort_and_bad_input(storage: Storage, s3_server: S3Server, tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 6 * MiB)
    m = await storage.start_multipart(_key(), 6 * MiB, 5 * MiB, 600, None)
    etags = put_multipart(path, m.part_urls, m.part_size)
    with pytest.raises(StorageError, match="2 parts"):
        await storage.complete_multipart(m, etags[:1])
    await storage.abort_multipart(m)
    await storage.abort_multipart(m)  # idempotent
    # (completing an aborted upload is NoSuchUpload on R2 but a retried 500 on moto: not tested here)
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", [])
    assert m.upload_id not in {u.get("UploadId") for u in uploads}
    with pytest.raises(StorageError, match="at least 5 MiB"):
        await storage.start_multipart(_key(), 10 * MiB, MiB, 600, None)
    with pytest.raises(StorageError, match="at most 10000"):
        await storage.start_multipart(_key(), 10_001 * 5 * MiB, 5 * MiB, 600, None)
    with pytest.raises(UploadError, match="needs 2 URLs"):
        put_multipart(path, m.part_urls[:1], m.part_size)


async def test_uploader_errors_hide_the_signature(s3_server: S3Server, tmp_path: Path) -> None:
    storage = Storage.from_settings(s3_server.settings(r2_bucket="no-such-bucket"))
    path, _ = _file(tmp_path, 1000)
    put = await storage.presign_put(_key(), expires_s=600)
    with pytest.raises(UploadError) as info:
        put_file(path, put.url, put.headers, attempts=1)
    assert "404" in str(info.value)
    assert "Signature" not in str(info.value) and "?" not in str(info.value)


# --- configuration and failures ------------------------------------------------------------------


async def test_missing_bucket_is_a_clear_error(s3_server: S3Server, tmp_path: Path) -> None:
    storage = Storage.from_settings(s3_server.settings(r2_bucket="no-such-bucket"))
    with pytest.raises(StorageError, match=r"'no-such-bucket'.*does not exist.*R2_BUCKET"):
        await storage.check()
    path, _ = _file(tmp_path, 1000)
    with pytest.raises(StorageError, match="does not exist"):
        await storage.upload_file(path, _key())
    with pytest.raises(StorageError, match="does not exist"):
        await storage.upload_bytes(b"x", _key())


async def test_ensure_bucket_creates_it(s3_server: S3Server) -> None:
    name = f"made-{uuid.uuid4().hex[:8]}"
    storage = Storage.from_settings(s3_server.settings(r2_bucket=name))
    await storage.ensure_bucket()
    await storage.ensure_bucket()  # already there: fine
    await storage.check()


async def test_wrong_keys_are_clear_and_leak_nothing(s3_auth_server: S3Server, tmp_path: Path) -> None:
    good = Storage.from_settings(s3_auth_server.settings())
    await good.check()  # the server really checks signatures, and accepts the right ones
    await good.upload_bytes(b"ok", _key())

    bad_id = "AKIAWRONGWRONGWRONG1"
    bad_secret = "wrong-secret-" + uuid.uuid4().hex
    cases = [
        (s3_auth_server.settings(r2_access_key_id=bad_id), "R2_ACCESS_KEY_ID"),
        (s3_auth_server.settings(r2_secret_access_key=bad_secret), "R2_SECRET_ACCESS_KEY"),
    ]
    path, _ = _file(tmp_path, 1000)
    for settings, hint in cases:
        storage = Storage.from_settings(settings)
        for call in (storage.check(), storage.upload_file(path, _key()), storage.upload_bytes(b"x", _key())):
            with pytest.raises(StorageError) as info:
                await call
            text = str(info.value) + repr(info.value)
            assert hint in text
            for secret in (bad_id, bad_secret, s3_auth_server.access_key_id, s3_auth_server.secret_access_key):
                assert secret not in text
            assert "Signature=" not in text and info.value.__cause__ is None


def test_from_settings_requires_configuration(s3_server: S3Server) -> None:
    from services.settings import load_settings

    with pytest.raises(StorageError, match=r"R2_BUCKET.*R2_ACCESS_KEY_ID.*R2_SECRET_ACCESS_KEY.*R2_ACCOUNT_ID"):
        Storage.from_settings(load_settings())
    settings = s3_server.settings(r2_endpoint_url=None, r2_account_id="abc123")
    assert Storage.from_settings(settings).endpoint_url == "https://abc123.r2.cloudflarestorage.com"


# --- key layout ----------------------------------------------------------------------------------


def test_job_key_layout() -> None:
    keys = job_keys("1234567890", "job-42", "ohwx woman")
    assert keys.prefix == "loras/1234567890/job-42/"
    assert keys.lora == "loras/1234567890/job-42/ohwx-woman.safetensors"
    assert keys.config.endswith("/config.yaml") and keys.log.endswith("/log.txt")
    assert keys.manifest.endswith("/manifest.json") and keys.job.endswith("/job.json")
    assert keys.sample("sample_000100_0.jpg") == "loras/1234567890/job-42/samples/sample_000100_0.jpg"
    assert keys.checkpoint("ohwx_000000500.safetensors") == (
        "loras/1234567890/job-42/checkpoints/ohwx_000000500.safetensors"
    )


@pytest.mark.parametrize(
    "raw",
    ["../../etc/passwd", "..", ".", "", "a/b\\c", "naïve ✨ name", "x" * 500, "-.-", "\x00\n"],
)
def test_key_parts_are_safe(raw: str) -> None:
    keys = job_keys(raw, raw, raw)
    for key in (keys.lora, keys.sample(raw), keys.checkpoint(raw + ".safetensors")):
        parts = key.split("/")
        assert all(p and p not in (".", "..") for p in parts)
        assert all(c.isascii() and (c.isalnum() or c in "._-/") for c in key)
        assert len(parts) == (5 if "/samples/" in key or "/checkpoints/" in key else 4)
    assert len(safe_key_part(raw)) <= 100
    assert safe_key_part("x" * 300 + ".safetensors", keep_ext=True).endswith(".safetensors")
