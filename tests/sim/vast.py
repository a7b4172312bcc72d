"""A Vast.ai API emulator on loopback (aiohttp), with a switch for each quirk of the real API.

It speaks the real wire format of reference/vastai-api.md: POST /api/v0/bundles/, PUT
/api/v0/asks/{id}/, GET /api/v0/instances/{id}/ (wrapped, null when gone), GET /api/v1/instances/
(paginated; the v0 list answers 410), DELETE, labels, stop/start, SSH keys and the account. Its
instances are "rented boxes" whose SSH endpoint is whatever the test gives (the loopback sshd of
tests/sim/sshd.py). Vast.ai's own `vastai` SDK and CLI run against it in
tests/services/vastai/test_official_sdk.py: exactly `application/json`, filters sent as strings,
real instance rows (`extra_env`, ...), SSH keys with `key`/`deleted_at`, a query-parameter key.
Delays of the quirks (60 s creates, list lag, lingering rows) run on `Quirks.time_scale`.

It runs in its own thread and event loop, so synchronous tests, subprocesses (`lorabot ...`) and
`lorabot demo` can all use it. Not a pytest module: importable from the package for the demo.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from aiohttp import web

GEOS = ["Texas, US", "Quebec, CA", "Bavaria, DE", "Oslo, NO", "California, US", "Tokyo, JP", "Ontario, CA"]


@dataclass
class Quirks:
    """Each switch turns on one documented misbehaviour of the real API."""

    id_in: Literal["new_contract", "instances", "none"] = "new_contract"  # where the create answer puts the id
    padded_strings: bool = False  # strings end in "\n" or spaces
    ip_field: Literal["public_ipaddr", "public_ip"] = "public_ipaddr"
    status_field: Literal["actual_status", "cur_state", "status"] = "actual_status"
    direct_ssh: bool = True  # ports["22/tcp"] present (else proxy only)
    snatch: int = 0  # the next N creates find their offer taken (404 / 410 no_such_ask, alternating)
    rate_limit_every: int = 0  # every Nth request answers 429, plain text, no Retry-After
    auth_404: bool = False  # a bad key gets 404 auth_error instead of 401
    slow_creates: int = 0  # the next N creates rent, then answer only after create_delay_s
    create_delay_s: float = 3.0
    list_lag: int = 0  # a new instance shows in the v1 list only after this many list calls
    page_size: int = 25  # v1 list page size (the server's max is 25)
    loading_s: float = 0.3  # created -> loading -> running
    # issue 18: the image pull takes image_gb / the offer's inet_down, times time_factor (a compressed
    # clock), when that is longer than loading_s
    image_gb: float = 0.0
    time_factor: float = 1.0
    label_fails: int = 0  # the next N label changes answer 500 (the API's "manage" endpoint erring)
    label_fails_applied: bool = False  # ...after applying the label (the answer, not the change, is lost)
    destroy_fails: int = 0  # the next N DELETEs answer 500 and destroy nothing
    non_json_errors: bool = False  # error bodies in plain text
    # --- issue 14: what the real API does that the first emulator never did ---
    time_scale: float = 1.0  # every emulated delay below is multiplied by this (a compressed clock)
    faulty_creates: int = 0  # the next N instances never run: they show `faulty_kind`
    faulty_kind: Literal["unknown", "oci_error", "exited", "offline"] = "unknown"
    linger_destroyed_s: float = 0.0  # destroyed rows stay listed/shown with cur_state "unloaded"
    snatch_style: Literal["404/410", "400", "not_available", "already_rented"] = "404/410"
    search_quota_exceeded: bool = False  # every search answers 429 {"error": "search_quota_exceeded"}
    redirect_empty: bool = False  # every call answers 308 to https://cloud.vast.ai with an empty body
    empty_bodies: bool = False  # every call answers 200 with an empty body (and does nothing)
    success_false: bool = False  # DELETE, label and SSH-key calls answer 200 success:false, doing nothing
    retry_after_s: float | None = None  # 429s (rate_limit_every) carry this Retry-After header
    lost_creates: int = 0  # the next N creates rent, but the connection drops before the answer
    list_lag_s: float = 0.0  # a new instance shows in the v1 list only this long after its create
    list_deleted_keys: bool = True  # soft-deleted SSH keys stay listed with deleted_at set
    attach_fails: bool = False  # POST /instances/{id}/ssh/ answers 200 success:false (e.g. a team key)
    # whether an instance's own CONTAINER_API_KEY may destroy it (else only stop it; see README)
    instance_key_destroys: bool = True

    @classmethod
    def all_on(cls) -> Quirks:
        return cls(
            id_in="none",
            padded_strings=True,
            ip_field="public_ip",
            status_field="cur_state",
            snatch=2,
            rate_limit_every=3,
            auth_404=True,
            slow_creates=1,
            list_lag=1,
            page_size=2,
            non_json_errors=True,
        )


@dataclass
class _Inst:
    id: int
    label: str
    offer: dict[str, Any]
    created: float
    machine_id: int
    ssh: tuple[str, int]
    listed_after: int  # list call count from which it appears
    fault: str | None = None  # "exited" | "offline" | "never_ready" | "unknown" | "oci_error"
    destroyed: bool = False
    destroyed_at: float = 0.0
    stopped: bool = False  # PUT {"state": "stopped"}: GPU released, storage still bills
    listed_at: float = 0.0  # monotonic time from which it appears in the v1 list
    ssh_keys: list[str] = field(default_factory=list)
    # the instance-scoped key Vast.ai puts in the container as CONTAINER_API_KEY (and answers the
    # create with as instance_api_key): it may manage this one instance and nothing else
    api_key: str = field(default_factory=lambda: secrets.token_hex(16))


_INSTANCE_PATH = re.compile(r"^/api/v0/instances/(\d+)/$")


def make_offers(n: int = 24, seed: int = 7) -> list[dict[str, Any]]:
    """A deterministic market: mostly 4090s at varied prices, some other GPUs."""
    offers = []
    gpus = ["RTX 4090"] * 4 + ["RTX 3090", "A100 SXM4"]
    for i in range(n):
        k = (i * 7 + seed) % 17
        gpu = gpus[i % len(gpus)]
        base = {"RTX 4090": 0.30, "RTX 3090": 0.18, "A100 SXM4": 0.95}[gpu]
        offers.append(
            {
                "id": 1000 + i,
                "ask_contract_id": 1000 + i,
                "machine_id": 500 + i,
                "host_id": 90 + i,
                "gpu_name": gpu,
                "num_gpus": 1 if i % 9 else 2,
                "gpu_ram": 24564,
                "dph_total": round(base + 0.02 * k, 4),
                "dph_base": round(base + 0.02 * k - 0.01, 4),
                "reliability": round(0.90 + 0.006 * k, 4),
                "reliability2": round(0.90 + 0.006 * k, 4),
                "inet_down": 100.0 + 60 * k,
                "inet_up": 80.0 + 30 * k,
                "inet_down_cost": round(0.002 + 0.001 * (k % 4), 4),  # $/GB
                "inet_up_cost": round(0.002 + 0.001 * (k % 3), 4),
                "cpu_ram": 32_000 if i % 13 == 7 else 64_000 + 8_000 * (k % 4),  # MB
                "cpu_cores_effective": 16.0,
                "dlperf": 40.0 + k,
                "disk_space": 100.0 + 10 * k,
                "cuda_max_good": 12.4 if i % 5 == 4 else 13.0,  # older drivers miss the CUDA 13 image
                "geolocation": GEOS[i % len(GEOS)],
                "verified": True,
                "verification": "verified",
                "direct_port_count": 0 if i % 11 == 5 else 20,
                "rentable": True,
                "rented": False,
                "external": False,
                "score": 123.0,
            }
        )
    return offers


def _coerce(value: Any, want: Any) -> Any:
    """The server coerces what the official CLI sends as strings ("1", "true", "0.98")."""
    if isinstance(want, list):
        return [_coerce(value, w) for w in want]
    if not isinstance(want, str):
        return want
    if isinstance(value, bool):
        return {"true": True, "false": False}.get(want.strip().lower(), want)
    if isinstance(value, (int, float)):
        try:
            return float(want)
        except ValueError:
            return want
    return want


def _country(value: Any) -> str:
    tail = str(value or "").replace(",", " ").split()[-1:] or [""]
    return tail[0]


def _match(value: Any, cond: Any, key: str) -> bool:
    if not isinstance(cond, dict):
        return value == _coerce(value, cond)
    for op, want in cond.items():
        if key == "geolocation" and op in ("eq", "neq", "in", "notin"):
            # "Two letter country code. Works with operators =, !=, in, notin" (docs)
            cc = _country(value)
            codes = want if isinstance(want, list) else [want]
            ok = cc in codes or value in codes
            if (op in ("eq", "in")) != ok:
                return False
            continue
        want = _coerce(value, want)
        try:
            if op in ("gt", "gte", "lt", "lte"):
                v, w = float(value), float(want)
                if not {"gt": v > w, "gte": v >= w, "lt": v < w, "lte": v <= w}[op]:
                    return False
            elif op == "eq" and value != want:
                return False
            elif op == "neq" and value == want:
                return False
            elif op == "in" and value not in want:
                return False
            elif op == "notin" and value in want:
                return False
        except (TypeError, ValueError):
            return False
    return True


class VastEmulator:
    """Start with `with VastEmulator(...) as vast:`; `vast.url` is the base URL to use."""

    def __init__(
        self,
        api_key: str = "test-vast-key",
        *,
        quirks: Quirks | None = None,
        ssh_endpoint: tuple[str, int] = ("127.0.0.1", 22),
        offers: list[dict[str, Any]] | None = None,
        credit: float = 25.0,
    ) -> None:
        self.api_key = api_key
        self.quirks = quirks or Quirks()
        self.ssh_endpoint = ssh_endpoint
        self.offers = offers if offers is not None else make_offers()
        self.credit = credit
        self.account_keys: list[dict[str, Any]] = []
        # reference §1 "Scoped keys": a key lacking a permission gets 401/403 on those paths;
        # §6: a team-scoped key cannot create account SSH keys (400 team_ssh_keys_not_supported)
        self.forbidden_paths: set[str] = set()
        self.team_key = False
        self.requests: list[dict[str, Any]] = []  # method, path, query, authorized
        self.creates: list[dict[str, Any]] = []  # every create body, with its offer_id
        self.url = ""
        self._instances: dict[int, _Inst] = {}
        self._ids = itertools.count(7_000_001)
        self._key_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._n_requests = 0
        self._n_lists = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # called with the offer of every new rental (the simulator gives the box a fresh machine's state)
        self.on_create: Callable[[dict[str, Any]], None] | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    # --- what tests look at -------------------------------------------------------------------
    def live_instances(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"id": i.id, "label": i.label, "machine_id": i.machine_id, "fault": i.fault, "stopped": i.stopped}
                for i in self._instances.values()
                if not i.destroyed
            ]

    def instances_ever(self, label: str | None = None) -> list[int]:
        """Every instance ever created (destroyed or not), optionally under one label: each one billed."""
        with self._lock:
            return [i.id for i in self._instances.values() if label is None or i.label == label]

    def delete_account_key(self, key_id: int) -> None:
        """Soft-delete an account SSH key, as the console does: it may stay listed with deleted_at."""
        with self._lock:
            for k in self.account_keys:
                if k["id"] == key_id:
                    k["deleted_at"] = time.time()

    def set_quirks(self, **changes: Any) -> None:
        with self._lock:
            self.quirks = replace(self.quirks, **changes)

    def fault(
        self, instance_id: int, kind: Literal["exited", "offline", "never_ready", "unknown", "oci_error"] | None
    ) -> None:
        with self._lock:
            self._instances[instance_id].fault = kind

    def vanish(self, instance_id: int) -> None:
        """The host reclaims the instance without being asked (it stops billing too)."""
        with self._lock:
            self._instances[instance_id].destroyed = True

    def container_env(self, instance_id: int) -> dict[str, str]:
        """What Vast.ai sets inside the instance's container (PID 1's environment)."""
        with self._lock:
            inst = self._instances[instance_id]
            return {"CONTAINER_ID": str(inst.id), "CONTAINER_API_KEY": inst.api_key}

    def destroyed_by_instance_key(self, instance_id: int) -> bool:
        """Whether the instance's own key destroyed it (the box's dead-man's switch)."""
        return any(r["method"] == "DELETE" and r["path"] == f"/api/v0/instances/{instance_id}/"
                   and r.get("instance_key") == instance_id and r.get("status") == 200 for r in self.requests)

    def rent_outside(self, label: str, offer_id: int | None = None) -> int:
        """An instance rented behind the bot's back (e.g. a process killed before it stored the id)."""
        offer = next(o for o in self.offers if offer_id is None or o["id"] == offer_id)
        with self._lock:
            return self._create(offer, label).id

    # --- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> VastEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> VastEmulator:
        self._thread = threading.Thread(target=self._serve, name="vast-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Vast.ai emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._runner:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                fut.result(5)
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_post("/api/v0/bundles/", self._search)
        r.add_put("/api/v0/asks/{id}/", self._create_handler)
        r.add_get("/api/v0/instances/", self._v0_list)
        r.add_get("/api/v0/instances/{id}/", self._show)
        r.add_delete("/api/v0/instances/{id}/", self._destroy)
        r.add_put("/api/v0/instances/{id}/", self._manage)
        r.add_get("/api/v1/instances/", self._v1_list)
        r.add_get("/api/v0/ssh/", self._ssh_list)
        r.add_post("/api/v0/ssh/", self._ssh_add)
        r.add_post("/api/v0/instances/{id}/ssh/", self._ssh_attach)
        r.add_delete("/api/v0/instances/{id}/ssh/{key_id}/", self._ssh_detach)
        r.add_get("/api/v0/users/current/", self._user)
        r.add_get("/api/v0/users/current", self._user)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        loop.run_forever()
        loop.close()

    # --- helpers ------------------------------------------------------------------------------
    def _pad(self, value: Any) -> Any:
        if not self.quirks.padded_strings:
            return value
        if isinstance(value, str):
            return value + "\n "
        if isinstance(value, dict):
            return {k: self._pad(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._pad(v) for v in value]
        return value

    def _json(self, body: Any, status: int = 200) -> web.Response:
        # exactly "application/json": the official CLI refuses "application/json; charset=utf-8"
        return web.Response(body=json.dumps(self._pad(body)).encode(), status=status,
                            headers={"Content-Type": "application/json"})

    def _scaled(self, seconds: float) -> float:
        return seconds * self.quirks.time_scale

    def _error(self, status: int, error: str, msg: str) -> web.Response:
        if self.quirks.non_json_errors and error != "auth_error":
            return web.Response(status=status, text=f"{error}: {msg}\n", content_type="text/plain")
        return self._json({"success": False, "error": error, "msg": msg}, status=status)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if "api_key" in request.query and not auth:
            auth = f"Bearer {request.query['api_key']}"  # still accepted by the server (reference §1)
        with self._lock:
            self._n_requests += 1
            n = self._n_requests
            self.requests.append(
                {"method": request.method, "path": request.path, "query": dict(request.query),
                 "authorized": auth == f"Bearer {self.api_key}"}
            )
        if self.quirks.redirect_empty:
            return web.Response(status=308, headers={"Location": "https://cloud.vast.ai" + request.path_qs})
        if self.quirks.empty_bodies:
            return web.Response(status=200)
        every = self.quirks.rate_limit_every
        if every and n % every == 0:
            headers = {} if self.quirks.retry_after_s is None else {"Retry-After": str(self.quirks.retry_after_s)}
            return web.Response(status=429, text="API requests too frequent endpoint threshold=4.5",
                                content_type="text/plain", headers=headers)
        with self._lock:
            holder = next((i for i in self._instances.values() if auth == f"Bearer {i.api_key}"), None)
        if holder is not None:
            # an instance's own key (CONTAINER_API_KEY): PUT, or DELETE where allowed, of that one
            # instance; anything else is refused
            m = _INSTANCE_PATH.match(request.path)
            own = m is not None and int(m.group(1)) == holder.id and (
                request.method == "PUT" or (request.method == "DELETE" and self.quirks.instance_key_destroys))
            with self._lock:
                entry = self.requests[-1]
            if not own:
                return self._json({"success": False, "error": "auth_error", "msg": "this key may not do that"},
                                  status=403)
            entry["instance_key"] = holder.id
            response = await handler(request)
            entry["status"] = response.status
            return response
        if auth != f"Bearer {self.api_key}":
            status = 404 if self.quirks.auth_404 else 401
            return self._json({"success": False, "error": "auth_error", "msg": "Invalid user key"}, status=status)
        if any(request.path.startswith(p) for p in self.forbidden_paths):
            return self._json({"success": False, "error": "forbidden",
                               "msg": "API key does not have permission for this endpoint"}, status=403)
        return await handler(request)

    def _status_of(self, inst: _Inst) -> str:
        if inst.fault in ("exited", "offline", "unknown"):
            return inst.fault
        if inst.fault == "oci_error":
            return "created"
        age = time.monotonic() - inst.created
        loading_s = max(self.quirks.loading_s, self.pull_s(inst.offer))
        if inst.fault == "never_ready" or age < loading_s / 2:
            return "loading" if age > 0.05 else "created"
        return "running" if age >= loading_s else "loading"

    def pull_s(self, offer: dict[str, Any]) -> float:
        """Seconds (compressed) the image pull takes on this offer's bandwidth."""
        inet = float(offer.get("inet_down") or 0.0)
        if not self.quirks.image_gb or inet <= 0:
            return 0.0
        return self.quirks.image_gb * 8e9 / (inet * 1e6) * self.quirks.time_factor

    def _visible(self, inst: _Inst) -> bool:
        """Live, or destroyed so recently that the API still returns the row (cur_state unloaded)."""
        if not inst.destroyed:
            return True
        return time.monotonic() - inst.destroyed_at < self._scaled(self.quirks.linger_destroyed_s)

    def _instance_json(self, inst: _Inst) -> dict[str, Any]:
        status = self._status_of(inst)
        host, port = self.ssh_endpoint
        running = status == "running" and not inst.destroyed
        offer = inst.offer
        if inst.fault == "oci_error":
            status_msg = ("Error response from daemon: failed to create task for container: OCI runtime "
                          "create failed: runc create failed: unable to start container process")
        elif status == "exited":
            status_msg = "Error: container exited"
        elif running:
            status_msg = f"success, running {offer.get('image', 'vastai/pytorch')}"
        else:
            status_msg = f"{status}"
        # the shape of a real row (docs show-instance; vastai/data/instance.py)
        d: dict[str, Any] = {
            "id": inst.id,
            "label": inst.label,
            "machine_id": inst.machine_id,
            "host_id": offer.get("host_id"),
            "gpu_name": offer["gpu_name"],
            "num_gpus": offer["num_gpus"],
            "gpu_ram": offer.get("gpu_ram"),
            "gpu_util": 0.0,
            "cpu_ram": offer.get("cpu_ram"),
            "cpu_cores_effective": offer.get("cpu_cores_effective"),
            "disk_space": 40.0,
            "dph_total": offer["dph_total"],
            "dph_base": offer.get("dph_base"),
            "storage_cost": 0.15,
            "storage_total_cost": 0.0083,
            "inet_up": offer.get("inet_up"),
            "inet_down": offer.get("inet_down"),
            "inet_up_cost": offer.get("inet_up_cost"),
            "inet_down_cost": offer.get("inet_down_cost"),
            "reliability2": offer.get("reliability2"),
            "verification": offer.get("verification"),
            "intended_status": "running",
            "next_state": "running",
            "cur_state": "running",
            "status_msg": status_msg,
            "start_date": time.time() - (time.monotonic() - inst.created),
            "end_date": None,
            "duration": None,
            "image_uuid": "vastai/pytorch",
            "image_runtype": "ssh ssh_direc ssh_proxy",
            "image_args": [],
            "onstart": "touch ~/.no_auto_tmux",
            "extra_env": [["-p 22:22", "1"], ["VAST_CONTAINERLABEL", f"C.{inst.id}"]],
            "template_id": None,
            "local_ipaddrs": "10.0.0.5\n",
            "ssh_idx": "1",
            "ssh_host": host if running else None,
            "ssh_port": port if running else None,
            "direct_port_start": -1,
            "direct_port_end": -1,
            "machine_dir_ssh_port": None,
            "geolocation": offer["geolocation"],
            "uptime_mins": None,
        }
        if inst.stopped and not inst.destroyed:
            d.update(cur_state="stopped", intended_status="stopped", next_state="stopped", actual_status="exited",
                     status_msg="stopped", ssh_host=None, ssh_port=None)
            d[self.quirks.ip_field] = None
            d["ports"] = [8080, 8081]
            return d
        if inst.destroyed:
            d.update(cur_state="unloaded", intended_status="destroyed", next_state="destroyed",
                     status_msg="", actual_status="exited")
        elif self.quirks.status_field == "actual_status":
            d["actual_status"] = None if status == "created" and inst.fault != "oci_error" else status
        elif self.quirks.status_field == "cur_state":
            d["cur_state"] = status
        else:
            del d["cur_state"]
            d["status"] = status
        d[self.quirks.ip_field] = host if running else None
        if self.quirks.direct_ssh and running:
            d["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}],
                          "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40001"}]}
            d["direct_port_start"], d["direct_port_end"] = port, port
        else:
            d["ports"] = [8080, 8081]  # what show-instance documents for a proxy-only instance
        return d

    def _create(self, offer: dict[str, Any], label: str) -> _Inst:
        fault = None
        if self.quirks.faulty_creates > 0:
            self.quirks.faulty_creates -= 1
            fault = self.quirks.faulty_kind
        now = time.monotonic()
        inst = _Inst(
            id=next(self._ids),
            label=label,
            offer=offer,
            created=now,
            machine_id=int(offer["machine_id"]),
            ssh=self.ssh_endpoint,
            listed_after=self._n_lists + self.quirks.list_lag,
            listed_at=now + self._scaled(self.quirks.list_lag_s),
            fault=fault,
            ssh_keys=[k["key"] for k in self.account_keys if k.get("deleted_at") is None],
        )
        self._instances[inst.id] = inst
        if self.on_create is not None:
            self.on_create(offer)
        return inst

    # --- handlers -----------------------------------------------------------------------------
    async def _search(self, request: web.Request) -> web.Response:
        if self.quirks.search_quota_exceeded:
            # the daily search quota: resets at 00:00 UTC; the official client never retries it
            return self._json({"success": False, "error": "search_quota_exceeded",
                               "msg": "Daily search quota exceeded"}, status=429)
        q = await request.json()
        rented = {i.offer["id"] for i in self._instances.values() if not i.destroyed}
        out = []
        for offer in self.offers:
            if offer["id"] in rented:
                continue
            ok = all(_match(offer.get(k), cond, k) for k, cond in q.items()
                     if k not in ("order", "type", "allocated_storage", "limit", "disable_bundling"))
            if ok:
                out.append(dict(offer))
        for col, direction in reversed(q.get("order") or []):
            out.sort(key=lambda o, c=col: o.get(c) or 0, reverse=direction == "desc")  # type: ignore[misc]
        return self._json({"offers": out[: int(q.get("limit") or 64)]})

    async def _create_handler(self, request: web.Request) -> web.Response:
        offer_id = int(request.match_info["id"])
        body = await request.json()
        with self._lock:
            self.creates.append({"offer_id": offer_id, **body})
        label = str(body.get("label") or "")
        if not body.get("image") or not label or len(label) > 256:
            return self._error(400, "invalid_args", "image and a label of at most 256 chars are required")
        with self._lock:
            offer = next((o for o in self.offers if o["id"] == offer_id), None)
            taken = any(i.offer["id"] == offer_id for i in self._instances.values() if not i.destroyed)
            if self.quirks.snatch > 0 or offer is None or taken:
                if self.quirks.snatch > 0:
                    self.quirks.snatch -= 1
                    status = 404 if self.quirks.snatch % 2 else 410
                else:
                    status = 404
                style = self.quirks.snatch_style
                if style == "400":
                    return self._error(400, "no_such_ask", f"no_such_ask: ask {offer_id} is not available")
                if style == "not_available":
                    return self._error(400, "invalid_args", f"Instance type by id {offer_id} is not available.")
                if style == "already_rented":
                    return self._error(400, "invalid_args", f"Machine of offer {offer_id} is already rented.")
                return self._error(status, "no_such_ask", f"Instance type by id {offer_id} is not available.")
            if self.credit < offer["dph_total"]:
                return self._error(400, "insufficient_credit", "Insufficient credits: add credit to rent")
            inst = self._create(offer, label)
            slow = self.quirks.slow_creates > 0
            if slow:
                self.quirks.slow_creates -= 1
            lost = self.quirks.lost_creates > 0
            if lost:
                self.quirks.lost_creates -= 1
        if slow:
            await asyncio.sleep(self._scaled(self.quirks.create_delay_s))
        if lost:
            # the rental happened, the answer never arrives: the client sees a dropped connection
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=204)
        answer: dict[str, Any] = {"success": True, "instance_api_key": inst.api_key}
        if self.quirks.id_in == "new_contract":
            answer["new_contract"] = inst.id
        elif self.quirks.id_in == "instances":
            answer["instances"] = {"id": inst.id}
        return self._json(answer)

    def _get(self, request: web.Request) -> _Inst | None:
        inst = self._instances.get(int(request.match_info["id"]))
        return None if inst is None or inst.destroyed else inst

    async def _show(self, request: web.Request) -> web.Response:
        inst = self._instances.get(int(request.match_info["id"]))
        shown = inst is not None and self._visible(inst)
        return self._json({"instances": self._instance_json(inst) if inst and shown else None})

    async def _v0_list(self, request: web.Request) -> web.Response:
        return self._error(410, "deprecated_endpoint", "Use /api/v1/instances/ instead")

    async def _v1_list(self, request: web.Request) -> web.Response:
        try:
            filters = json.loads(request.query.get("select_filters", "{}"))
            limit = min(int(request.query.get("limit", "25")), 25, self.quirks.page_size)
            start = int(request.query.get("after_token") or 0)
        except ValueError:
            return self._error(400, "invalid_args", "bad query")
        for col in filters:
            if col in ("dph_total", "num_gpus"):
                return self._error(400, "invalid_args", f"cannot filter on computed column {col}")
        with self._lock:
            self._n_lists += 1
            now = time.monotonic()
            visible = [
                i for i in sorted(self._instances.values(), key=lambda i: i.id)
                if self._visible(i) and self._n_lists > i.listed_after and now >= i.listed_at
            ]
        rows = [self._instance_json(i) for i in visible]
        rows = [r for r in rows if all(_match(r.get(k), c, k) for k, c in filters.items())]
        page = rows[start:start + limit]
        next_token = str(start + limit) if start + limit < len(rows) else None
        return self._json({"success": True, "instances": page, "instances_found": len(rows),
                           "total_instances": len(rows), "next_token": next_token})

    async def _destroy(self, request: web.Request) -> web.Response:
        with self._lock:
            inst = self._get(request)
            if inst is None:
                return self._error(404, "not_found", "Instance not found")
            if self.quirks.success_false:
                return self._json({"success": False, "error": "server_error", "msg": "destroy failed, try again"})
            if self.quirks.destroy_fails > 0:
                self.quirks = replace(self.quirks, destroy_fails=self.quirks.destroy_fails - 1)
                return self._error(500, "server_error", "Internal server error")
            inst.destroyed = True
            inst.destroyed_at = time.monotonic()
        return self._json({"success": True})

    async def _manage(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            inst = self._get(request)
            if inst is None:
                return self._error(404, "no_such_instance", "Instance not found")
            if self.quirks.success_false:
                return self._json({"success": False, "error": "server_error", "msg": "could not update"})
            if body.get("state") in ("stopped", "running"):
                inst.stopped = body["state"] == "stopped"
            if "label" in body:
                if len(str(body["label"])) > 1024:
                    return self._error(400, "label_too_long", "label too long")
                if self.quirks.label_fails > 0:
                    self.quirks = replace(self.quirks, label_fails=self.quirks.label_fails - 1)
                    if self.quirks.label_fails_applied:
                        inst.label = str(body["label"])
                    return self._error(500, "server_error", "Internal server error")
                inst.label = str(body["label"])
            if body.get("state") == "stopped":
                inst.stopped = True
        return self._json({"success": True})

    async def _ssh_list(self, request: web.Request) -> web.Response:
        keys = [k for k in self.account_keys if self.quirks.list_deleted_keys or k.get("deleted_at") is None]
        return self._json(keys)

    async def _ssh_add(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = str(body.get("ssh_key") or "")
        if self.team_key:
            return self._error(400, "team_ssh_keys_not_supported", "Team API keys cannot create SSH keys")
        if not key.startswith(("ssh-", "ecdsa-", "sk-")):
            # the real API once accepted a path as a key; the emulator is stricter so tests notice
            return self._error(400, "invalid_args", "not an ssh public key")
        if self.quirks.success_false:
            return self._json({"success": False, "error": "server_error", "msg": "could not add the key"})
        with self._lock:
            # docs show-ssh-keys: [{"id","user_id","key","created_at","deleted_at"}]
            item = {"id": next(self._key_ids), "user_id": 42, "key": key,
                    "created_at": time.time(), "deleted_at": None}
            self.account_keys.append(item)
        return self._json({"success": True, **item})

    async def _ssh_attach(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            inst = self._get(request)
            if inst is None:
                return self._error(404, "no_such_instance", "Instance not found")
            if self.quirks.success_false or self.quirks.attach_fails:
                return self._json({"success": False, "error": "server_error", "msg": "could not attach the key"})
            inst.ssh_keys.append(str(body.get("ssh_key")))
        return self._json({"success": True, "msg": "SSH key added to instance.", "key": json.dumps({"id": 1})})

    async def _ssh_detach(self, request: web.Request) -> web.Response:
        with self._lock:
            inst = self._get(request)
            if inst is None:
                return self._error(404, "no_such_instance", "Instance not found")
            key = next((k for k in self.account_keys if str(k["id"]) == request.match_info["key_id"]), None)
            if key is not None and key["key"] in inst.ssh_keys:
                inst.ssh_keys.remove(key["key"])
        return self._json({"success": True, "msg": "SSH key removed from instance."})

    async def _user(self, request: web.Request) -> web.Response:
        return self._json({"id": 42, "email": "ops@example.com", "credit": self.credit, "balance": 0.0,
                           "api_key": self.api_key, "can_pay": True, "has_billing": True})
