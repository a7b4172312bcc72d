"""`lorabot config render`: a FLUX recipe -> an ostris/ai-toolkit job config on stdout."""

from __future__ import annotations

import re
import secrets
import sys
from typing import Annotated

import typer

from bot.cli.common import fail, settings
from services.recipe import PRESETS, FluxRecipe, RecipeError, render_config

config_app = typer.Typer(help="ai-toolkit job configs.", no_args_is_help=True)


def _default_job_name(name: str) -> str:
    # readable and unique: ai-toolkit resumes from any `<name>*` file in the training folder, so a
    # second render of the same name into the same folder would silently continue the old run. The
    # job pipeline passes a unique "lora_<jobid>" instead
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")[:60] or "job"
    return f"lora_{slug}_{secrets.token_hex(3)}"


@config_app.command("render")
def render(
    name: Annotated[str, typer.Option("--name", help="Name of the LoRA (stored in its metadata).")],
    trigger: Annotated[str, typer.Option("--trigger", help="Trigger word the LoRA learns.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (1-10000).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="LoRA rank (1-128); alpha follows.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    preset: Annotated[str, typer.Option("--preset", help=f"One of: {', '.join(PRESETS)}.")] = "character",
    fmt: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    base_model: Annotated[str | None, typer.Option("--base-model", help="dev or schnell.")] = None,
    job_name: Annotated[
        str | None,
        typer.Option("--job-name", help="config.name; must be unique per run (default lora_<name>_<random>)."),
    ] = None,
    dataset_dir: Annotated[
        str | None, typer.Option("--dataset-dir", help="Absolute dataset path on the box.")
    ] = None,
    training_folder: Annotated[
        str | None, typer.Option("--training-folder", help="Absolute output root on the box.")
    ] = None,
) -> None:
    """Print an ai-toolkit job config (job: extension, sd_trainer, FLUX settings) on stdout."""
    # plain str options validated here, so that every bad value is one error line with exit 2
    if fmt not in ("yaml", "json"):
        fail(f"--format must be yaml or json (got {fmt!r})")
    s = settings()
    job = job_name or _default_job_name(name)
    root = s.remote_root.rstrip("/")
    try:
        recipe = FluxRecipe.from_preset(
            preset, name=name, trigger_word=trigger, steps=steps, rank=rank, learning_rate=lr,
            base_model=base_model,
        )
        text = render_config(
            recipe,
            job_name=job,
            dataset_dir=dataset_dir or f"{root}/datasets/{job}",
            training_folder=training_folder or f"{root}/output",
            fmt="json" if fmt == "json" else "yaml",
        )
    except RecipeError as exc:
        fail(str(exc))
    sys.stdout.write(text)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
