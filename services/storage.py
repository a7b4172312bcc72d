"""Artifacts on Cloudflare R2 (any S3 API, in tests moto's server) through boto3.

What lives here:
- `Storage`: uploads from the bot's host (transfer-manager multipart above a threshold), each one
  verified with a HEAD (size, and the sha256 kept in the object's metadata under `sha256`);
  links (public base URL, else presigned GET clamped to [60 s, 7 days], the SigV4 limit);
  presigned PUT / multipart UploadPart URLs for the rented box, which never holds our keys.
- `job_keys()`: the key layout of one job.

How the pipeline moves artifacts (see services/remote/upload_presigned.py, stdlib only, for the box):
1. The box hashes the file (`sha256_file`) and reports size + sha256 over SSH.
2. The bot calls `presign_put(key, sha256=...)` (or `start_multipart(...)` for big files), hands the URL
   and headers to the box, the box uploads (`put_file` / `put_multipart`), the bot calls
   `verify(key, size, sha256)` (or `complete_multipart(m, etags)`, which verifies).
3. Fallback when the box cannot reach R2: download over SSH (verified), then `upload_from_local()`.
Checkpoint backups during training use the same presigned PUT, under `JobKeys.checkpoint(name)`.

Every boto3 call runs in a thread (`asyncio.to_thread`); the public methods are async.
Error messages never carry a secret: no keys, no presigned query strings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import mimetypes
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from services.settings import Settings

__all__ = [
    "MAX_LINK_EXPIRY_S",
    "MIN_LINK_EXPIRY_S",
    "SHA256_META",
    "JobKeys",
    "Link",
    "PresignedMultipart",
    "PresignedPut",
    "Storage",
    "StorageError",
    "StoredObject",
    "clamp_expiry",
    "job_keys",
    "safe_key_part",
    "sha256_file",
]

MiB = 1024 * 1024
MIN_LINK_EXPIRY_S = 60
MAX_LINK_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer
MIN_PART_SIZE = 5 * MiB  # S3 and R2: every part but the last
MAX_PARTS = 10_000
SHA256_META = "sha256"  # stored as x-amz-meta-sha256
_HASH_BLOCK = 4 * MiB
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")

# One boto3 session for every Storage: building a client from a fresh session re-reads the service
# models (~0.2-0.4 s each); sessions are not thread-safe, so client creation takes a lock.
_SESSION: boto3.session.Session | None = None
_SESSION_LOCK = threading.Lock()


def _new_client(**kwargs: Any) -> S3Client:
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client("s3", **kwargs)


class StorageError(Exception):
    """A storage operation failed. The message is one line, names the bucket/key, and holds no secret."""


# --- values --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str | None  # from the object's metadata; None when it was stored without one
    etag: str | None = None
    content_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    url: str
    expires_at: datetime | None  # None: a public URL that does not expire

    @property
    def is_public(self) -> bool:
        return self.expires_at is None

    def expiry_text(self, now: datetime | None = None) -> str:
        """'permanent link' or 'expires in 6 days 23 h (2026-12-05 17:44 UTC)', for every shown link."""
        if self.expires_at is None:
            return "permanent link"
        now = now or datetime.now(UTC)
        left = int((self.expires_at - now).total_seconds())
        when = self.expires_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        if left <= 0:
            return f"expired ({when})"
        return f"expires in {_human_duration(left)} ({when})"


@dataclass(frozen=True)
class PresignedPut:
    key: str
    url: str
    headers: dict[str, str]  # must be sent verbatim: they are part of the signature
    expires_at: datetime
    method: str = "PUT"


@dataclass(frozen=True)
class PresignedMultipart:
    key: str
    upload_id: str
    size: int
    part_size: int
    part_urls: list[str]  # part N+1 is bytes [N*part_size, min(size, (N+1)*part_size))
    expires_at: datetime
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, e.g. to hand to the supervisor on the box."""
        return {
            "key": self.key,
            "upload_id": self.upload_id,
            "size": self.size,
            "part_size": self.part_size,
            "part_urls": list(self.part_urls),
            "expires_at": self.expires_at.isoformat(),
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PresignedMultipart:
        return cls(
            key=str(data["key"]),
            upload_id=str(data["upload_id"]),
            size=int(data["size"]),
            part_size=int(data["part_size"]),
            part_urls=[str(u) for u in data["part_urls"]],
            expires_at=datetime.fromisoformat(str(data["expires_at"])),
            sha256=data.get("sha256"),
        )


@dataclass(frozen=True)
class JobKeys:
    """Where one job's artifacts live: loras/<user>/<job>/..."""

    prefix: str  # "loras/<user>/<job>/"
    lora: str  # <prefix><name>.safetensors
    config: str  # config.yaml (the ai-toolkit job config)
    log: str  # log.txt (the training log)
    manifest: str  # manifest.json (the dataset manifest)
    job: str  # job.json (the job's summary)
    samples_prefix: str  # samples/
    checkpoints_prefix: str  # checkpoints/ (intermediate backups during training)

    def sample(self, filename: str) -> str:
        return self.samples_prefix + safe_key_part(filename, keep_ext=True)

    def checkpoint(self, filename: str) -> str:
        return self.checkpoints_prefix + safe_key_part(filename, keep_ext=True)


def safe_key_part(value: str, *, keep_ext: bool = False, max_len: int = 100) -> str:
    """One path segment of safe key characters [A-Za-z0-9._-]: no '/', no '..', never empty."""
    name = Path(value.replace("\\", "/")).name if keep_ext else value
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    name = re.sub(r"-{2,}", "-", name).strip("-.")  # no hidden names, no '.' or '..'
    if len(name) > max_len:
        stem, dot, ext = name.rpartition(".")
        if keep_ext and dot and 0 < len(ext) <= 16:
            name = stem[: max_len - len(ext) - 1].rstrip("-.") + "." + ext
        else:
            name = name[:max_len].rstrip("-.")
    return name or "_"


def job_keys(user_id: str, job_id: str, lora_name: str) -> JobKeys:
    prefix = f"loras/{safe_key_part(str(user_id))}/{safe_key_part(str(job_id))}/"
    return JobKeys(
        prefix=prefix,
        lora=f"{prefix}{safe_key_part(lora_name)}.safetensors",
        config=f"{prefix}config.yaml",
        log=f"{prefix}log.txt",
        manifest=f"{prefix}manifest.json",
        job=f"{prefix}job.json",
        samples_prefix=f"{prefix}samples/",
        checkpoints_prefix=f"{prefix}checkpoints/",
    )


def clamp_expiry(expires_s: int | float | None, default_s: int = MAX_LINK_EXPIRY_S) -> int:
    """Expiry of a presigned URL, forced into [60 s, 7 days]."""
    value = default_s if expires_s is None else int(expires_s)
    return max(MIN_LINK_EXPIRY_S, min(MAX_LINK_EXPIRY_S, value))


def sha256_file(path: Path, block: int = _HASH_BLOCK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)  # hashlib drops the GIL for large buffers
    return digest.hexdigest()


def _human_duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} day{'s' if days != 1 else ''}" + (f" {hours} h" if hours else "")
    if hours:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    return f"{max(minutes, 1)} min"


# --- errors --------------------------------------------------------------------------------------

_SIG_RE = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"'<]+", re.IGNORECASE)


def _error_code(exc: BaseException) -> tuple[str, int | None]:
    """The S3 error code and HTTP status of a boto3 failure (transfer errors wrap a ClientError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            err = seen.response.get("Error", {})
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(err.get("Code", "")), status
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"\(([A-Za-z0-9]+)\)", str(exc))  # S3UploadFailedError keeps only the text
    return (match.group(1) if match else ""), None


# --- the service ---------------------------------------------------------------------------------


class Storage:
    def __init__(
        self,
        *,
        endpoint_url: str,
        access_key_id: str,
        secret_access_key: str,
        bucket: str,
        public_base_url: str | None = None,
        default_link_expiry_s: int = MAX_LINK_EXPIRY_S,
        multipart_threshold: int = 1024 * MiB,
        part_size: int = 64 * MiB,
        max_concurrency: int = 8,
        region: str = "auto",
    ) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.default_link_expiry_s = clamp_expiry(default_link_expiry_s)
        self.part_size = max(MIN_PART_SIZE, part_size)
        self._secrets = [s for s in (access_key_id, secret_access_key) if s]
        self._transfer = TransferConfig(
            multipart_threshold=max(MIN_PART_SIZE, multipart_threshold),
            multipart_chunksize=self.part_size,
            max_concurrency=max(1, max_concurrency),
            use_threads=max_concurrency > 1,
        )
        config = Config(
            signature_version="s3v4",
            # UNSIGNED-PAYLOAD: without it botocore hashes every body before sending (always over
            # http, and over https too once the CRC checksums below are off): a full extra pass per
            # upload. Integrity in flight is TLS's job; content is checked by size + our sha256.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            # R2 rejects/ignores the CRC trailers boto3 >= 1.36 adds by default (aws-chunked bodies)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=max(10, 2 * max_concurrency),
            connect_timeout=15,
            read_timeout=120,
        )
        self._client: S3Client = _new_client(
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
            config=config,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        missing = [
            env
            for env, value in (
                ("R2_BUCKET", settings.r2_bucket),
                ("R2_ACCESS_KEY_ID", settings.r2_access_key_id),
                ("R2_SECRET_ACCESS_KEY", settings.r2_secret_access_key),
            )
            if not value
        ]
        if not settings.r2_endpoint_url and not settings.r2_account_id:
            missing.append("R2_ACCOUNT_ID (or R2_ENDPOINT_URL)")
        if missing:
            raise StorageError(f"storage is not configured: {', '.join(missing)} not set")
        assert settings.r2_access_key_id is not None and settings.r2_secret_access_key is not None
        assert settings.r2_bucket is not None
        endpoint = settings.r2_endpoint_url or f"https://{settings.r2_account_id}.r2.cloudflarestorage.com"
        return cls(
            endpoint_url=endpoint,
            access_key_id=settings.r2_access_key_id.get_secret_value(),
            secret_access_key=settings.r2_secret_access_key.get_secret_value(),
            bucket=settings.r2_bucket,
            public_base_url=settings.r2_public_base_url,
            default_link_expiry_s=settings.link_expiry_s,
            multipart_threshold=settings.r2_multipart_threshold_mb * MiB,
            part_size=settings.r2_part_size_mb * MiB,
            max_concurrency=settings.r2_max_concurrency,
        )

    # --- plumbing ----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        text = _SIG_RE.sub(r"\1[redacted]", text)
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _fail(self, exc: BaseException, what: str) -> StorageError:
        """Turn a boto3 failure into one clear line; the original is kept only as a redacted hint."""
        code, status = _error_code(exc)
        where = f"bucket {self.bucket!r} at {urlsplit(self.endpoint_url).netloc}"
        if code in ("NoSuchBucket",):
            msg = f"{what}: {where} does not exist (check R2_BUCKET)"
        elif code in ("InvalidAccessKeyId", "InvalidToken"):
            msg = f"{what}: {where} rejected the access key id (check R2_ACCESS_KEY_ID)"
        elif code == "SignatureDoesNotMatch":
            msg = f"{what}: {where} rejected the request signature (check R2_SECRET_ACCESS_KEY)"
        elif code in ("AccessDenied", "403") or status == 403:
            msg = f"{what}: access denied by {where} (check the token's permissions on the bucket)"
        elif code in ("NoSuchKey", "404", "NotFound"):
            msg = f"{what}: no such object in {where}"
        elif code == "NoSuchUpload":
            msg = f"{what}: the multipart upload no longer exists in {where}"
        elif isinstance(exc, EndpointConnectionError):
            msg = f"{what}: cannot reach the storage endpoint {urlsplit(self.endpoint_url).netloc}"
        elif isinstance(exc, OSError):
            msg = f"{what}: {exc.strerror or type(exc).__name__}"
        else:
            detail = f"{code} (HTTP {status})" if code else type(exc).__name__
            msg = f"{what}: {detail} from {where}"
        return StorageError(self._redact(msg))

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except StorageError:
            raise
        except (ClientError, BotoCoreError, S3UploadFailedError, OSError) as exc:
            raise self._fail(exc, what) from None  # `from None`: the chain could quote a signed URL

    def _expires_at(self, seconds: int) -> datetime:
        return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)

    @staticmethod
    def _clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in (metadata or {}).items():
            key = re.sub(r"[^a-z0-9-]+", "-", str(k).lower()).strip("-")
            value = str(v)
            if not key or not value.isascii() or any(c in value for c in "\r\n"):
                raise StorageError(f"metadata {k!r}: keys and values must be single-line ASCII")
            out[key] = value
        return out

    def _head_sync(self, key: str) -> StoredObject | None:
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code, status = _error_code(exc)
            if status == 404 and code != "NoSuchBucket":
                return None
            raise
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        return StoredObject(
            key=key,
            size=int(resp.get("ContentLength", 0)),
            sha256=meta.get(SHA256_META),
            etag=(resp.get("ETag") or "").strip('"') or None,
            content_type=resp.get("ContentType"),
            metadata=meta,
        )

    def _verify_sync(self, key: str, size: int, sha256: str) -> StoredObject:
        obj = self._head_sync(key)
        if obj is None:
            raise StorageError(f"verify {key}: the object is missing from bucket {self.bucket!r}")
        if obj.size != size:
            raise StorageError(f"verify {key}: stored size {obj.size} B, expected {size} B")
        if obj.sha256 is None:
            raise StorageError(f"verify {key}: the object carries no sha256 metadata")
        if obj.sha256.lower() != sha256.lower():
            raise StorageError(
                f"verify {key}: stored sha256 {obj.sha256[:12]}…, expected {sha256[:12]}…"
            )
        return obj

    # --- checks ------------------------------------------------------------------------------

    async def check(self) -> None:
        """Prove the bucket exists and the keys work; the error says which is wrong."""
        await self._run(
            "storage check", lambda: self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        )

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing (tests, the demo; production buckets are made by hand)."""

        def _ensure() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _error_code(exc)[1] != 404:
                    raise
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _error_code(exc)[0] != "IllegalLocationConstraintException":
                    raise
                # plain S3 servers want the region spelt out when it is not us-east-1
                self._client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": self._client.meta.region_name},  # type: ignore[typeddict-item]
                )

        await self._run("create bucket", _ensure)

    # --- uploads from this host --------------------------------------------------------------

    async def upload_file(
        self,
        path: Path,
        key: str,
        *,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        sha256: str | None = None,
    ) -> StoredObject:
        """Upload a local file (multipart above the threshold) and verify it with a HEAD.

        The sha256 goes into the object's metadata, which S3 fixes at CreateMultipartUpload, so it
        must be known before the first byte is sent: pass `sha256` when you have it (e.g. verified
        after an SSH download) and it is recomputed from the file *while* the upload runs and
        compared; without it, the file is hashed in a first streaming pass.
        """
        path = Path(path)
        meta = self._clean_metadata(metadata)
        if sha256 is not None and not _SHA256_RE.match(sha256.lower()):
            raise StorageError(f"upload {key}: sha256 must be 64 hex characters")

        def _upload() -> StoredObject:
            size = path.stat().st_size
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                # expected digest known: hash concurrently with the upload (both read the page cache)
                recheck = pool.submit(sha256_file, path) if sha256 else None
                digest = sha256.lower() if sha256 else sha256_file(path)
                extra: dict[str, Any] = {
                    "Metadata": {**meta, SHA256_META: digest},
                    "ContentType": content_type or _guess_type(key),
                }
                self._client.upload_file(
                    str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer
                )
                if recheck is not None and recheck.result() != digest:
                    self._client.delete_object(Bucket=self.bucket, Key=key)
                    raise StorageError(f"upload {key}: {path.name} does not match the expected sha256")
            if path.stat().st_size != size:
                raise StorageError(f"upload {key}: {path.name} changed size during the upload")
            return self._verify_sync(key, size, digest)

        return await self._run(f"upload {key}", _upload)

    async def upload_from_local(
        self,
        path: Path,
        key: str,
        *,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        sha256: str | None = None,
    ) -> StoredObject:
        """The fallback path: the pipeline downloads an artifact over SSH (verified), then calls this.

        Same as `upload_file`; a separate name so the pipeline reads as the design does.
        """
        return await self.upload_file(path, key, content_type=content_type, metadata=metadata, sha256=sha256)

    async def upload_bytes(
        self,
        data: bytes,
        key: str,
        *,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> StoredObject:
        """Small artifacts (job.json, config.yaml, log.txt): one PUT, verified."""
        meta = self._clean_metadata(metadata)
        digest = hashlib.sha256(data).hexdigest()

        def _put() -> StoredObject:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                Metadata={**meta, SHA256_META: digest},
                ContentType=content_type or _guess_type(key),
            )
            return self._verify_sync(key, len(data), digest)

        return await self._run(f"upload {key}", _put)

    async def head(self, key: str) -> StoredObject | None:
        return await self._run(f"head {key}", self._head_sync, key)

    async def verify(self, key: str, size: int, sha256: str) -> None:
        """Raise StorageError unless `key` exists with this size and this sha256 in its metadata."""
        await self._run(f"verify {key}", self._verify_sync, key, size, sha256)

    async def delete(self, key: str) -> None:
        await self._run(f"delete {key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    async def read_bytes(self, key: str) -> bytes:
        """Small objects only (manifests, job.json)."""

        def _get() -> bytes:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        return await self._run(f"read {key}", _get)

    # --- links -------------------------------------------------------------------------------

    async def link(self, key: str, expires_s: int | None = None) -> Link:
        """The public URL when R2_PUBLIC_BASE_URL is set, else a presigned GET in [60 s, 7 days]."""
        if self.public_base_url:
            return Link(url=f"{self.public_base_url}/{quote(key, safe='/')}", expires_at=None)
        seconds = clamp_expiry(expires_s, self.default_link_expiry_s)
        url = await self._run(
            f"link {key}",
            self._client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=seconds,
        )
        return Link(url=url, expires_at=self._expires_at(seconds))

    # --- uploads from the rented box (no keys there) -------------------------------------------

    async def presign_put(
        self,
        key: str,
        *,
        expires_s: int,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        sha256: str | None = None,
    ) -> PresignedPut:
        """A URL the box can PUT one file to; `headers` are signed and must be sent as given.

        Pass the file's `sha256` (computed on the box) so that `verify()` can check it afterwards.
        """
        meta = self._clean_metadata(metadata)
        if sha256:
            meta[SHA256_META] = sha256.lower()
        ctype = content_type or _guess_type(key)
        seconds = clamp_expiry(expires_s)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "ContentType": ctype}
        if meta:
            params["Metadata"] = meta
        url = await self._run(
            f"presign {key}", self._client.generate_presigned_url, "put_object", Params=params, ExpiresIn=seconds
        )
        headers = {"Content-Type": ctype, **{f"x-amz-meta-{k}": v for k, v in meta.items()}}
        signed = set(parse_qs(urlsplit(url).query).get("X-Amz-SignedHeaders", [""])[0].split(";"))
        missing = {h for h in signed if h and h != "host"} - {h.lower() for h in headers}
        if missing:  # would be a botocore change; better to fail here than on the box
            raise StorageError(f"presign {key}: unexpected signed headers {sorted(missing)}")
        return PresignedPut(key=key, url=url, headers=headers, expires_at=self._expires_at(seconds))

    async def start_multipart(
        self,
        key: str,
        size: int,
        part_size: int | None = None,
        expires_s: int = 24 * 3600,
        metadata: dict[str, Any] | None = None,
        *,
        content_type: str | None = None,
        sha256: str | None = None,
    ) -> PresignedMultipart:
        """Create a multipart upload and presign one UploadPart URL per part, for the box."""
        part_size = part_size or self.part_size
        if size <= 0:
            raise StorageError(f"multipart {key}: size must be positive")
        parts = -(-size // part_size)
        if parts > 1 and part_size < MIN_PART_SIZE:
            raise StorageError(f"multipart {key}: parts must be at least {MIN_PART_SIZE // MiB} MiB")
        if parts > MAX_PARTS:
            raise StorageError(f"multipart {key}: {parts} parts, at most {MAX_PARTS}; raise part_size")
        meta = self._clean_metadata(metadata)
        if sha256:
            meta[SHA256_META] = sha256.lower()
        seconds = clamp_expiry(expires_s)

        def _start() -> tuple[str, list[str]]:
            created = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=meta, ContentType=content_type or _guess_type(key)
            )
            upload_id = created["UploadId"]
            urls = [
                self._client.generate_presigned_url(
                    "upload_part",
                    Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": n},
                    ExpiresIn=seconds,
                )
                for n in range(1, parts + 1)
            ]
            return upload_id, urls

        upload_id, urls = await self._run(f"multipart {key}", _start)
        return PresignedMultipart(
            key=key,
            upload_id=upload_id,
            size=size,
            part_size=part_size,
            part_urls=urls,
            expires_at=self._expires_at(seconds),
            sha256=meta.get(SHA256_META),
        )

    async def complete_multipart(self, m: PresignedMultipart, etags: list[str]) -> StoredObject:
        """Finish an upload the box did; verify size (and the sha256 given at start, if any)."""
        if len(etags) != len(m.part_urls):
            raise StorageError(f"multipart {m.key}: {len(etags)} ETags for {len(m.part_urls)} parts")

        def _complete() -> StoredObject:
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=m.key,
                UploadId=m.upload_id,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": n, "ETag": '"' + tag.strip().strip('"') + '"'}
                        for n, tag in enumerate(etags, start=1)
                    ]
                },
            )
            if m.sha256:
                return self._verify_sync(m.key, m.size, m.sha256)
            obj = self._head_sync(m.key)
            if obj is None or obj.size != m.size:
                got = "missing" if obj is None else f"{obj.size} B"
                raise StorageError(f"verify {m.key}: stored object is {got}, expected {m.size} B")
            return obj

        return await self._run(f"complete multipart {m.key}", _complete)

    async def abort_multipart(self, m: PresignedMultipart) -> None:
        """Drop the parts of an unfinished upload (they are billed until then). Idempotent."""

        def _abort() -> None:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=m.key, UploadId=m.upload_id)
            except ClientError as exc:
                if _error_code(exc)[0] != "NoSuchUpload":
                    raise

        await self._run(f"abort multipart {m.key}", _abort)

    # --- for `lorabot doctor` (issue 17) ---------------------------------------------------------

    async def presigned_get(self, key: str, expires_s: int = 300) -> str:
        """A presigned GET URL even when R2_PUBLIC_BASE_URL is set (link() prefers the public URL)."""
        return await self._run(f"presign {key}", self._client.generate_presigned_url, "get_object",
                               Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=clamp_expiry(expires_s))

    async def visible_buckets(self) -> list[str] | None:
        """The buckets these keys can list; None when listing is denied (a bucket-scoped token)."""

        def _list() -> list[str] | None:
            try:
                return [b["Name"] for b in self._client.list_buckets().get("Buckets", [])]
            except ClientError as exc:
                code, status = _error_code(exc)
                if code == "AccessDenied" or status in (401, 403):
                    return None
                raise

        return await self._run("list buckets", _list)


def _guess_type(key: str) -> str:
    if key.endswith(".safetensors"):
        return "application/octet-stream"
    if key.endswith((".yaml", ".yml")):
        return "text/yaml"
    return mimetypes.guess_type(key)[0] or "application/octet-stream"
