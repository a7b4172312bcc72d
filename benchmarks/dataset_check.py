"""Benchmark: `prepare` (the full dataset check) against plain Pillow decoding of the same images.

Generates a dataset of random-noise JPEGs and PNGs (noise does not compress, so ~1 GB on disk is
~1 GB of real image data), each with a caption, then in the same process:
  1. decodes every image with Pillow, one after the other (the baseline),
  2. runs `prepare` on the folder, and 3. on a zip of it (extraction included).
Prints the times, the ratio check/decode (goal < 2.0) and the peak RSS of each phase.

    python benchmarks/dataset_check.py                      # 500 images, ~1 GB
    python benchmarks/dataset_check.py --images 60 --size-mb 100
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

from services.dataset import prepare
from services.settings import load_settings


def generate(folder: Path, images: int, total_bytes: int) -> int:
    """Noise images alternating JPEG (q95) and PNG, sized so that the total is ~total_bytes."""
    per_image = total_bytes / images
    written = 0
    for i in range(images):
        fmt = "PNG" if i % 2 else "JPEG"
        # bytes per pixel on noise: PNG ~3.0 (incompressible RGB), JPEG q95 ~1.6
        side = max(64, int(math.sqrt(per_image / (3.0 if fmt == "PNG" else 1.6))))
        w, h = side + (i % 7) * 8, side  # a few aspect ratios
        im = Image.frombytes("RGB", (w, h), os.urandom(w * h * 3))
        buf = io.BytesIO()
        if fmt == "PNG":
            im.save(buf, "PNG", compress_level=1)
        else:
            im.save(buf, "JPEG", quality=95)
        path = folder / f"img{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        path.write_bytes(buf.getvalue())
        (folder / f"img{i:04d}.txt").write_text(f"ohwx, noise sample {i}")
        written += len(buf.getvalue())
    return written


class PeakRSS:
    """Samples this process's RSS every 10 ms; `peak` is the highest seen since the last reset."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    @contextmanager
    def phase(self) -> Iterator[None]:
        self.peak = self._proc.memory_info().rss
        yield
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def decode_all(folder: Path) -> int:
    n = 0
    for path in sorted(folder.iterdir()):
        if path.suffix in (".jpg", ".png"):
            with Image.open(path) as im:
                im.load()
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size-mb", type=float, default=1000.0, help="total image bytes to generate")
    ap.add_argument("--dir", type=Path, default=None, help="where to build it (default: a temp folder)")
    ap.add_argument("--no-zip", action="store_true", help="skip the zip run")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lorabot-bench-", dir=args.dir))
    rss = PeakRSS()
    try:
        src = root / "src"
        src.mkdir()
        t_gen, size = timed(lambda: generate(src, args.images, int(args.size_mb * 1024 * 1024)))
        print(f"generated {args.images} images, {size / 1e6:.0f} MB in {t_gen:.1f} s at {root}")
        for p in src.iterdir():  # warm the page cache so that both runs read from memory
            p.read_bytes()
        settings = load_settings(work_dir=root / "work", dataset_max_bytes=8 * 1024**3)

        with rss.phase():
            t_decode, n = timed(lambda: decode_all(src))
        peak_decode = rss.peak
        print(f"plain Pillow decode : {t_decode:7.2f} s  ({n} images, peak RSS {peak_decode / 2**20:.0f} MiB)")

        with rss.phase():
            t_check, prepared = timed(lambda: asyncio.run(prepare(src, root / "work", settings, "ohwx")))
        report = prepared.report
        assert report.ready and report.images == args.images, report.summary
        print(f"prepare (folder)    : {t_check:7.2f} s  (ready, peak RSS {rss.peak / 2**20:.0f} MiB)")
        results = [("folder", t_check)]

        if not args.no_zip:
            archive = root / "ds.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
                for p in sorted(src.iterdir()):
                    zf.write(p, f"MyDataset/{p.name}")
            archive.read_bytes()
            shutil.rmtree(root / "work")
            with rss.phase():
                t_zip, prepared = timed(lambda: asyncio.run(prepare(archive, root / "work", settings, "ohwx")))
            assert prepared.report.ready and prepared.report.images == args.images
            print(f"prepare (zip)       : {t_zip:7.2f} s  (extraction included, peak RSS {rss.peak / 2**20:.0f} MiB)")
            results.append(("zip", t_zip))

        print(f"workers: {settings.dataset_workers or min(4, os.cpu_count() or 1)} on {os.cpu_count()} CPUs")
        for name, t in results:
            ratio = t / t_decode
            print(f"ratio {name:6s} check/decode = {ratio:.2f}  ({'OK' if ratio < 2.0 else 'OVER'} goal < 2.0)")
    finally:
        rss.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
