"""Upload throughput: Storage.upload_file against one `curl -T` to a presigned PUT URL.

Both go to the same moto S3 server (tests/sim/s3.py) in the same run, alternating, so the ratio
compares the service's overhead (sha256 pass, multipart, HEAD verify) with the plainest upload there
is. Goal: median(service) / median(curl) <= 1.15.

    python benchmarks/upload.py                     # 500 MB, default settings
    python benchmarks/upload.py --size-mb 50        # smaller and quicker
    python benchmarks/upload.py --sweep             # try several part sizes / thread counts
    python benchmarks/upload.py --part-size-mb 128 --concurrency 4 --threshold-mb 64

Note: moto is a Python server: it buffers every part and concatenates them on
CompleteMultipartUpload (about 1 s per 100 MB measured on a 2-core box), so multipart costs far
more here than on R2. With the default settings a 500 MB file is one streamed PUT (threshold 1 GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.storage import MiB, Storage  # noqa: E402
from tests.sim.s3 import S3Server, run_s3_server  # noqa: E402

GOAL = 1.15


@dataclass(frozen=True)
class Tuning:
    threshold_mb: int
    part_size_mb: int
    concurrency: int

    def label(self) -> str:
        return f"threshold {self.threshold_mb} MiB, parts {self.part_size_mb} MiB, {self.concurrency} threads"


def make_file(path: Path, size: int) -> None:
    block = os.urandom(8 * MiB)  # incompressible; repeating a block keeps creation fast
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= len(block)


def storage_for(server: S3Server, tuning: Tuning) -> Storage:
    return Storage.from_settings(
        server.settings(
            r2_multipart_threshold_mb=tuning.threshold_mb,
            r2_part_size_mb=tuning.part_size_mb,
            r2_max_concurrency=tuning.concurrency,
        )
    )


def time_curl(curl: str, url: str, path: Path) -> float:
    start = time.perf_counter()
    subprocess.run([curl, "-sS", "-f", "-o", os.devnull, "-T", str(path), url], check=True, timeout=600)
    return time.perf_counter() - start


async def time_service(storage: Storage, path: Path, key: str) -> float:
    start = time.perf_counter()
    await storage.upload_file(path, key)  # hash pass + transfer + HEAD verify: everything it does
    return time.perf_counter() - start


async def run(server: S3Server, path: Path, tunings: list[Tuning], repeat: int, curl: str) -> list[float]:
    size = path.stat().st_size
    print(f"file: {size / 1e6:.0f} MB, server: moto at {server.endpoint_url}, {repeat} rounds each")
    plain = server.client()
    ratios = []
    for tuning in tunings:
        storage = storage_for(server, tuning)
        svc_times: list[float] = []
        curl_times: list[float] = []  # paired with this tuning's rounds: the shared box drifts
        for n in range(repeat):
            # a bare presigned PUT (no signed headers): exactly what `curl -T FILE URL` needs
            url = plain.generate_presigned_url(
                "put_object", Params={"Bucket": server.bucket, "Key": f"bench/curl-{n}"}, ExpiresIn=3600
            )
            curl_times.append(time_curl(curl, url, path))
            plain.delete_object(Bucket=server.bucket, Key=f"bench/curl-{n}")  # keep moto's memory flat
            svc_times.append(await time_service(storage, path, f"bench/svc-{n}"))
            plain.delete_object(Bucket=server.bucket, Key=f"bench/svc-{n}")
        c, s = statistics.median(curl_times), statistics.median(svc_times)
        ratio = s / c
        ratios.append(ratio)
        print(
            f"{tuning.label():55s} service {s:6.2f} s ({size / s / 1e6:5.0f} MB/s)"
            f"  curl -T {c:6.2f} s ({size / c / 1e6:5.0f} MB/s)  ratio {ratio:.2f}"
            f"  {'ok' if ratio <= GOAL else 'over ' + str(GOAL)}"
            f"   [service {', '.join(f'{t:.2f}' for t in svc_times)};"
            f" curl {', '.join(f'{t:.2f}' for t in curl_times)}]"
        )
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="file size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threshold-mb", type=int, default=None)
    parser.add_argument("--part-size-mb", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="try several tunings")
    args = parser.parse_args()
    curl = shutil.which("curl")
    if curl is None:
        print("curl is not installed", file=sys.stderr)
        return 2

    from services.settings import Settings

    defaults = Settings.model_fields
    base = Tuning(
        threshold_mb=args.threshold_mb or int(defaults["r2_multipart_threshold_mb"].default),
        part_size_mb=args.part_size_mb or int(defaults["r2_part_size_mb"].default),
        concurrency=args.concurrency or int(defaults["r2_max_concurrency"].default),
    )
    tunings = [base]
    if args.sweep:
        tunings += [  # forced multipart (threshold 5 MiB) with a few part sizes / thread counts
            Tuning(5, 16, 8),
            Tuning(5, 64, 8),
            Tuning(5, 128, 4),
        ]
    with tempfile.TemporaryDirectory(prefix="lorabot-bench-") as tmp, run_s3_server() as server:
        path = Path(tmp) / "lora.safetensors"
        make_file(path, args.size_mb * 1_000_000)
        ratios = asyncio.run(run(server, path, tunings, args.repeat, curl))
    best = min(ratios)
    print(f"ratio (first tuning) {ratios[0]:.2f}, best {best:.2f}, goal <= {GOAL}")
    return 0 if ratios[0] <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
