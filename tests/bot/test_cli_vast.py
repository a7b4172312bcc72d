"""`lorabot offers/regions/rent/instances/destroy/balance` as a user runs them, against the emulator."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.sim.vast import Quirks, VastEmulator


@pytest.fixture
def emu() -> Iterator[VastEmulator]:
    with VastEmulator(quirks=Quirks.all_on()) as e:
        e.set_quirks(create_delay_s=2.0)
        yield e


def lorabot(emu: VastEmulator, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VASTAI_API_KEY=key or emu.api_key, VASTAI_API_URL=emu.url,
               LORABOT_VASTAI_BACKOFF_S="0.01", LORABOT_VASTAI_MIN_INTERVAL_S="0",
               LORABOT_VASTAI_TIMEOUT_S="1", VASTAI_SSH_KEY_PATH="/nonexistent/key")
    return subprocess.run(["lorabot", *args], env=env, capture_output=True, text=True, timeout=60)


def test_offers_json_with_every_quirk_on(emu: VastEmulator) -> None:
    p = lorabot(emu, "offers", "--json", "--limit", "3", "--max-price", "0.9")
    assert p.returncode == 0, p.stderr
    offers = json.loads(p.stdout)
    assert 1 <= len(offers) <= 3
    for o in offers:
        assert {"id", "gpu_name", "num_gpus", "dph_total", "reliability", "inet_down", "geolocation", "score"} <= set(o)
        assert o["gpu_name"] == "RTX 4090" and o["dph_total"] <= 0.9
    assert [o["score"] for o in offers] == sorted((o["score"] for o in offers), reverse=True)


def test_regions_json(emu: VastEmulator) -> None:
    p = lorabot(emu, "regions", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert rows and all({"region", "offers", "min_dph"} <= set(r) for r in rows)


def test_rent_instances_destroy_leave_one_then_zero(emu: VastEmulator) -> None:
    p = lorabot(emu, "rent", "--auto", "--label", "lorabot-cli", "--json")
    assert p.returncode == 0, p.stderr
    rented = json.loads(p.stdout)
    assert isinstance(rented["instance_id"], int) and isinstance(rented["offer_id"], int)
    assert isinstance(rented["dph_total"], float)
    assert [i["id"] for i in emu.live_instances()] == [rented["instance_id"]]

    again = lorabot(emu, "rent", "--auto", "--label", "lorabot-cli", "--json")
    assert json.loads(again.stdout)["instance_id"] == rented["instance_id"]
    assert len(emu.live_instances()) == 1

    listed = json.loads(lorabot(emu, "instances", "--json").stdout)
    assert [(i["id"], i["label"]) for i in listed] == [(rented["instance_id"], "lorabot-cli")]
    assert {"id", "label", "status", "ssh_host", "ssh_port", "dph_total"} <= set(listed[0])

    assert lorabot(emu, "destroy", str(rented["instance_id"])).returncode == 0
    assert lorabot(emu, "destroy", str(rented["instance_id"])).returncode == 0
    assert emu.live_instances() == []


def test_bad_key_one_line_no_secret(emu: VastEmulator) -> None:
    p = lorabot(emu, "balance", "--json", key="sk-wrong-9876543210")
    assert p.returncode == 2
    assert "sk-wrong" not in p.stderr + p.stdout
    assert "VASTAI_API_KEY" in p.stderr and "Traceback" not in p.stderr


def test_missing_key_is_named() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VASTAI_")}
    p = subprocess.run(["lorabot", "offers"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "VASTAI_API_KEY is not set" in p.stderr


def test_balance_json(emu: VastEmulator) -> None:
    p = lorabot(emu, "balance", "--json")
    assert json.loads(p.stdout) == {"credit": 25.0, "balance": 0.0}
    assert emu.api_key not in p.stdout
