"""Pydantic models that normalise Vast.ai's inconsistent payloads (see reference/vastai-api.md).

Everything the rest of lorabot sees goes through these: strings are stripped, the status comes from
`actual_status` as Vast's CLI, SkyPilot and dstack read it (`cur_state` only says stopped or
unloaded; a destroyed row says so in any of the three fields), the IP from `public_ipaddr` before
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
    UNKNOWN = "unknown"  # the host stopped reporting: "will never reach running" once it lasts
    ERROR = "error"  # created/loading with an error in status_msg (OCI runtime, failed, ...)
    GONE = "gone"  # destroyed or never existed

    @property
    def failed(self) -> bool:
        """Will never become usable: destroy it and rent elsewhere (UNKNOWN only after a grace)."""
        return self in (InstanceStatus.STOPPED, InstanceStatus.EXITED, InstanceStatus.OFFLINE,
                        InstanceStatus.ERROR)


_STATUS_MAP = {
    "running": InstanceStatus.RUNNING,
    "stopped": InstanceStatus.STOPPED,
    "exited": InstanceStatus.EXITED,
    "frozen": InstanceStatus.STOPPED,
    "offline": InstanceStatus.OFFLINE,
    "unknown": InstanceStatus.UNKNOWN,
}
# a destroyed contract may still be shown or listed for a while (cur_state "unloaded")
_GONE_WORDS = frozenset({"unloaded", "destroyed", "terminated", "deleted"})
# Vast's own readiness loop (vastai/cli/commands/machines.py) fails on these words in status_msg
_ERROR_WORDS = ("error", "failed", "failure", "exception", "traceback", "oci runtime", "permission denied")


def status_msg_is_error(msg: Any) -> bool:
    return isinstance(msg, str) and any(word in msg.lower() for word in _ERROR_WORDS)


def instance_status(row: dict[str, Any]) -> tuple[InstanceStatus, str | None]:
    """(status, the API's own word for it) from an instance row."""
    words = {k: str(row[k]).strip().lower() for k in ("actual_status", "cur_state", "intended_status", "status")
             if isinstance(row.get(k), str)}
    gone = next((w for w in words.values() if w in _GONE_WORDS), None)
    if gone:
        return InstanceStatus.GONE, gone
    if words.get("cur_state") == "stopped":
        return InstanceStatus.STOPPED, "stopped"
    # actual_status is the container's state (null while provisioning); cur_state is the contract's
    # ("running" from the create on), so it is read only on old shapes without actual_status
    raw = row.get("actual_status") if "actual_status" in row else (row.get("status") or row.get("cur_state"))
    raw = raw.strip() if isinstance(raw, str) else None
    status = parse_status(raw)
    if status == InstanceStatus.PENDING and (raw or "created").lower() in ("created", "loading") \
            and status_msg_is_error(row.get("status_msg")):
        return InstanceStatus.ERROR, raw
    return status, raw


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
    cpu_ram: float = 0.0  # MB of host RAM (0: not given)
    inet_down_cost: float = 0.0  # $/GB downloaded
    inet_up_cost: float = 0.0  # $/GB uploaded
    expected_cost: float | None = None  # this job's expected cost on this offer, filled in by search.rank
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
        for key in ("dph_total", "inet_down", "inet_up", "dlperf", "disk_space", "cuda_max_good", "gpu_ram",
                    "cpu_ram", "inet_down_cost", "inet_up_cost"):
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
        d.pop("expected_cost", None)
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
            "cpu_ram_gb": round(self.cpu_ram / 1000, 1),
            "inet_down_cost": self.inet_down_cost,
            "inet_up_cost": self.inet_up_cost,
            "expected_cost": None if self.expected_cost is None else round(self.expected_cost, 4),
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
    inet_down_cost: float = 0.0
    inet_up_cost: float = 0.0
    start_date: float | None = None
    raw_status: str | None = Field(default=None, description="the API's own status text")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        d = strip_strings(data)
        d["status"], d["raw_status"] = instance_status(d)
        d["public_ipaddr"] = d.get("public_ipaddr") or d.get("public_ip") or None
        d["ssh_host"] = d.get("ssh_host") or None
        d["ssh_port"] = _int_or_none(d.get("ssh_port"))
        d["direct_ssh_port"] = _direct_port(d.get("ports"))
        d["machine_id"] = _int_or_none(d.get("machine_id"))
        d["dph_total"] = _float(d.get("dph_total"))
        d["inet_down_cost"] = _float(d.get("inet_down_cost"))
        d["inet_up_cost"] = _float(d.get("inet_up_cost"))
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
    inet_down_cost: float = 0.0
    inet_up_cost: float = 0.0
    ambiguous: bool = False  # a create went unanswered: re-check the label later for a late rental
