#!/usr/bin/env python3
"""Upload a file to presigned S3/R2 URLs with the standard library only (runs on the rented box).

The box holds no storage keys: the bot presigns, this script sends the bytes. It streams from disk
(never reads a whole file into memory), retries each request a few times, and returns what the bot
needs to verify: ETags (multipart) and the sha256 (`sha256_file`, computed before the upload because
the bot signs it into the object's metadata).

Python API:
    sha256_file(path) -> str
    put_file(path, url, headers) -> str                      # ETag
    put_multipart(path, part_urls, part_size) -> list[str]   # ETags, in part order

Command line (one JSON document on stdout):
    python3 upload_presigned.py sha256 FILE
    python3 upload_presigned.py put FILE URL [-H 'Name: value']...   # URL "-": read from stdin
    python3 upload_presigned.py multipart FILE SPEC.json     # SPEC: {"part_size": N, "part_urls": [...]}
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import BinaryIO
from urllib.parse import urlsplit

__all__ = ["UploadError", "put_file", "put_multipart", "sha256_file"]

_BLOCK = 1024 * 1024  # socket write size: http.client's default 8 KiB costs a syscall per 8 KiB
_RETRYABLE = {408, 429, 500, 502, 503, 504}


class UploadError(Exception):
    """An upload failed. The message never contains the URL's query string (it holds a signature)."""


class _Slice:
    """A read-only window [offset, offset+length) of a file, so a part streams straight from disk."""

    def __init__(self, fh: BinaryIO, offset: int, length: int) -> None:
        self._fh = fh
        self._left = length
        fh.seek(offset)

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._fh.read(n)
        self._left -= len(data)
        return data


def sha256_file(path: str | os.PathLike[str], block: int = 4 * _BLOCK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"  # never the query: it carries the signature


def _put(
    path: str | os.PathLike[str],
    url: str,
    headers: Mapping[str, str],
    offset: int,
    length: int,
    timeout: float,
    attempts: int,
) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UploadError(f"unsupported URL scheme for {_where(url)}")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    last = ""
    for attempt in range(1, attempts + 1):
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.netloc, timeout=timeout, blocksize=_BLOCK)
        try:
            with open(path, "rb") as fh:
                body = _Slice(fh, offset, length)
                send = {k: v for k, v in headers.items() if k.lower() != "content-length"}
                send["Content-Length"] = str(length)
                conn.request("PUT", target, body=body, headers=send)
                resp = conn.getresponse()
                text = resp.read(2048).decode("utf-8", "replace")
            if 200 <= resp.status < 300:
                return (resp.getheader("ETag") or "").strip('"')
            code = text.split("<Code>")[1].split("</Code>")[0] if "<Code>" in text else ""
            last = f"HTTP {resp.status}{' ' + code if code else ''}"
            if resp.status not in _RETRYABLE:
                break
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if attempt < attempts:
            time.sleep(min(2 ** (attempt - 1), 10))
    raise UploadError(f"PUT {_where(url)} failed: {last}")


def put_file(
    path: str | os.PathLike[str],
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 300.0,
    attempts: int = 4,
) -> str:
    """PUT the whole file to a presigned URL with the signed `headers`; returns the ETag."""
    size = os.path.getsize(path)
    return _put(path, url, headers or {}, 0, size, timeout, attempts)


def put_multipart(
    path: str | os.PathLike[str],
    part_urls: list[str],
    part_size: int,
    *,
    workers: int = 4,
    timeout: float = 300.0,
    attempts: int = 4,
) -> list[str]:
    """PUT each part (part N+1 = bytes [N*part_size, ...)) to its presigned URL; ETags in order."""
    size = os.path.getsize(path)
    needed = max(1, -(-size // part_size))
    if needed != len(part_urls):
        raise UploadError(f"{size} B in {part_size} B parts needs {needed} URLs, got {len(part_urls)}")

    def one(n: int) -> str:
        offset = n * part_size
        return _put(path, part_urls[n], {}, offset, min(part_size, size - offset), timeout, attempts)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, range(len(part_urls))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_sha = sub.add_parser("sha256")
    p_sha.add_argument("file")
    p_put = sub.add_parser("put")
    p_put.add_argument("file")
    p_put.add_argument("url")
    p_put.add_argument("-H", "--header", action="append", default=[])
    p_mp = sub.add_parser("multipart")
    p_mp.add_argument("file")
    p_mp.add_argument("spec", help="JSON file with part_size and part_urls")
    p_mp.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "sha256":
            out: dict[str, object] = {"sha256": sha256_file(args.file), "size": os.path.getsize(args.file)}
        elif args.cmd == "put":
            headers = dict(h.split(":", 1) for h in args.header)
            # "-": the presigned URL comes on stdin, so it never shows in argv (ps, SSH command logs)
            url = sys.stdin.readline().strip() if args.url == "-" else args.url
            etag = put_file(args.file, url, {k.strip(): v.strip() for k, v in headers.items()})
            out = {"etag": etag, "size": os.path.getsize(args.file)}
        else:
            with open(args.spec, encoding="utf-8") as fh:
                spec = json.load(fh)
            etags = put_multipart(args.file, spec["part_urls"], int(spec["part_size"]), workers=args.workers)
            out = {"etags": etags, "size": os.path.getsize(args.file)}
    except (UploadError, OSError, ValueError, KeyError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
