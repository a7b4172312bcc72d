from __future__ import annotations

from pathlib import Path

import pytest

from services.settings import Settings, load_settings


@pytest.fixture
def cfg(tmp_path: Path) -> Settings:
    # small limits so that limit tests stay fast; min_side 64 so that test images stay small
    return load_settings(
        work_dir=tmp_path / "cli-work",
        dataset_min_images=3,
        dataset_min_side=64,
        dataset_workers=2,
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / "work"
