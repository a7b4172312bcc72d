"""hypothesis mutates valid zips; the archive reader and QA may only fail with DatasetError."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.dataset import DatasetError
from services.dataset.archive import Limits, read_zip
from services.dataset.qa import run_qa
from services.settings import load_settings

from .corpus import basic_entries, image_bytes, make_zip

_CFG = load_settings(dataset_min_images=1, dataset_min_side=16, dataset_workers=1)
_LIMITS = Limits(max_bytes=4 * 1024 * 1024, max_files=50, max_file_bytes=1024 * 1024, max_ratio=100)
_BASE = [
    make_zip([*basic_entries(2), ("sub/x.png", image_bytes("PNG", size=(40, 40), seed=3)), ("sub/x.txt", b"hi")]),
    make_zip([("a.jpg", image_bytes(size=(48, 48), seed=4)), ("a.txt", b"cap")], compression=0),
]


@st.composite
def mutated_zip(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_BASE)))
    for _ in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "splice_tail"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("/"), ord(".")]))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            # the central directory sits at the end: mutate it harder
            tail = max(len(data) - draw(st.integers(1, 120)), 0)
            data[tail] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_zip())
def test_mutated_zips_raise_only_dataset_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            intake = read_zip(data, root / "raw", _LIMITS)
        except DatasetError:
            return
        run_qa(intake, root / "out", _CFG, "ohwx")
        # whatever survived, every name written is inside the output folder
        for p in (root / "out").rglob("*"):
            assert p.parent == root / "out"
