# ruff: noqa: F811  (pytest fixtures imported from tests/sim/sshd.py are shadowed by parameters)
"""The review's M7: what the untrusted box sends is bounded. Downloads are capped, sample images
open only as JPEG/PNG/WebP within a pixel cap, and local names come from a regex match."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from bot.embeds import MAX_SAMPLE_PIXELS, shrink_image
from services.jobs.pipeline import _local_name
from services.ssh import TooLargeError
from tests.services.test_ssh import connect
from tests.sim.sshd import SshdServer, sshd  # noqa: F401  (fixtures)


async def test_a_download_over_its_cap_is_refused(sshd: SshdServer, tmp_path: Path) -> None:
    big = tmp_path / "boxfiles" / "sample.png"
    big.parent.mkdir()
    big.write_bytes(os.urandom(300_000))
    async with await connect(sshd) as box:
        with pytest.raises(TooLargeError):
            await box.download(str(big), tmp_path / "dl" / "sample.png", max_bytes=100_000)
        assert not (tmp_path / "dl" / "sample.png").exists()
        assert not (tmp_path / "dl" / "sample.png.part").exists()
        got = await box.download(str(big), tmp_path / "dl" / "ok.png", max_bytes=300_000)
        assert got.stat().st_size == 300_000


def test_sample_images_open_only_as_the_formats_samples_come_in() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError: EPS (Ghostscript) is never tried
        shrink_image(eps)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    with pytest.raises(OSError):
        shrink_image(buf.getvalue())


def test_a_sample_with_too_many_pixels_is_refused_from_its_header() -> None:
    side = int(MAX_SAMPLE_PIXELS**0.5) + 10
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")  # a tiny file that decodes to a huge image
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(ValueError, match="pixels"):
        shrink_image(buf.getvalue())
    small = io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, "PNG")
    assert shrink_image(small.getvalue()) == (small.getvalue(), "")


@pytest.mark.parametrize(("path", "name"), [
    ("/w/out/lora_1.safetensors", "lora_1.safetensors"),
    ("/w/out/..", "artifact.bin"),
    ("/w/out/.hidden", "artifact.bin"),
    ("/w/out/a\x1b]52;c;x\x07.safetensors", "artifact.bin"),
    ("", "artifact.bin"),
])
def test_local_names_of_box_paths_are_safe(path: str, name: str) -> None:
    assert _local_name(path) == name
