"""Conformance: Vast.ai's own client (`vastai` on PyPI, pinned in the dev extras) against the emulator.

The emulator and lorabot's client were written together, so they could share a wrong idea of the
API. The official SDK and CLI were not: every call they make here must work and parse. The CLI is
run as a subprocess (it checks the Content-Type, sends filters as strings and reads `extra_env`);
the SDK functions run in a worker thread (they are synchronous `requests` calls).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vastai.api import billing, instances, keys, offers
from vastai.api.client import VastClient as SdkClient

from services.vastai import InstanceStatus, VastClient
from tests.sim.vast import Quirks, VastEmulator

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIconformance lorabot-test"


def _cli(emu: VastEmulator, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "VAST_API_KEY": emu.api_key, "VASTAI_NO_UPDATE_CHECK": "1",
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
    return subprocess.run(
        [sys.executable, "-c", "from vastai.cli.main import main; main()", *args, "--url", emu.url],
        env=env, capture_output=True, text=True, timeout=90, check=False,
    )


def _sdk_session(emu: VastEmulator) -> dict[str, Any]:
    """The whole rental lifecycle through the official SDK functions (synchronous)."""
    c = SdkClient(api_key=emu.api_key, server_url=emu.url)
    out: dict[str, Any] = {}
    # the SDK's defaults (verified/external/rentable/rented) plus string-typed values, as the CLI sends
    out["offers"] = offers.search_offers(
        c, {"gpu_name": {"eq": "RTX 4090"}, "num_gpus": {"eq": "1"}, "reliability": {"gt": "0.9"},
            "geolocation": {"eq": "US"}}, order=[["dph_total", "asc"]], limit=10, storage=40.0)
    ask = out["offers"][0]["id"]
    out["created"] = instances.create_instance(c, ask, image="vastai/pytorch", disk=40, label="lorabot-sdk-1",
                                               ssh=True, direct=True, cancel_unavail=True)
    iid = out["created"]["new_contract"]
    out["shown"] = instances.show_instance(c, iid)
    out["labelled"] = instances.label_instance(c, iid, "lorabot-sdk-2")
    out["listed"] = instances.show_instances(c, select_filters={"label": {"in": ["lorabot-sdk-2"]}})
    out["key_created"] = keys.create_ssh_key(c, KEY)
    out["keys"] = keys.show_ssh_keys(c)
    out["attached"] = keys.attach_ssh(c, iid, KEY)
    out["user"] = billing.show_user(c)
    return out


async def test_the_official_sdk_works_against_the_emulator() -> None:
    with VastEmulator() as emu:
        out = await asyncio.to_thread(_sdk_session, emu)
        assert out["offers"] and all(o["geolocation"].endswith("US") and o["num_gpus"] == 1 for o in out["offers"])
        prices = [o["dph_total"] for o in out["offers"]]
        assert prices == sorted(prices)
        iid = out["created"]["new_contract"]
        assert out["created"]["success"] is True
        assert out["shown"]["id"] == iid and isinstance(out["shown"]["extra_env"], dict)
        assert out["labelled"]["success"] is True
        assert [r["id"] for r in out["listed"]] == [iid] and out["listed"][0]["label"] == "lorabot-sdk-2"
        assert [k["key"] for k in out["keys"]] == [KEY] and out["keys"][0]["deleted_at"] is None
        assert out["attached"]["success"] is True
        assert out["user"]["credit"] == emu.credit and "api_key" not in out["user"]
        # what the SDK rented, lorabot reads the same way
        async with VastClient(emu.api_key, emu.url, min_interval_s=0) as ours:
            inst = await ours.show_instance(iid)
            assert inst is not None and inst.label == "lorabot-sdk-2"
            assert [i.id for i in await ours.find_by_label("lorabot-sdk-2")] == [iid]
        sdk = SdkClient(api_key=emu.api_key, server_url=emu.url)
        assert (await asyncio.to_thread(instances.destroy_instance, sdk, iid))["success"] is True
        assert await asyncio.to_thread(instances.show_instance, sdk, iid) is None
        assert emu.live_instances() == []


async def test_the_official_cli_works_against_the_emulator(tmp_path: Path) -> None:
    with VastEmulator(quirks=Quirks(loading_s=0)) as emu:
        # parse_query sends every value as a string, and the CLI insists on exactly application/json
        search = await asyncio.to_thread(_cli, emu, tmp_path, "search", "offers",
                                         "gpu_name=RTX_4090 num_gpus=1 verified=true geolocation=US", "--raw")
        assert search.returncode == 0, search.stderr
        found = json.loads(search.stdout)
        assert found and {o["gpu_name"] for o in found} == {"RTX 4090"}
        ask = found[0]["id"]
        create = await asyncio.to_thread(_cli, emu, tmp_path, "create", "instance", str(ask), "--image",
                                         "vastai/pytorch", "--disk", "40", "--ssh", "--direct", "--label",
                                         "lorabot-cli-1", "--raw")
        assert create.returncode == 0, create.stderr
        iid = json.loads(create.stdout)["new_contract"]
        shown = await asyncio.to_thread(_cli, emu, tmp_path, "show", "instance", str(iid), "--raw")
        assert shown.returncode == 0 and json.loads(shown.stdout)["actual_status"] == "running", shown.stderr
        url = await asyncio.to_thread(_cli, emu, tmp_path, "ssh-url", str(iid))
        host, port = emu.ssh_endpoint
        assert url.stdout.strip() == f"ssh://root@{host}:{port}", url.stdout + url.stderr
        gone = await asyncio.to_thread(_cli, emu, tmp_path, "destroy", "instance", str(iid), "-y", "--raw")
        assert gone.returncode == 0, gone.stderr
        assert emu.live_instances() == []
        async with VastClient(emu.api_key, emu.url, min_interval_s=0) as ours:
            assert await ours.show_instance(iid) is None


def test_the_query_parameter_key_of_older_clients_is_accepted() -> None:
    """vast.py before PR #471 sent `?api_key=` (and no header): the server still accepts it."""
    import requests

    with VastEmulator() as emu:
        r = requests.get(f"{emu.url}/api/v0/users/current/", params={"api_key": emu.api_key}, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
        assert r.json()["credit"] == emu.credit
        bad = requests.get(f"{emu.url}/api/v0/users/current/", params={"api_key": "nope"}, timeout=10)
        assert bad.status_code == 401


def test_destroyed_rows_read_as_gone_by_the_official_rule() -> None:
    """Vast's CLI counts `intended_status or actual_status in destroyed/terminated/offline` as gone
    (machines.py); a lingering row the emulator returns must satisfy that rule, and ours."""
    with VastEmulator(quirks=Quirks(linger_destroyed_s=30)) as emu:
        c = SdkClient(api_key=emu.api_key, server_url=emu.url)
        ask = offers.search_offers(c, {"num_gpus": {"eq": "1"}}, limit=1)[0]["id"]
        iid = instances.create_instance(c, ask, image="img", disk=40, label="lorabot-linger")["new_contract"]
        instances.destroy_instance(c, iid)
        row = instances.show_instance(c, iid)
        assert row is not None and row["cur_state"] == "unloaded"
        assert (row.get("intended_status") or row.get("actual_status")) in ("destroyed", "terminated", "offline")
        from services.vastai.models import Instance

        assert Instance.model_validate(row).status == InstanceStatus.GONE


async def test_a_stop_from_the_official_sdk_reads_as_stopped_and_failed() -> None:
    """A stopped contract still bills storage: lorabot treats it as failed (destroy, rent elsewhere)."""
    with VastEmulator(quirks=Quirks(loading_s=0)) as emu:
        def stop_and_detach() -> int:
            c = SdkClient(api_key=emu.api_key, server_url=emu.url)
            ask = offers.search_offers(c, {"num_gpus": {"eq": "1"}}, limit=1)[0]["id"]
            iid = int(instances.create_instance(c, ask, image="img", disk=40, label="lorabot-stop")["new_contract"])
            key_id = keys.create_ssh_key(c, KEY)["id"]
            keys.attach_ssh(c, iid, KEY)
            assert keys.detach_ssh(c, iid, str(key_id))["success"] is True
            assert instances.stop_instance(c, iid)["success"] is True
            return iid

        iid = await asyncio.to_thread(stop_and_detach)
        async with VastClient(emu.api_key, emu.url, min_interval_s=0) as ours:
            inst = await ours.show_instance(iid)
            assert inst is not None and inst.status == InstanceStatus.STOPPED and inst.status.failed
            await ours.destroy_instance(iid)
        assert emu.live_instances() == []
