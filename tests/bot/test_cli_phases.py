"""`lorabot status JOB` shows where a job's time went (issue 18): a compact line, the table with --phases."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from bot.cli import app
from services.jobs import JobState, JobStore
from services.jobs.model import Job
from services.quote import quote
from services.recipe import FluxRecipe
from services.settings import load_settings


def _stored_job(db: Path) -> str:
    q = quote(FluxRecipe(name="cat", trigger_word="sks", steps=1000), dph_total=0.4, inet_down_mbps=500,
              dataset_bytes=20_000_000, gpu_name="RTX 4090", settings=load_settings(_env_file=None))
    job = Job(name="cat", state=JobState.SUCCEEDED, quote=q.model_dump(mode="json"), billed_s=3000.0,
              measured={"phases": {"create_to_running": 200.0, "model_download": 3000.0, "training": 1000.0},
                        "prefetch_bytes": 33_750_000_000})

    async def go() -> str:
        async with JobStore(db) as store:
            return (await store.create(job)).id

    return asyncio.run(go())


def test_status_shows_the_phase_line_and_the_table_on_request(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    job_id = _stored_job(db)
    env = {"LORABOT_DB_PATH": str(db), "COLUMNS": "200"}
    plain = CliRunner().invoke(app, ["status", job_id], env=env)
    assert plain.exit_code == 0, plain.output
    assert "phases: boot 3m20s · model 50m (est" in plain.output and "model_download" not in plain.output
    full = CliRunner().invoke(app, ["status", job_id, "--phases"], env=env)
    assert full.exit_code == 0, full.output
    assert "model_download" in full.output and "outside training" in full.output and "33.75G" in full.output
    doc = json.loads(CliRunner().invoke(app, ["status", job_id, "--json"], env=env).stdout)
    assert doc["breakdown"]["billed_outside_training_s"] == 2000.0
    assert doc["breakdown"]["bytes_downloaded"] == 33_750_000_000
