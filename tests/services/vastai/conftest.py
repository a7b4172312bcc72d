from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from services.vastai import VastClient
from tests.sim.vast import Quirks, VastEmulator


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    with VastEmulator() as emu:
        yield emu


@pytest.fixture
def quirky() -> Iterator[VastEmulator]:
    with VastEmulator(quirks=Quirks.all_on()) as emu:
        yield emu


def make_client(emu: VastEmulator, key: str | None = None, timeout_s: float = 5.0) -> VastClient:
    return VastClient(key or emu.api_key, emu.url, timeout_s=timeout_s, max_retries=8, backoff_s=0.01,
                      backoff_max_s=0.05, min_interval_s=0.0)


@pytest.fixture
async def client(vast: VastEmulator) -> AsyncIterator[VastClient]:
    async with make_client(vast) as c:
        yield c
