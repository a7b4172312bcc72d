"""A Vast.ai API emulator on loopback (aiohttp), with a switch for each quirk of the real API.

It speaks the real wire format of reference/vastai-api.md: POST /api/v0/bundles/, PUT
/api/v0/asks/{id}/, GET /api/v0/instances/{id}/ (wrapped, null when gone), GET /api/v1/instances/
(paginated; the v0 list answers 410), DELETE, labels, SSH keys and the account. Its instances are
"rented boxes" whose SSH endpoint is whatever the test gives (the loopback sshd of tests/sim/sshd.py).

It runs in its own thread and event loop, so synchronous tests, subprocesses (`lorabot ...`) and
`lorabot demo` can all use it. Not a pytest module: importable from the package for the demo.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
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
    non_json_errors: bool = False  # error bodies in plain text

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
    fault: str | None = None  # "exited" | "offline" | "never_ready"
    destroyed: bool = False
    ssh_keys: list[str] = field(default_factory=list)


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


def _match(value: Any, cond: Any, key: str) -> bool:
    if not isinstance(cond, dict):
        return value == cond
    for op, want in cond.items():
        if key == "geolocation" and op in ("in", "notin"):
            cc = str(value).replace(",", " ").split()[-1:] or [""]
            ok = cc[0] in want
            if (op == "in") != ok:
                return False
            continue
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
        self.url = ""
        self._instances: dict[int, _Inst] = {}
        self._ids = itertools.count(7_000_001)
        self._key_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._n_requests = 0
        self._n_lists = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    # --- what tests look at -------------------------------------------------------------------
    def live_instances(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"id": i.id, "label": i.label, "machine_id": i.machine_id, "fault": i.fault}
                for i in self._instances.values()
                if not i.destroyed
            ]

    def set_quirks(self, **changes: Any) -> None:
        with self._lock:
            self.quirks = replace(self.quirks, **changes)

    def fault(self, instance_id: int, kind: Literal["exited", "offline", "never_ready"] | None) -> None:
        with self._lock:
            self._instances[instance_id].fault = kind

    def vanish(self, instance_id: int) -> None:
        """The host reclaims the instance without being asked (it stops billing too)."""
        with self._lock:
            self._instances[instance_id].destroyed = True

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
        return web.json_response(self._pad(body), status=status)

    def _error(self, status: int, error: str, msg: str) -> web.Response:
        if self.quirks.non_json_errors and error != "auth_error":
            return web.Response(status=status, text=f"{error}: {msg}\n", content_type="text/plain")
        return web.json_response({"success": False, "error": error, "msg": msg}, status=status)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        with self._lock:
            self._n_requests += 1
            n = self._n_requests
            self.requests.append(
                {"method": request.method, "path": request.path, "query": dict(request.query),
                 "authorized": auth == f"Bearer {self.api_key}"}
            )
        if "api_key" in request.query:
            return self._error(400, "invalid_args", "keys belong in the Authorization header")
        every = self.quirks.rate_limit_every
        if every and n % every == 0:
            return web.Response(status=429, text="API requests too frequent endpoint threshold=4.5",
                                content_type="text/plain")
        if auth != f"Bearer {self.api_key}":
            status = 404 if self.quirks.auth_404 else 401
            return web.json_response({"success": False, "error": "auth_error", "msg": "Invalid user key"},
                                     status=status)
        if any(request.path.startswith(p) for p in self.forbidden_paths):
            return web.json_response({"success": False, "error": "forbidden",
                                      "msg": "API key does not have permission for this endpoint"}, status=403)
        return await handler(request)

    def _status_of(self, inst: _Inst) -> str:
        if inst.fault in ("exited", "offline"):
            return inst.fault
        age = time.monotonic() - inst.created
        if inst.fault == "never_ready" or age < self.quirks.loading_s / 2:
            return "loading" if age > 0.05 else "created"
        return "running" if age >= self.quirks.loading_s else "loading"

    def _instance_json(self, inst: _Inst) -> dict[str, Any]:
        status = self._status_of(inst)
        host, port = self.ssh_endpoint
        d: dict[str, Any] = {
            "id": inst.id,
            "label": inst.label,
            "machine_id": inst.machine_id,
            "host_id": inst.offer.get("host_id"),
            "gpu_name": inst.offer["gpu_name"],
            "num_gpus": inst.offer["num_gpus"],
            "dph_total": inst.offer["dph_total"],
            "intended_status": "running",
            "next_state": "running",
            "status_msg": "Error: container exited" if status == "exited" else f"{status}",
            "start_date": time.time() - (time.monotonic() - inst.created),
            "image_runtype": "ssh ssh_direc ssh_proxy",
            "local_ipaddrs": "10.0.0.5\n",
            "ssh_idx": "1",
            "ssh_host": host if status == "running" else None,
            "ssh_port": port if status == "running" else None,
            "direct_port_start": -1,
            "direct_port_end": -1,
            "geolocation": inst.offer["geolocation"],
        }
        if self.quirks.status_field == "actual_status":
            d["actual_status"] = None if status == "created" else status
            d["cur_state"] = "running"
        elif self.quirks.status_field == "cur_state":
            d["cur_state"] = status
        else:
            d["status"] = status
        d[self.quirks.ip_field] = host if status == "running" else None
        if self.quirks.direct_ssh and status == "running":
            d["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}],
                          "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40001"}]}
            d["direct_port_start"], d["direct_port_end"] = port, port
        else:
            d["ports"] = None
        return d

    def _create(self, offer: dict[str, Any], label: str) -> _Inst:
        inst = _Inst(
            id=next(self._ids),
            label=label,
            offer=offer,
            created=time.monotonic(),
            machine_id=int(offer["machine_id"]),
            ssh=self.ssh_endpoint,
            listed_after=self._n_lists + self.quirks.list_lag,
            ssh_keys=[k["public_key"] for k in self.account_keys],
        )
        self._instances[inst.id] = inst
        return inst

    # --- handlers -----------------------------------------------------------------------------
    async def _search(self, request: web.Request) -> web.Response:
        q = await request.json()
        rented = {i.offer["id"] for i in self._instances.values() if not i.destroyed}
        out = []
        for offer in self.offers:
            if offer["id"] in rented:
                continue
            ok = all(_match(offer.get(k), cond, k) for k, cond in q.items()
                     if k not in ("order", "type", "allocated_storage", "limit"))
            if ok:
                out.append(dict(offer))
        for col, direction in reversed(q.get("order") or []):
            out.sort(key=lambda o, c=col: o.get(c) or 0, reverse=direction == "desc")  # type: ignore[misc]
        return self._json({"offers": out[: int(q.get("limit") or 64)]})

    async def _create_handler(self, request: web.Request) -> web.Response:
        offer_id = int(request.match_info["id"])
        body = await request.json()
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
                return self._error(status, "no_such_ask", f"Instance type by id {offer_id} is not available.")
            if self.credit < offer["dph_total"]:
                return self._error(400, "insufficient_credit", "Insufficient credits: add credit to rent")
            inst = self._create(offer, label)
            slow = self.quirks.slow_creates > 0
            if slow:
                self.quirks.slow_creates -= 1
        if slow:
            await asyncio.sleep(self.quirks.create_delay_s)
        answer: dict[str, Any] = {"success": True, "instance_api_key": "emulated-instance-key-XYZ"}
        if self.quirks.id_in == "new_contract":
            answer["new_contract"] = inst.id
        elif self.quirks.id_in == "instances":
            answer["instances"] = {"id": inst.id}
        return self._json(answer)

    def _get(self, request: web.Request) -> _Inst | None:
        inst = self._instances.get(int(request.match_info["id"]))
        return None if inst is None or inst.destroyed else inst

    async def _show(self, request: web.Request) -> web.Response:
        inst = self._get(request)
        return self._json({"instances": self._instance_json(inst) if inst else None})

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
            visible = [
                i for i in sorted(self._instances.values(), key=lambda i: i.id)
                if not i.destroyed and self._n_lists > i.listed_after
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
            inst.destroyed = True
        return self._json({"success": True})

    async def _manage(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            inst = self._get(request)
            if inst is None:
                return self._error(404, "no_such_instance", "Instance not found")
            if "label" in body:
                if len(str(body["label"])) > 1024:
                    return self._error(400, "label_too_long", "label too long")
                inst.label = str(body["label"])
        return self._json({"success": True})

    async def _ssh_list(self, request: web.Request) -> web.Response:
        return self._json(list(self.account_keys))

    async def _ssh_add(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = str(body.get("ssh_key") or "")
        if self.team_key:
            return self._error(400, "team_ssh_keys_not_supported", "Team API keys cannot create SSH keys")
        if not key.startswith(("ssh-", "ecdsa-", "sk-")):
            # the real API once accepted a path as a key; the emulator is stricter so tests notice
            return self._error(400, "invalid_args", "not an ssh public key")
        with self._lock:
            self.account_keys.append({"id": next(self._key_ids), "public_key": key})
        return self._json({"success": True})

    async def _ssh_attach(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            inst = self._get(request)
            if inst is None:
                return self._error(404, "no_such_instance", "Instance not found")
            inst.ssh_keys.append(str(body.get("ssh_key")))
        return self._json({"success": True, "msg": "SSH key added to instance.", "key": json.dumps({"id": 1})})

    async def _user(self, request: web.Request) -> web.Response:
        return self._json({"id": 42, "email": "ops@example.com", "credit": self.credit, "balance": 0.0,
                           "api_key": self.api_key, "can_pay": True, "has_billing": True})
