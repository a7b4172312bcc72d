"""The simulated world for pipeline tests, and a notifier that records what a front-end would see."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from services.jobs.events import JobEvent
from services.jobs.model import Job


class Recorder:
    """A Notifier that keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, JobEvent]] = []

    async def notify(self, job: Job, event: JobEvent) -> None:
        self.events.append((job.id, event))

    def of(self, kind: type) -> list[JobEvent]:
        return [e for _, e in self.events if isinstance(e, kind)]


def dataset_zip(n: int = 4, size: int = 320, caption: str = "a photo of sks cat") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img = Image.new("RGB", (size, size), (40 * i % 255, 90, 160))
            b = io.BytesIO()
            img.save(b, "PNG")
            zf.writestr(f"cat_{i}.png", b.getvalue())
            zf.writestr(f"cat_{i}.txt", f"{caption} number {i}")
    return buf.getvalue()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
