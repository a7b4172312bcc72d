"""Issue 14 at the command line: the search quota, slow creates, and offers ranked by job cost."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.sim.vast import Quirks, VastEmulator

SCALE = 0.02


def lorabot(emu: VastEmulator, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, VASTAI_API_KEY=emu.api_key, VASTAI_API_URL=emu.url,
                LORABOT_VASTAI_BACKOFF_S="0.01", LORABOT_VASTAI_MIN_INTERVAL_S="0",
                LORABOT_VASTAI_TIMEOUT_S=str(30 * SCALE), LORABOT_VASTAI_CREATE_TIMEOUT_S=str(120 * SCALE),
                LORABOT_VASTAI_LABEL_WATCH_S=str(180 * SCALE), VASTAI_SSH_KEY_PATH="/nonexistent/key", **env)
    return subprocess.run(["lorabot", *args], env=full, capture_output=True, text=True, timeout=60)


def test_offers_exits_3_at_once_naming_the_search_quota() -> None:
    with VastEmulator(quirks=Quirks(search_quota_exceeded=True)) as emu:
        t0 = time.monotonic()
        p = lorabot(emu, "offers", "--json")
        assert p.returncode == 3, p.stderr
        assert "search quota" in p.stderr and "00:00 UTC" in p.stderr
        assert time.monotonic() - t0 < 15  # no retrying a quota that resets at midnight
        assert len([r for r in emu.requests if r["path"] == "/api/v0/bundles/"]) == 1


def test_rent_auto_with_60s_creates_bills_exactly_one_instance() -> None:
    with VastEmulator(quirks=Quirks(slow_creates=3, create_delay_s=60, list_lag_s=30, time_scale=SCALE)) as emu:
        p = lorabot(emu, "rent", "--auto", "--label", "lorabot-slow", "--json")
        assert p.returncode == 0, p.stderr
        rented = json.loads(p.stdout)
        assert emu.instances_ever("lorabot-slow") == [rented["instance_id"]]
        assert rented["offer_id"] == emu.creates[0]["offer_id"]


def test_rent_auto_after_a_lost_create_names_the_offer_it_really_runs_on() -> None:
    with VastEmulator(quirks=Quirks(lost_creates=1, list_lag_s=60, time_scale=SCALE)) as emu:
        p = lorabot(emu, "rent", "--auto", "--label", "lorabot-lost", "--json")
        assert p.returncode == 0, p.stderr
        rented = json.loads(p.stdout)
        assert emu.instances_ever("lorabot-lost") == [rented["instance_id"]]
        assert rented["offer_id"] == emu.creates[0]["offer_id"] and len(emu.creates) == 1


def test_offers_rank_by_the_expected_job_cost_and_keep_to_ram_and_bandwidth_caps() -> None:
    with VastEmulator() as emu:
        base = {k: v for k, v in emu.offers[0].items()}
        base.update(gpu_name="RTX 4090", num_gpus=1, reliability=0.99, reliability2=0.99, inet_down=1000.0,
                    dlperf=60.0, cuda_max_good=13.0, direct_port_count=20, disk_space=200.0, cpu_ram=64_000)
        emu.offers = [
            {**base, "id": 1, "machine_id": 1, "dph_total": 0.30, "inet_down_cost": 0.04, "inet_up_cost": 0.04},
            {**base, "id": 2, "machine_id": 2, "dph_total": 0.34, "inet_down_cost": 0.0, "inet_up_cost": 0.0},
            {**base, "id": 3, "machine_id": 3, "dph_total": 0.20, "cpu_ram": 32_000, "inet_down_cost": 0.0},
            {**base, "id": 4, "machine_id": 4, "dph_total": 0.20, "inet_down_cost": 0.2, "inet_up_cost": 0.0},
        ]
        p = lorabot(emu, "offers", "--json", "--steps", "1000")
        assert p.returncode == 0, p.stderr
        offers = json.loads(p.stdout)
        # 34 GB of model at $0.04/GB outweighs $0.04/h; 32 GB of RAM and $0.20/GB are never offered
        assert [o["id"] for o in offers] == [2, 1]
        assert offers[0]["expected_cost"] < offers[1]["expected_cost"]
        table = lorabot(emu, "offers", "--steps", "1000")
        assert "job $" in table.stdout and "1000-step" in table.stdout


def test_destroy_never_exits_0_on_a_redirected_empty_or_refused_answer() -> None:
    with VastEmulator() as emu:
        iid = emu.rent_outside("lorabot-live")
        for quirk in ("redirect_empty", "empty_bodies", "success_false"):
            emu.set_quirks(**{quirk: True})
            p = lorabot(emu, "destroy", str(iid))
            assert p.returncode == 3, (quirk, p.stdout, p.stderr)
            assert "destroyed" not in p.stdout
            emu.set_quirks(**{quirk: False})
        assert [i["id"] for i in emu.live_instances()] == [iid]
        assert lorabot(emu, "destroy", str(iid)).returncode == 0
        assert emu.live_instances() == []
