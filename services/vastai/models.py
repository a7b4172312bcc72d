"""Pydantic models that normalise Vast.ai's inconsistent payloads (see reference/vastai-api.md).

Everything the rest of lorabot sees goes through these: strings are stripped, the status comes from
`cur_state or actual_status or status` mapped to one enum, the IP from `public_ipaddr` before
`public_ip`, and the SSH endpoint is offered direct first, then through the proxy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fields that must never be kept, logged or printed.
SECRET_FIELDS = frozenset({"api_key", "instance_api_key", "jupyter_token"})


def strip_strings(value: Any) -> Any:
    """Recursively strip whitespace from strings (the API appends '\\n' or spaces at times)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {k: strip_strings(v) for k, v in value.items() if k not in SECRET_FIELDS}
    if isinstance(value, list):
        return [strip_strings(v) for v in value]
    return value


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


class InstanceStatus(enum.StrEnum):
    PENDING = "pending"  # created, loading, scheduling, rebooting, unknown or null: not usable yet
    RUNNING = "running"
    STOPPED = "stopped"  # still bills storage: lorabot never leaves an instance stopped
    EXITED = "exited"  # the container died
    OFFLINE = "offline"  # the host went away
    GONE = "gone"  # destroyed or never existed

    @property
    def failed(self) -> bool:
        return self in (InstanceStatus.STOPPED, InstanceStatus.EXITED, InstanceStatus.OFFLINE)


_STATUS_MAP = {
    "running": InstanceStatus.RUNNING,
    "stopped": InstanceStatus.STOPPED,
    "exited": InstanceStatus.EXITED,
    "frozen": InstanceStatus.STOPPED,
    "offline": InstanceStatus.OFFLINE,
}


def parse_status(raw: Any) -> InstanceStatus:
    if not isinstance(raw, str):
        return InstanceStatus.PENDING
    return _STATUS_MAP.get(raw.strip().lower(), InstanceStatus.PENDING)


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    kind: Literal["direct", "proxy"]
    user: str = "root"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port} ({self.kind})"


class Offer(BaseModel):
    """One rentable ask from POST /api/v0/bundles/."""

    model_config = ConfigDict(extra="ignore")

    id: int
    gpu_name: str = ""
    num_gpus: int = 1
    gpu_ram: float = 0.0  # MB per GPU
    dph_total: float = 0.0
    reliability: float = 0.0
    inet_down: float = 0.0  # Mb/s
    inet_up: float = 0.0
    dlperf: float = 0.0
    disk_space: float = 0.0
    cuda_max_good: float = 0.0
    geolocation: str = ""
    machine_id: int | None = None
    host_id: int | None = None
    verified: bool = False
    direct_port_count: int = 0
    score: float = 0.0  # lorabot's ranking score (not Vast's), filled in by search.rank

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        d = strip_strings(data)
        d["id"] = d.get("id", d.get("ask_contract_id"))
        rel = d.get("reliability")
        if rel is None:
            rel = d.get("reliability2")
        d["reliability"] = _float(rel)
        for key in ("dph_total", "inet_down", "inet_up", "dlperf", "disk_space", "cuda_max_good", "gpu_ram"):
            d[key] = _float(d.get(key))
        d["num_gpus"] = _int_or_none(d.get("num_gpus")) or 1
        d["direct_port_count"] = _int_or_none(d.get("direct_port_count")) or 0
        d["machine_id"] = _int_or_none(d.get("machine_id"))
        d["host_id"] = _int_or_none(d.get("host_id"))
        verification = d.get("verification")
        d["verified"] = bool(d.get("verified")) or verification == "verified"
        d["geolocation"] = d.get("geolocation") or ""
        d["gpu_name"] = d.get("gpu_name") or ""
        d.pop("score", None)  # Vast's own score is not ours
        return d

    @property
    def region(self) -> str:
        """ISO country code: the last two letters of the free-form geolocation."""
        tail = self.geolocation.replace(",", " ").split()
        return tail[-1].upper() if tail and len(tail[-1]) == 2 else ""

    def public(self) -> dict[str, Any]:
        """The contract's JSON shape for `lorabot offers --json`."""
        return {
            "id": self.id,
            "gpu_name": self.gpu_name,
            "num_gpus": self.num_gpus,
            "dph_total": round(self.dph_total, 4),
            "reliability": round(self.reliability, 4),
            "inet_down": self.inet_down,
            "geolocation": self.geolocation,
            "region": self.region,
            "dlperf": self.dlperf,
            "machine_id": self.machine_id,
            "score": round(self.score, 4),
        }


class Instance(BaseModel):
    """One rented instance, from show (v0, unwrapped) or list (v1)."""

    model_config = ConfigDict(extra="ignore")

    id: int
    label: str | None = None
    status: InstanceStatus = InstanceStatus.PENDING
    status_msg: str | None = None
    intended_status: str | None = None
    public_ipaddr: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    direct_ssh_port: int | None = None
    machine_id: int | None = None
    gpu_name: str | None = None
    dph_total: float = 0.0
    start_date: float | None = None
    raw_status: str | None = Field(default=None, description="the API's own status text")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        d = strip_strings(data)
        raw = d.get("cur_state") or d.get("actual_status") or d.get("status")
        # cur_state is the contract state ("running" while the container still loads): only
        # trust it as running when actual_status agrees or is absent.
        if raw == "running" and "actual_status" in d and d["actual_status"] != "running":
            raw = d["actual_status"]  # null while provisioning: pending
        d["raw_status"] = raw if isinstance(raw, str) else None
        d["status"] = parse_status(raw)
        d["public_ipaddr"] = d.get("public_ipaddr") or d.get("public_ip") or None
        d["ssh_host"] = d.get("ssh_host") or None
        d["ssh_port"] = _int_or_none(d.get("ssh_port"))
        d["direct_ssh_port"] = _direct_port(d.get("ports"))
        d["machine_id"] = _int_or_none(d.get("machine_id"))
        d["dph_total"] = _float(d.get("dph_total"))
        d["start_date"] = _float(d.get("start_date")) or None
        d["label"] = d.get("label") or None
        return d

    def endpoints(self) -> list[SshEndpoint]:
        """SSH endpoints, direct first, then the proxy."""
        out: list[SshEndpoint] = []
        if self.public_ipaddr and self.direct_ssh_port:
            out.append(SshEndpoint(self.public_ipaddr, self.direct_ssh_port, "direct"))
        if self.ssh_host and self.ssh_port:
            out.append(SshEndpoint(self.ssh_host, self.ssh_port, "proxy"))
        return out

    def public(self) -> dict[str, Any]:
        """The contract's JSON shape for `lorabot instances --json`."""
        first = self.endpoints()[0] if self.endpoints() else None
        return {
            "id": self.id,
            "label": self.label,
            "status": self.status.value,
            "ssh_host": first.host if first else None,
            "ssh_port": first.port if first else None,
            "dph_total": round(self.dph_total, 4),
            "machine_id": self.machine_id,
        }


def _direct_port(ports: Any) -> int | None:
    """`ports["22/tcp"][0]["HostPort"]` (a string in practice; may be null or missing)."""
    if not isinstance(ports, dict):
        return None
    mapping = ports.get("22/tcp")
    if isinstance(mapping, list) and mapping:
        first = mapping[0]
        if isinstance(first, dict):
            return _int_or_none(first.get("HostPort"))
        return _int_or_none(first)
    return None


class Balance(BaseModel):
    credit: float = 0.0
    balance: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {"credit": _float(data.get("credit")), "balance": _float(data.get("balance"))}


class RentResult(BaseModel):
    instance_id: int
    offer_id: int
    dph_total: float
    label: str
    machine_id: int | None = None
    gpu_name: str = ""
    geolocation: str = ""
    attempts: int = 1
