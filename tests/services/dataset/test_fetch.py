"""URL intake: address filtering, https only, size caps, redirects, against a local TLS server."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.dataset import DatasetError, address_refusal, fetch_url, prepare
from services.settings import Settings

from .corpus import basic_entries, make_zip

ZIP = make_zip(basic_entries(3))


@pytest.mark.parametrize(
    ("address", "code"),
    [
        ("127.0.0.1", "url_loopback"),
        ("127.8.9.10", "url_loopback"),
        ("::1", "url_loopback"),
        ("::ffff:127.0.0.1", "url_loopback"),
        ("10.1.2.3", "url_private"),
        ("172.16.0.1", "url_private"),
        ("192.168.1.1", "url_private"),
        ("fd12:3456::1", "url_private"),
        ("169.254.169.254", "url_metadata"),
        ("fd00:ec2::254", "url_metadata"),
        ("100.100.100.200", "url_metadata"),
        ("169.254.10.10", "url_link_local"),
        ("fe80::1", "url_link_local"),
        ("100.64.0.1", "url_reserved"),
        ("224.0.0.1", "url_reserved"),
        ("2002:7f00:1::", "url_loopback"),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str, code: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))
    assert refusal is not None and refusal[0] == code


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "162.159.130.233"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_allow_loopback_allows_only_loopback() -> None:
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert address_refusal(ipaddress.ip_address("10.0.0.1"), allow_loopback=True) is not None
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), allow_loopback=True) is not None


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://example.com/a.zip", "url_scheme"),
        ("ftp://example.com/a.zip", "url_scheme"),
        ("file:///etc/passwd", "url_scheme"),
        ("https://127.0.0.1/a.zip", "url_loopback"),
        ("https://localhost/a.zip", "url_loopback"),
        ("https://169.254.169.254/latest/meta-data/", "url_metadata"),
        ("https://[::ffff:10.0.0.1]/a.zip", "url_private"),
        ("https://10.0.0.1:8443/a.zip", "url_private"),
    ],
)
async def test_refused_urls(tmp_path: Path, cfg: Settings, url: str, code: str) -> None:
    dest = tmp_path / "d.zip"
    with pytest.raises(DatasetError) as err:
        await fetch_url(url, dest, cfg, 1024)
    assert err.value.code == code
    assert not dest.exists()


# --- a real TLS server on loopback ------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        assert isinstance(self.server, ThreadingHTTPServer)
        port = self.server.server_port
        routes = {
            "/ds.zip": (200, {"Content-Length": str(len(ZIP))}, ZIP),
            "/big": (200, {"Content-Length": str(10**9)}, b""),
            "/redirect-ok": (302, {"Location": "/ds.zip", "Content-Length": "0"}, b""),
            "/redirect-http": (302, {"Location": f"http://127.0.0.1:{port}/ds.zip", "Content-Length": "0"}, b""),
            "/redirect-meta": (302, {"Location": "https://169.254.169.254/", "Content-Length": "0"}, b""),
        }
        if self.path == "/endless":  # no length: the cap must stop the stream
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        status, headers, body = routes.get(self.path, (404, {"Content-Length": "0"}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(tmp)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://localhost:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_cfg(cfg: Settings, https_server: tuple[str, Path]) -> Settings:
    return cfg.model_copy(update={"allow_loopback_urls": True, "dataset_url_ca_bundle": https_server[1]})


async def test_prepare_from_https_url(tmp_path: Path, tls_cfg: Settings, https_server: tuple[str, Path]) -> None:
    base, _ = https_server
    prepared = await prepare(f"{base}/redirect-ok", tmp_path / "work", tls_cfg, "ohwx")
    assert prepared.report.ready and prepared.report.images == 3
    assert not (tmp_path / "work" / ".raw").exists()


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/big", "url_too_large"),
        ("/endless", "url_too_large"),
        ("/missing", "url_status"),
        ("/redirect-http", "url_scheme"),
        ("/redirect-meta", "url_metadata"),
    ],
)
async def test_fetch_refusals_from_a_live_server(
    tmp_path: Path, tls_cfg: Settings, https_server: tuple[str, Path], path: str, code: str
) -> None:
    dest = tmp_path / "d.zip"
    with pytest.raises(DatasetError) as err:
        await fetch_url(https_server[0] + path, dest, tls_cfg, 1024 * 1024)
    assert err.value.code == code
    assert not dest.exists()


async def test_certificate_is_verified(tmp_path: Path, cfg: Settings, https_server: tuple[str, Path]) -> None:
    no_ca = cfg.model_copy(update={"allow_loopback_urls": True})  # loopback allowed, cert not trusted
    with pytest.raises(DatasetError) as err:
        await fetch_url(https_server[0] + "/ds.zip", tmp_path / "d.zip", no_ca, 1024 * 1024)
    assert err.value.code == "url_failed" and "CERTIFICATE" in err.value.message.upper()


async def test_loopback_refused_without_the_setting(
    cfg: Settings, tmp_path: Path, https_server: tuple[str, Path]
) -> None:
    with pytest.raises(DatasetError) as err:
        await fetch_url(https_server[0] + "/ds.zip", tmp_path / "d.zip", cfg, 1024 * 1024)
    assert err.value.code == "url_loopback"
