"""Checks of this machine: settings, paths, the store, free disk, the SSH key file, the OpenSSH client."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

from pydantic import SecretStr

from services.doctor.core import CheckResult, Doctor, check, failed, passed, warned
from services.settings import Settings

GiB = 1024**3


def guild_ids(s: Settings) -> list[int]:
    """DISCORD_GUILD_ID as a list (one id or several, whichever shape the settings hold)."""
    value = getattr(s, "discord_guild_ids", None) or getattr(s, "discord_guild_id", None)
    if value is None:
        return []
    if isinstance(value, list | tuple | set | frozenset):
        return [int(v) for v in value]
    return [int(value)]


def missing_settings(s: Settings, *, discord: bool) -> list[str]:
    """Required variables that are not set, by their environment names: Discord's, or the others."""
    need = {
        "DISCORD_TOKEN": s.discord_token,
        "DISCORD_GUILD_ID": guild_ids(s) or None,
    } if discord else {
        "VASTAI_API_KEY": s.vastai_api_key,
        "R2_BUCKET": s.r2_bucket,
        "R2_ACCESS_KEY_ID": s.r2_access_key_id,
        "R2_SECRET_ACCESS_KEY": s.r2_secret_access_key,
        "R2_ACCOUNT_ID (or R2_ENDPOINT_URL)": s.r2_account_id or s.r2_endpoint_url,
        "HF_TOKEN": s.hf_token,
    }
    out = []
    for name, value in need.items():
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw in (None, "", []):
            out.append(name)
    return out


def min_free_bytes(s: Settings) -> int:
    """Free disk intake needs: LORABOT_MIN_FREE_DISK_GB where the settings have it, else the largest
    dataset twice (the upload and its unpacked copy)."""
    configured = getattr(s, "min_free_disk_gb", None)
    return int(float(configured) * GiB) if configured is not None else 2 * s.dataset_max_bytes


FILL = "fill them in .env (cp .env.example .env; README \"First run\" says where each comes from)"


@check("settings.discord", local=True, critical=True)
async def discord_settings(doc: Doctor) -> CheckResult:
    missing = missing_settings(doc.settings, discord=True)
    if missing:
        return failed(f"not set: {', '.join(missing)}", FILL)
    return passed(f"DISCORD_TOKEN set, {len(guild_ids(doc.settings))} guild(s) in DISCORD_GUILD_ID")


@check("settings", local=True)
async def settings_present(doc: Doctor) -> CheckResult:
    missing = missing_settings(doc.settings, discord=False)
    if missing:
        return failed(f"not set: {', '.join(missing)}", FILL)
    return passed("Vast.ai, R2 and Hugging Face variables are set")


@check("settings.paths", local=True, critical=True)
async def paths(doc: Doctor) -> CheckResult:
    s = doc.settings
    db, work = s.db_path.expanduser().absolute(), s.work_dir.expanduser().absolute()
    for what, folder in (("LORABOT_DB_PATH", db.parent), ("LORABOT_WORK_DIR", work)):
        try:
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            return failed(f"{what}: cannot create {folder} ({exc.strerror})", f"point {what} at a writable folder")
        if not os.access(folder, os.W_OK):
            return failed(f"{what}: {folder} is not writable", f"point {what} at a writable folder")
    return passed(f"store {db}, work dir {work}, key {s.ssh_key_path.absolute()}")


@check("store", local=True, critical=True, needs=("settings.paths",))
async def store_opens(doc: Doctor) -> CheckResult:
    from services.jobs import JobStore

    path = doc.settings.db_path.expanduser().absolute()
    try:
        async with JobStore(path) as store:
            jobs = await store.find(limit=1)
    except Exception as exc:
        return failed(f"{path} does not open: {type(exc).__name__}: {exc}",
                      "LORABOT_DB_PATH must be a lorabot store (or a new file) on a local disk")
    return passed(f"{path} opens and is migrated" + (" (has jobs)" if jobs else " (no jobs yet)"))


@check("disk", local=True, needs=("settings.paths",))
async def free_disk(doc: Doctor) -> CheckResult:
    work = doc.settings.work_dir.expanduser().absolute()
    free = (await asyncio.to_thread(shutil.disk_usage, work)).free
    need = min_free_bytes(doc.settings)
    if free < need:
        return failed(f"{free / GiB:.1f} GiB free under {work}, datasets need {need / GiB:.1f} GiB",
                      "free some disk, or point LORABOT_WORK_DIR at a bigger disk")
    return passed(f"{free / GiB:.1f} GiB free under {work} (datasets need {need / GiB:.1f} GiB)")


def _key_problem(key: Path) -> tuple[str, str] | None:
    """What is wrong with the private key file and its .pub, as (detail, fix); None when all is right."""
    import asyncssh

    make = f"ssh-keygen -t ed25519 -N '' -f {key}"
    pub = Path(str(key) + ".pub")
    if not key.is_file():
        return f"VASTAI_SSH_KEY_PATH: no key at {key}", f"make one: {make}"
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        return f"{key} is readable by others (mode {mode:04o}); ssh refuses such keys", f"chmod 600 {key}"
    if not pub.is_file():
        return f"{pub} is missing (the public half the rented machine trusts)", f"ssh-keygen -y -f {key} > {pub}"
    try:
        private = asyncssh.read_private_key(key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        if "passphrase" in str(exc).lower():
            return f"{key} has a passphrase; the bot cannot type it", f"make a key without one: {make}"
        return f"{key} is not a private key ({exc})", f"make one: {make}"
    except OSError as exc:
        return f"{key} cannot be read ({exc.strerror})", f"let the bot's user read it: chmod 600 {key}"
    try:
        public = asyncssh.read_public_key(pub)
    except (asyncssh.KeyImportError, ValueError, OSError):
        return f"{pub} is not a public key", f"ssh-keygen -y -f {key} > {pub}"
    if private.public_data != public.public_data:
        return f"{pub} is not the public half of {key}", f"ssh-keygen -y -f {key} > {pub}"
    return None


@check("ssh.key", local=True, critical=True)
async def ssh_key_file(doc: Doctor) -> CheckResult:
    key = doc.settings.ssh_key_path
    problem = await asyncio.to_thread(_key_problem, key)
    if problem is not None:
        return failed(*problem)
    return passed(f"{key} (0600) and its .pub match")


@check("openssh", local=True)
async def openssh_client(doc: Doctor) -> CheckResult:
    found = shutil.which("ssh")
    if found is None:
        return warned("the OpenSSH client `ssh` is not installed: datasets go over the slower built-in path, "
                      "and `lorabot ssh` cannot work", "apt-get install openssh-client")
    return passed(f"{found} (the fast dataset path)")
