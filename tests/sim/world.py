"""The whole outside world on loopback: a Vast.ai emulator whose instances are an OpenSSH sshd
serving a fake box (with the stand-in ai-toolkit trainer), and moto's S3 server for R2.

`SimWorld` is a plain context manager (used by `lorabot demo`, the CLI tests and the pipeline
tests). `settings()` gives Settings pointing lorabot at it; `env()` the same as environment
variables for subprocesses.
"""

from __future__ import annotations

import contextlib
import getpass
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.settings import Settings, load_settings
from tests.sim.asyncssh_box import AsyncsshBox, run_asyncssh_box
from tests.sim.box import SimBox, make_box
from tests.sim.s3 import S3Server, run_s3_server
from tests.sim.sshd import SshdServer, find_sshd, run_sshd
from tests.sim.vast import Quirks, VastEmulator

HF_TOKEN = "hf_simulated_token_0123456789"


@dataclass
class SimWorld:
    root: Path
    sshd: SshdServer | AsyncsshBox  # OpenSSH's sshd; the asyncssh box only where sshd is missing (the demo)
    box: SimBox
    vast: VastEmulator
    s3: S3Server
    overrides: dict[str, Any] = field(default_factory=dict)

    def values(self, **extra: Any) -> dict[str, Any]:
        """Settings fields (by name) that point lorabot at the simulator, fast."""
        values: dict[str, Any] = {
            "vastai_api_key": self.vast.api_key,
            "vastai_api_url": self.vast.url,
            "vastai_ssh_key_path": str(self.sshd.info.client_key_path),
            "vastai_backoff_s": 0.01,
            "vastai_backoff_max_s": 0.1,
            "vastai_min_interval_s": 0.0,
            "vastai_timeout_s": 5.0,
            "r2_endpoint_url": self.s3.endpoint_url,
            "r2_access_key_id": self.s3.access_key_id,
            "r2_secret_access_key": self.s3.secret_access_key,
            "r2_bucket": self.s3.bucket,
            "hf_token": HF_TOKEN,
            "db_path": str(self.root / "lorabot.sqlite3"),
            "work_dir": str(self.root / "work"),
            "ssh_user": self.sshd.info.user,
            "ssh_connect_timeout_s": 5.0,
            "ready_timeout_s": 30.0,
            "ssh_lost_timeout_s": 10.0,
            "monitor_interval_s": 0.2,
            "instance_check_s": 0.5,
            "log_snippet_interval_s": 2.0,
            "stall_timeout_s": 20.0,
            "lease_s": 5.0,
            "reaper_interval_s": 3600.0,
            "dataset_min_images": 3,
            **self.box.settings_overrides(),
            **self.overrides,
        }
        values.update(extra)
        return values

    def expose_container_env(self, instance_id: int | None) -> None:
        """Put an instance's CONTAINER_ID / CONTAINER_API_KEY where the box finds them (None: remove)."""
        path = Path(self.box.settings_overrides()["box_container_environ"])
        if instance_id is None:
            path.unlink(missing_ok=True)
            return
        env = self.vast.container_env(instance_id)
        path.write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))

    def model_costs(self, *, time_factor: float, image_gb: float = 12.0, load_s: float = 0.0,
                    cold_read_s: float = 0.0, fail_prefetch: bool = False) -> None:
        """Issue 18: real costs on a compressed clock. The image pull takes image_gb / the offer's
        inet_down, the model's files their size / inet_down (both times `time_factor`), load +
        quantize `load_s` (+ `cold_read_s` on a machine's first load); every new rental starts with an
        empty model cache and page cache at its offer's bandwidth,
        and a job on a machine handed over finds the model cached."""
        self.vast.set_quirks(image_gb=image_gb, time_factor=time_factor)
        self.box.set_network(time_factor=time_factor, load_s=load_s, cold_read_s=cold_read_s,
                             fail_prefetch=fail_prefetch)
        self.vast.on_create = lambda offer: self.box.fresh_machine(float(offer.get("inet_down") or 0.0))

    def settings(self, **extra: Any) -> Settings:
        return load_settings(**self.values(**extra))

    def env(self, **extra: Any) -> dict[str, str]:
        """The same, as environment variables (names from Settings' aliases)."""
        from services.settings import env_name

        return {env_name(k): str(v) for k, v in self.values(**extra).items()}


@contextlib.contextmanager
def run_world(
    root: Path | str | None = None, *, quirks: Quirks | None = None, sec_per_step: float = 0.02,
    box_server: str = "sshd",
) -> Iterator[SimWorld]:
    """Start sshd, the box, the Vast.ai emulator and S3; stop them all on exit.

    `box_server`: "sshd" (OpenSSH, what the tests use), "asyncssh" (in-process, tests/sim/asyncssh_box.py),
    or "auto" (sshd when installed, else asyncssh: `lorabot demo`)."""
    if box_server == "auto":
        box_server = "sshd" if find_sshd() is not None else "asyncssh"
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="lorabot-sim-"))
        root = Path(root)
        sshd: SshdServer | AsyncsshBox
        if box_server == "asyncssh":
            sshd = stack.enter_context(run_asyncssh_box(root / "sim", user=getpass.getuser()))
        else:
            sshd = stack.enter_context(run_sshd(root / "sim", user=getpass.getuser()))
        box = make_box(sshd.info.root_dir)
        box.set_sec_per_step(sec_per_step)
        vast = stack.enter_context(
            VastEmulator(quirks=quirks or Quirks(loading_s=0.3), ssh_endpoint=(sshd.info.host, sshd.info.port))
        )
        s3 = stack.enter_context(run_s3_server())
        yield SimWorld(root=root, sshd=sshd, box=box, vast=vast, s3=s3)


# --- pytest fixture (pytest imported lazily so that `lorabot demo` does not need it) ---------------
try:
    import pytest
except ImportError:  # pragma: no cover - outside the test environment
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def world(tmp_path: Path) -> Iterator[SimWorld]:
        """The whole simulator for one test; fails the test if it left an instance billing."""
        from tests.sim.sshd import skip_without_sshd

        skip_without_sshd()
        with run_world(tmp_path) as w:
            yield w
            # money first: whatever a test did, nothing may be left billing
            assert w.vast.live_instances() == [], "a test left a rented instance behind"
