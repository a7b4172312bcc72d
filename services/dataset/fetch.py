"""URL intake: https only, streamed, size-capped, and never towards a private address.

Every connection (the first and after each redirect) goes through `_GuardedBackend`, which
resolves the host itself, refuses if ANY of its addresses is private, loopback, link-local,
metadata or otherwise non-public, and then connects to the checked address literally. TLS still
verifies the certificate against the URL's host name. Checking and connecting to the same address
closes the DNS-rebinding window that a check-then-let-the-client-resolve design would leave.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import certifi
import httpcore
import httpx

from services.dataset.errors import FetchError
from services.settings import Settings

MAX_REDIRECTS = 5
_WRITE_CHUNK = 1024 * 1024
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# cloud metadata endpoints, named so that the refusal says what it protected
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254", "192.0.0.192")
)


def address_refusal(ip: IPAddress, allow_loopback: bool = False) -> tuple[str, str] | None:
    """(code, reason) when `ip` must not be fetched from, None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_refusal(embedded, allow_loopback)
    if ip in _METADATA:
        return "url_metadata", f"{ip} is a cloud metadata address"
    if ip.is_loopback:
        return None if allow_loopback else ("url_loopback", f"{ip} is a loopback address")
    if ip.is_link_local:
        return "url_link_local", f"{ip} is a link-local address"
    if ip.is_private:
        return "url_private", f"{ip} is a private address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return "url_reserved", f"{ip} is not a public address"
    return None


async def resolve_public(host: str, port: int, allow_loopback: bool) -> list[str]:
    """All addresses of `host`, or FetchError if any of them is not public."""
    host = host.strip("[]")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addrs = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise FetchError("url_unresolvable", f"cannot resolve {host}: {exc}", host) from None
        # scope ids (fe80::1%eth0) are dropped before parsing
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addrs:
        raise FetchError("url_unresolvable", f"{host} has no address", host)
    for ip in addrs:
        refusal = address_refusal(ip, allow_loopback)
        if refusal:
            code, reason = refusal
            raise FetchError(code, f"refusing to fetch from {host}: {reason}", host)
    return list(dict.fromkeys(str(ip) for ip in addrs))


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, allow_loopback: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_loopback = allow_loopback

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        last: Exception | None = None
        for ip in await resolve_public(host, port, self._allow_loopback):
            try:
                return await self._inner.connect_tcp(ip, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise FetchError("url_forbidden", "unix sockets are not fetched from")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _transport(settings: Settings) -> httpx.AsyncHTTPTransport:
    ctx = ssl.create_default_context(cafile=certifi.where())
    if settings.dataset_url_ca_bundle:
        ctx.load_verify_locations(cafile=str(settings.dataset_url_ca_bundle))
    transport = httpx.AsyncHTTPTransport(verify=ctx, retries=0)
    # httpx offers no public hook for the network backend: swap its pool for a guarded one
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ctx, network_backend=_GuardedBackend(settings.allow_loopback_urls), max_connections=4
    )
    return transport


def _check_url(url: httpx.URL) -> None:
    if url.scheme != "https":
        raise FetchError("url_scheme", f"only https:// URLs are fetched, not {url.scheme or 'that'}://", str(url))
    if not url.host:
        raise FetchError("url_invalid", "the URL has no host", str(url))


async def fetch_url(url: str, dest: Path, settings: Settings, max_bytes: int) -> Path:
    """Download `url` to `dest`, streamed and capped at `max_bytes`; FetchError on any refusal."""
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchError("url_invalid", f"not a valid URL: {exc}", url) from None
    _check_url(current)
    # fail fast on a refused address, before any client is built (the backend checks again)
    await resolve_public(current.host, current.port or 443, settings.allow_loopback_urls)
    try:
        return await _download(current, url, dest, settings, max_bytes)
    except BaseException:
        await asyncio.to_thread(dest.unlink, True)  # never leave a partial download behind
        raise


async def _download(current: httpx.URL, url: str, dest: Path, settings: Settings, max_bytes: int) -> Path:
    timeout = httpx.Timeout(30.0, connect=10.0)
    limit_s = settings.dataset_url_timeout_s
    try:
        async with (
            asyncio.timeout(limit_s),
            httpx.AsyncClient(
                transport=_transport(settings),
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity", "User-Agent": "lorabot-dataset-intake"},
            ) as client,
        ):
            for _ in range(MAX_REDIRECTS + 1):
                async with client.stream("GET", current) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        current = current.join(resp.headers["location"])
                        _check_url(current)
                        continue
                    if resp.status_code != 200:
                        raise FetchError("url_status", f"the server answered HTTP {resp.status_code}", str(current))
                    length = resp.headers.get("content-length", "")
                    if length.isdigit() and int(length) > max_bytes:
                        raise FetchError("url_too_large", f"the file is {length} bytes, the limit is {max_bytes}", url)
                    await _save(resp, dest, max_bytes, url)
                    return dest
            raise FetchError("url_redirects", f"more than {MAX_REDIRECTS} redirects", url)
    except TimeoutError:
        raise FetchError("url_timeout", f"the download took longer than {limit_s:g} s", url) from None
    except httpx.HTTPError as exc:
        raise FetchError("url_failed", f"download failed: {exc.__class__.__name__}: {exc}", url) from None


async def _save(resp: httpx.Response, dest: Path, max_bytes: int, url: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    f: IO[bytes] = await asyncio.to_thread(dest.open, "wb")
    try:
        total = 0
        buf = bytearray()
        async for chunk in resp.aiter_raw():  # raw: no transparent gunzip, so no gzip bomb
            total += len(chunk)
            if total > max_bytes:
                raise FetchError("url_too_large", f"the download passed the limit of {max_bytes} bytes", url)
            buf += chunk
            if len(buf) >= _WRITE_CHUNK:
                await asyncio.to_thread(f.write, bytes(buf))
                buf.clear()
        if buf:
            await asyncio.to_thread(f.write, bytes(buf))
    finally:
        await asyncio.to_thread(f.close)
