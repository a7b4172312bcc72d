"""Checks of Cloudflare R2: the bucket, a put/head/get/delete round trip, links that work from outside,
and a token scoped to the bucket. Every object written is a few bytes under doctor/ and is deleted."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from services.doctor.core import CheckResult, Doctor, check, failed, passed, warned
from services.storage import Storage, StorageError

R2_HOWTO = (
    "in Cloudflare: R2 > Manage API tokens > Create API token, permission Object Read & Write, "
    "applied to R2_BUCKET only; put its Access Key ID and Secret Access Key in .env")


def _storage(doc: Doctor) -> Storage:
    if "storage" not in doc.facts:
        doc.facts["storage"] = Storage.from_settings(doc.settings)
    store: Storage = doc.facts["storage"]
    return store


def _fix_for(exc: StorageError) -> str:
    text = str(exc)
    if "does not exist" in text:
        return "create the bucket (Cloudflare: R2 > Create bucket) or correct R2_BUCKET"
    if "R2_ACCESS_KEY_ID" in text or "R2_SECRET_ACCESS_KEY" in text or "access denied" in text:
        return R2_HOWTO
    if "cannot reach" in text:
        return "check R2_ACCOUNT_ID (or R2_ENDPOINT_URL) and this machine's network"
    return R2_HOWTO


@asynccontextmanager
async def _probe_object(doc: Doctor) -> AsyncIterator[tuple[str, bytes]]:
    """A small object that exists for the duration of the block."""
    store = _storage(doc)
    key, data = f"doctor/{secrets.token_hex(8)}.txt", f"lorabot doctor {secrets.token_hex(8)}\n".encode()
    await store.upload_bytes(data, key, content_type="text/plain")
    try:
        yield key, data
    finally:
        await store.delete(key)


async def _fetch(url: str) -> httpx.Response:
    """GET as a stranger would: no credentials, no cookies."""
    async with httpx.AsyncClient(timeout=20, follow_redirects=True) as http:
        return await http.get(url)


@check("r2.bucket")
async def bucket(doc: Doctor) -> CheckResult:
    try:
        store = _storage(doc)
    except StorageError as exc:  # R2_* not set: the `settings` check says which
        return CheckResult(False, f"not checked: {exc}", "fix `settings` first", skipped=True)
    try:
        await store.check()
    except StorageError as exc:
        return failed(str(exc), _fix_for(exc))
    return passed(f"bucket {store.bucket!r} at {store.endpoint_url} answers")


@check("r2.roundtrip", needs=("r2.bucket",))
async def roundtrip(doc: Doctor) -> CheckResult:
    store = _storage(doc)
    try:
        async with _probe_object(doc) as (key, data):
            head = await store.head(key)
            got = await store.read_bytes(key)
            if head is None or head.size != len(data) or got != data:
                return failed(f"{key} did not read back as written", "check that R2_ENDPOINT_URL is an S3 API")
        if await store.head(key) is not None:
            return failed(f"{key} is still there after delete", R2_HOWTO)
    except StorageError as exc:
        return failed(str(exc), _fix_for(exc))
    return passed("put, head, get and delete of a small object work")


@check("r2.presigned", needs=("r2.roundtrip",))
async def presigned(doc: Doctor) -> CheckResult:
    store = _storage(doc)
    try:
        async with _probe_object(doc) as (key, data):
            url = await store.presigned_get(key)
            r = await _fetch(url)
    except (StorageError, httpx.HTTPError) as exc:
        return failed(f"a presigned link could not be fetched: {exc}", "check R2_ENDPOINT_URL / R2_ACCOUNT_ID")
    if r.status_code != 200 or r.content != data:
        return failed(f"a presigned GET answered HTTP {r.status_code} without the object",
                      "check the bucket's CORS/WAF rules and that R2_ENDPOINT_URL is the account's S3 endpoint")
    return passed("a presigned GET link works without credentials (the download links people get)")


@check("r2.public", needs=("r2.roundtrip",))
async def public_url(doc: Doctor) -> CheckResult:
    base = doc.settings.r2_public_base_url
    if not base:
        return passed("R2_PUBLIC_BASE_URL not set: links are presigned and expire (LORABOT_LINK_EXPIRY_S)")
    store = _storage(doc)
    try:
        async with _probe_object(doc) as (key, data):
            link = await store.link(key)
            r = await _fetch(link.url)
    except (StorageError, httpx.HTTPError) as exc:
        return failed(f"{base} could not be fetched: {exc}", "check R2_PUBLIC_BASE_URL (the bucket's public domain)")
    if r.status_code != 200 or r.content != data:
        return failed(f"{link.url} answered HTTP {r.status_code} without the object",
                      "in Cloudflare: R2 > the bucket > Settings > Public access: connect the domain of "
                      "R2_PUBLIC_BASE_URL (or unset it to use presigned links)")
    return passed(f"{base} serves the bucket's objects")


@check("r2.scope", needs=("r2.bucket",))
async def token_scope(doc: Doctor) -> CheckResult:
    store = _storage(doc)
    try:
        names = await store.visible_buckets()
    except StorageError as exc:
        return passed(f"the token cannot list buckets ({exc})")
    if names is None:
        return passed("the token cannot list buckets (scoped)")
    others = sorted(n for n in names if n != store.bucket)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return warned(f"the token also reaches other buckets: {shown}", R2_HOWTO)
    return passed("the token sees no bucket but R2_BUCKET")
