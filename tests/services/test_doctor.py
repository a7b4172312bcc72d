"""`lorabot doctor`: every check against the stand-ins over real sockets (Vast.ai emulator, moto S3, the fake
Discord, the fake Hugging Face Hub), a passing and a failing case each; a failing result names its fix."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import boto3
import pytest

from bot.cli.setup import _one_line, required_permissions
from services.doctor import CheckResult, Doctor, run_checks
from services.settings import load_settings
from tests.sim.discord import FakeDiscord
from tests.sim.hf import FakeHub
from tests.sim.s3 import S3Server, run_s3_server
from tests.sim.vast import VastEmulator

APP_ID = 900_000_000_000_000_100
# a bot token's first segment is the base64 of the application id (what `lorabot invite` reads)
TOKEN = base64.b64encode(str(APP_ID).encode()).decode().rstrip("=") + ".GxYzAb.fake-signature-0123456789"
HF = "hf_" + "f" * 34
DEV = "black-forest-labs/FLUX.1-dev"


def make_key(path: Path) -> Path:
    """An ed25519 key pair as `ssh-keygen -t ed25519 -N '' -f path` makes it (0600 + .pub)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key(str(path))
    path.chmod(0o600)
    key.write_public_key(str(path) + ".pub")
    return path


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """Its own S3 server: the scope check lists buckets, which other tests' servers may hold."""
    with run_s3_server(bucket="doctor-bucket") as server:
        yield server


@dataclass
class Stands:
    vast: VastEmulator
    discord: FakeDiscord
    hub: FakeHub
    s3: S3Server
    root: Path

    def env(self) -> dict[str, str]:
        """Everything an operator's .env holds, pointed at the stand-ins."""
        return {
            "VASTAI_API_KEY": self.vast.api_key, "VASTAI_API_URL": self.vast.url,
            "VASTAI_SSH_KEY_PATH": str(self.root / "ssh" / "lorabot"),
            "LORABOT_VASTAI_BACKOFF_S": "0.01", "LORABOT_VASTAI_MIN_INTERVAL_S": "0", "LORABOT_VASTAI_MAX_RETRIES": "1",
            "LORABOT_MAX_PRICE": "2.0",
            "DISCORD_TOKEN": self.discord.token, "DISCORD_GUILD_ID": str(self.discord.guild_id),
            "LORABOT_DISCORD_API_BASE": self.discord.api_base,
            **self.s3.env(),
            "HF_TOKEN": HF, "HF_ENDPOINT": self.hub.url,
            "LORABOT_DB_PATH": str(self.root / "data" / "lorabot.sqlite3"),
            "LORABOT_WORK_DIR": str(self.root / "data" / "work"),
            # the disk check must not depend on the test machine's free space
            "LORABOT_DATASET_MAX_BYTES": str(64 * 2**20), "LORABOT_MIN_FREE_DISK_GB": "0.1",
        }


@pytest.fixture
def stands(tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stands]:
    with VastEmulator() as vast, FakeDiscord(token=TOKEN) as discord, FakeHub() as hub:
        hub.add_token(HF, user="operator", role="fineGrained")
        hub.accept("operator", DEV)
        discord.commands[str(discord.guild_id)] = [{"name": n} for n in ("offers", "train", "status", "cancel")]
        st = Stands(vast, discord, hub, s3, tmp_path)
        make_key(tmp_path / "ssh" / "lorabot")
        for k, v in st.env().items():
            monkeypatch.setenv(k, v)
        yield st


def doctor(select: str | Callable[[str], bool] = "", **env: str | None) -> dict[str, CheckResult]:
    """Run the checks whose name starts with `select` (with their prerequisites' facts), with `env` changed
    for this run only."""
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        doc = Doctor(load_settings(), required_permissions=required_permissions())
        pick = select if callable(select) else (lambda n: n.startswith(select))
        results = asyncio.run(run_checks(doc, select=pick))
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
    return {r.name: r for r in results}


def bad(r: CheckResult, *, fix: str) -> None:
    """A failing result: ✗, and its one line names the fix."""
    assert not r.ok and not r.skipped, r
    assert fix in r.fix and fix in _one_line(r), r


def warn(r: CheckResult, *, fix: str) -> None:
    assert r.ok and r.warn and fix in _one_line(r), r


def good(r: CheckResult) -> None:
    assert r.ok and not r.warn, r


def test_all_green_against_the_stand_ins(stands: Stands) -> None:
    results = doctor()
    assert all(r.ok and not r.warn for r in results.values()), [_one_line(r) for r in results.values() if r.warn
                                                                or not r.ok]
    names = set(results)
    assert {"settings.discord", "settings", "settings.paths", "store", "disk", "ssh.key", "openssh", "vast.key",
            "vast.credit", "vast.ssh_key", "vast.offers", "r2.bucket", "r2.roundtrip", "r2.presigned", "r2.public",
            "r2.scope", "hf.token", "hf.model", "discord.token", "discord.public_bot",
            f"discord.guild {stands.discord.guild_id}", f"discord.commands {stands.discord.guild_id}"} <= names
    assert "a typical first job" in results["vast.offers"].detail and "$" in results["vast.offers"].detail
    # it spent nothing and left nothing behind
    assert stands.vast.live_instances() == []
    left = boto3.client("s3", endpoint_url=stands.s3.endpoint_url, aws_access_key_id="x", aws_secret_access_key="y",
                        region_name="us-east-1").list_objects_v2(Bucket=stands.s3.bucket, Prefix="doctor/")
    assert left.get("KeyCount", 0) == 0


# --- settings and this machine ---------------------------------------------------------------------
def test_settings_missing(stands: Stands) -> None:
    r = doctor("settings", DISCORD_GUILD_ID=None, HF_TOKEN=None)
    bad(r["settings.discord"], fix="fill them in .env")
    assert "DISCORD_GUILD_ID" in r["settings.discord"].detail and "DISCORD_TOKEN" not in r["settings.discord"].detail
    bad(r["settings"], fix="README")
    assert "HF_TOKEN" in r["settings"].detail


def test_paths_and_store(stands: Stands) -> None:
    good(doctor("settings.paths")["settings.paths"])
    a_file = stands.root / "file"
    a_file.write_text("x")
    bad(doctor("settings.paths", LORABOT_WORK_DIR=str(a_file / "work"))["settings.paths"], fix="writable folder")
    good(doctor(lambda n: n in ("settings.paths", "store"))["store"])
    junk = stands.root / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    r = doctor(lambda n: n in ("settings.paths", "store"), LORABOT_DB_PATH=str(junk))
    bad(r["store"], fix="LORABOT_DB_PATH")


def test_disk(stands: Stands) -> None:
    good(doctor(lambda n: n in ("settings.paths", "disk"))["disk"])
    r = doctor(lambda n: n in ("settings.paths", "disk"), LORABOT_DATASET_MAX_BYTES=str(10**18),
               LORABOT_MIN_FREE_DISK_GB=str(10**9))
    bad(r["disk"], fix="LORABOT_WORK_DIR")


def test_ssh_key_file(stands: Stands) -> None:
    key = stands.root / "ssh" / "lorabot"
    good(doctor("ssh.key")["ssh.key"])
    key.chmod(0o644)
    bad(doctor("ssh.key")["ssh.key"], fix=f"chmod 600 {key}")
    key.chmod(0o600)
    other = make_key(stands.root / "other" / "k")
    Path(str(key) + ".pub").write_text(Path(str(other) + ".pub").read_text())
    bad(doctor("ssh.key")["ssh.key"], fix=f"ssh-keygen -y -f {key}")
    Path(str(key) + ".pub").unlink()
    bad(doctor("ssh.key")["ssh.key"], fix=f"ssh-keygen -y -f {key}")
    bad(doctor("ssh.key", VASTAI_SSH_KEY_PATH=str(stands.root / "none"))["ssh.key"], fix="ssh-keygen -t ed25519")


def test_openssh_client(stands: Stands, tmp_path: Path) -> None:
    good(doctor("openssh")["openssh"])
    empty = tmp_path / "bin"
    empty.mkdir()
    warn(doctor("openssh", PATH=str(empty))["openssh"], fix="apt-get install openssh-client")


# --- Vast.ai ---------------------------------------------------------------------------------------
def test_vast_key(stands: Stands) -> None:
    good(doctor("vast.key")["vast.key"])
    r = doctor("vast", VASTAI_API_KEY="wrong-key")
    bad(r["vast.key"], fix="cloud.vast.ai/manage-keys")
    # what needs the key is not checked, and says what to fix first
    assert r["vast.offers"].skipped and "vast.key" in _one_line(r["vast.offers"])


def test_vast_credit(stands: Stands) -> None:
    good(doctor("vast.")["vast.credit"])
    stands.vast.credit = 1.0
    warn(doctor("vast.")["vast.credit"], fix="cloud.vast.ai/billing")
    stands.vast.credit = 0.0
    bad(doctor("vast.")["vast.credit"], fix="cloud.vast.ai/billing")


def test_vast_ssh_key_registration(stands: Stands) -> None:
    sel = lambda n: n.startswith("vast.") or n == "ssh.key"  # noqa: E731
    pub = Path(stands.env()["VASTAI_SSH_KEY_PATH"] + ".pub").read_text().strip()
    r = doctor(sel)["vast.ssh_key"]
    good(r)
    assert "registered it now" in r.detail and [k["key"] for k in stands.vast.account_keys] == [pub]
    r = doctor(sel)["vast.ssh_key"]
    good(r)
    assert "is registered" in r.detail and len(stands.vast.account_keys) == 1  # never twice
    r = doctor(sel, VASTAI_SSH_KEY_PATH=str(stands.root / "missing"))["vast.ssh_key"]
    assert r.skipped and "fix `ssh.key` first" in _one_line(r)


def test_vast_ssh_key_that_cannot_be_registered(stands: Stands) -> None:
    sel = lambda n: n.startswith("vast.") or n == "ssh.key"  # noqa: E731
    stands.vast.team_key = True
    bad(doctor(sel)["vast.ssh_key"], fix="use a personal API key")
    stands.vast.team_key = False
    stands.vast.forbidden_paths.add("/api/v0/ssh/")
    bad(doctor(sel)["vast.ssh_key"], fix="permission for SSH keys")
    assert stands.vast.account_keys == []


def test_vast_offers(stands: Stands) -> None:
    r = doctor("vast.")["vast.offers"]
    good(r)
    assert "cheapest $" in r.detail
    bad(doctor("vast.", LORABOT_MAX_PRICE="0.01")["vast.offers"], fix="raise LORABOT_MAX_PRICE")


# --- R2 --------------------------------------------------------------------------------------------
def test_r2_bucket_and_roundtrip(stands: Stands) -> None:
    r = doctor("r2.")
    good(r["r2.bucket"])
    good(r["r2.roundtrip"])
    good(r["r2.presigned"])
    r = doctor("r2.", R2_BUCKET="no-such-bucket")
    bad(r["r2.bucket"], fix="R2 > Create bucket")
    assert r["r2.roundtrip"].skipped and r["r2.presigned"].skipped and "r2." in r["r2.presigned"].fix


def test_r2_public_url(stands: Stands) -> None:
    s3 = stands.s3
    good(doctor("r2.")["r2.public"])  # not set: presigned links
    public = f"{s3.endpoint_url}/{s3.bucket}"
    # the bucket is private: what R2 serves on a domain that is not connected to the bucket
    bad(doctor("r2.", R2_PUBLIC_BASE_URL=public)["r2.public"], fix="Public access")
    # connecting the domain makes objects readable by anyone (a public-read policy in S3 terms)
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1")
    client.put_bucket_policy(Bucket=s3.bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{s3.bucket}/*"}]}))
    try:
        good(doctor("r2.", R2_PUBLIC_BASE_URL=public)["r2.public"])
    finally:
        client.delete_bucket_policy(Bucket=s3.bucket)


def test_r2_token_scope(stands: Stands) -> None:
    good(doctor("r2.")["r2.scope"])
    client = boto3.client("s3", endpoint_url=stands.s3.endpoint_url, aws_access_key_id="x",
                          aws_secret_access_key="y", region_name="us-east-1")
    client.create_bucket(Bucket="somebody-elses")
    try:
        r = doctor("r2.")["r2.scope"]
        warn(r, fix="Object Read & Write")
        assert "somebody-elses" in r.detail
    finally:
        client.delete_bucket(Bucket="somebody-elses")


# --- Hugging Face ----------------------------------------------------------------------------------
def test_hf_token(stands: Stands) -> None:
    good(doctor("hf.")["hf.token"])
    bad(doctor("hf.", HF_TOKEN="hf_revoked")["hf.token"], fix="huggingface.co/settings/tokens")
    stands.hub.add_token("hf_write", user="operator", role="write")
    warn(doctor("hf.", HF_TOKEN="hf_write")["hf.token"], fix="fine-grained")
    assert stands.hub.requests.count("whoami") == 3


def test_hf_model_licence(stands: Stands) -> None:
    good(doctor("hf.")["hf.model"])
    stands.hub.accepted.clear()
    r = doctor("hf.")["hf.model"]
    bad(r, fix="accept the licence")
    assert DEV in r.detail and f"auth-check {DEV}" in stands.hub.requests


# --- Discord ---------------------------------------------------------------------------------------
def test_discord_token(stands: Stands) -> None:
    good(doctor("discord.")["discord.token"])
    bad(doctor("discord.", DISCORD_TOKEN="not-the-token")["discord.token"], fix="Reset Token")


def test_discord_public_bot(stands: Stands) -> None:
    good(doctor("discord.")["discord.public_bot"])
    stands.discord.bot_public = True
    warn(doctor("discord.")["discord.public_bot"], fix="turn Public Bot off")


def test_discord_guild_membership_and_permissions(stands: Stands) -> None:
    name = f"discord.guild {stands.discord.guild_id}"
    good(doctor("discord.")[name])
    stands.discord.guild_permissions = 1 << 10  # view_channel only
    r = doctor("discord.")[name]
    bad(r, fix="lorabot invite")
    assert "attach_files" in r.detail and "create_public_threads" in r.detail
    stands.discord.guild_permissions = 1 << 3  # administrator
    good(doctor("discord.")[name])
    stands.discord.guild_permissions = None
    r = doctor("discord.")[name]
    bad(r, fix="lorabot invite")
    assert "not a member" in r.detail


def test_discord_commands(stands: Stands) -> None:
    name = f"discord.commands {stands.discord.guild_id}"
    r = doctor("discord.")[name]
    good(r)
    assert "/train" in r.detail
    stands.discord.commands.clear()
    warn(doctor("discord.")[name], fix="`lorabot run` registers them")


def test_r2_read_only_token_and_unservable_presigned_links(stands: Stands, s3_auth_server: S3Server) -> None:
    """moto checking signatures: a read-only token fails the round trip; the full one passes it, and a
    presigned GET (which this server cannot serve, it wants an Authorization header) fails as from outside."""
    a = s3_auth_server
    iam = boto3.client("iam", endpoint_url=a.endpoint_url, aws_access_key_id=a.access_key_id,
                       aws_secret_access_key=a.secret_access_key, region_name="us-east-1")
    user = "reader-" + os.urandom(4).hex()
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"],
                                                "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    r = doctor("r2.", R2_ENDPOINT_URL=a.endpoint_url, R2_BUCKET=a.bucket, R2_ACCESS_KEY_ID=key["AccessKeyId"],
               R2_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    good(r["r2.bucket"])
    bad(r["r2.roundtrip"], fix="Object Read & Write")
    r = doctor("r2.", R2_ENDPOINT_URL=a.endpoint_url, R2_BUCKET=a.bucket, R2_ACCESS_KEY_ID=a.access_key_id,
               R2_SECRET_ACCESS_KEY=a.secret_access_key)
    good(r["r2.roundtrip"])
    bad(r["r2.presigned"], fix="R2_ENDPOINT_URL")
