"""The bot's side of the model prefetch (issue 18): ship `prefetch.py`, start it detached, read its status.

The prefetch only ever saves time: a failed prefetch is logged by the caller and the job goes on (the
trainer then downloads the model itself). A command that hangs is the box's fault, not the prefetch's:
each is bounded by the box command timeout (LORABOT_BOX_COMMAND_TIMEOUT_S, at most 60 s) and its
CommandTimeout makes the job's infrastructure retry, as any other hung box command does.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from pathlib import Path
from typing import Any

from services.recipe import FluxRecipe
from services.settings import Settings
from services.ssh import Box

PREFETCH_SOURCE = Path(__file__).resolve().parent / "prefetch.py"


def repo_of(recipe: FluxRecipe) -> str | None:
    """The Hugging Face repo ai-toolkit will load, or None (a local model path: nothing to fetch)."""
    path = recipe.model_name_or_path
    if path.startswith("/") or path.count("/") != 1:
        return None
    return path


def trainer_env(settings: Settings) -> dict[str, str]:
    """What the trainer needs so that it finds the prefetched cache."""
    return {"HF_HOME": settings.remote_hf_home} if settings.remote_hf_home else {}


async def start(box: Box, job_dir: str, settings: Settings, repo: str) -> dict[str, Any]:
    script = posixpath.join(job_dir, "prefetch.py")
    source = await asyncio.to_thread(PREFETCH_SOURCE.read_bytes)
    await box.put_bytes(source, script, 0o755)
    argv = [settings.remote_python, script, "start", "--job-dir", job_dir, "--repo", repo,
            "--aitoolkit", settings.aitoolkit_dir]
    if settings.remote_hf_home:
        argv += ["--hf-home", settings.remote_hf_home]
    token = settings.hf_token.get_secret_value() if settings.hf_token else ""
    # the token travels on stdin: never in argv (visible in ps) nor in a file of its own
    res = await box.run(argv, input=token + "\n", timeout=_bound(box))
    return _parse(res.stdout)


async def status(box: Box, job_dir: str, settings: Settings) -> dict[str, Any]:
    script = posixpath.join(job_dir, "prefetch.py")
    res = await box.run(["sh", "-c", '[ -f "$1" ] || { echo \'{"state": "absent"}\'; exit 0; }; '
                         'exec "$2" "$1" status --job-dir "$3"', "sh", script, settings.remote_python, job_dir],
                        check=False, timeout=_bound(box))
    return _parse(res.stdout)


def _bound(box: Box) -> float:
    """One prefetch command: it only starts a detached process or reads a small file."""
    return min(60.0, box.command_timeout)


def _parse(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {"state": "unknown"}
    return doc if isinstance(doc, dict) else {"state": "unknown"}


def measured_from(status: dict[str, Any]) -> tuple[float, int] | None:
    """(seconds, bytes really fetched) of a finished prefetch; None while it runs or when it failed."""
    if status.get("state") != "done":
        return None
    started, finished = status.get("started_at"), status.get("finished_at")
    if not (isinstance(started, int | float) and isinstance(finished, int | float)):
        return None
    return max(0.0, finished - started), int(status.get("bytes_fetched") or 0)
