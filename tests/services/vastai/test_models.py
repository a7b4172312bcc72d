"""Normalisation of odd-but-valid payloads (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.vastai.models import Instance, InstanceStatus, Offer, parse_status

ws = st.sampled_from(["", " ", "\n", " \n", "\t"])
statuses = st.one_of(st.none(), st.sampled_from(
    ["running", "loading", "created", "exited", "offline", "stopped", "frozen", "rebooting", "unknown", "weird",
     "RUNNING", ""]))


@given(
    status=statuses, field=st.sampled_from(["actual_status", "cur_state", "status"]), pad=ws,
    ip=st.sampled_from(["1.2.3.4", "10.0.0.1"]), ip_field=st.sampled_from(["public_ipaddr", "public_ip"]),
    port=st.one_of(st.none(), st.integers(1, 65535)), port_as_str=st.booleans(),
    ssh_port=st.one_of(st.none(), st.integers(1, 65535), st.integers(1, 65535).map(str)),
    label=st.one_of(st.none(), st.text(min_size=0, max_size=20)),
)
def test_instance_normalisation(status: str | None, field: str, pad: str, ip: str, ip_field: str,
                                port: int | None, port_as_str: bool, ssh_port: Any, label: str | None) -> None:
    payload: dict[str, Any] = {"id": 5, field: (status + pad) if status else status, ip_field: ip + pad,
                               "ssh_host": "ssh4.vast.ai" + pad, "ssh_port": ssh_port, "label": label,
                               "instance_api_key": "SECRET"}
    if port is not None:
        payload["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port) if port_as_str else port}]}
    inst = Instance.model_validate(payload)
    assert inst.status == parse_status(status)
    assert inst.status in set(InstanceStatus)
    assert inst.public_ipaddr == ip
    eps = inst.endpoints()
    if port is not None:
        assert eps[0].kind == "direct" and eps[0].port == port and eps[0].host == ip
    if ssh_port is not None:
        assert eps[-1].kind == "proxy" and eps[-1].host == "ssh4.vast.ai"
    assert "SECRET" not in inst.model_dump_json()
    if label is not None:
        assert inst.label == (label.strip() or None)


def test_unknown_status_is_pending_and_cur_state_running_defers_to_actual() -> None:
    assert Instance.model_validate({"id": 1, "actual_status": "mystery"}).status == InstanceStatus.PENDING
    assert Instance.model_validate({"id": 1, "cur_state": "running", "actual_status": "loading"}).status == "pending"
    assert Instance.model_validate({"id": 1}).status == InstanceStatus.PENDING


@given(
    price=st.one_of(st.floats(0, 10, allow_nan=False), st.floats(0, 10, allow_nan=False).map(str)),
    rel_key=st.sampled_from(["reliability", "reliability2"]),
    geo=st.sampled_from(["Texas, US", "US", "", "Quebec, CA\n"]),
    pad=ws,
)
def test_offer_normalisation(price: Any, rel_key: str, geo: str, pad: str) -> None:
    offer = Offer.model_validate({"ask_contract_id": 9, "gpu_name": "RTX 4090" + pad, "dph_total": price,
                                  rel_key: "0.99", "geolocation": geo, "score": 999})
    assert offer.id == 9 and offer.gpu_name == "RTX 4090"
    assert abs(offer.dph_total - float(price)) < 1e-9
    assert offer.reliability == 0.99 and offer.score == 0.0
    assert offer.region in ("US", "CA", "")
