"""This host's own files: the store and the work folder hold people's photos, presigned links and
host keys, so they are the operator's alone (review L5); and a private key others can read is one
OpenSSH refuses, which the operator should hear about at start, not as a slower fallback later."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def key_permission_problem(path: Path) -> str | None:
    """A line saying why the private key at `path` is exposed, or None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # a missing key is reported where it is used
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"the SSH private key {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
                f"OpenSSH refuses such keys; run chmod 600 {path}")
    return None


def warn_on_exposed_key(path: Path) -> None:
    problem = key_permission_problem(path)
    if problem:
        log.warning("%s", problem)


def free_gb(path: Path) -> float:
    """Free space on the disk holding `path` (its nearest existing parent), in GB."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 1e9
