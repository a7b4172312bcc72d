"""The `lorabot` command line: one typer app, with commands grouped by domain in sibling modules.

Each module exposes `register(app)`; this keeps front-end code thin and lets every domain own its
commands, grouped by what the operator does: vast (offers/rent/...), dataset, config, ssh (push-dataset),
jobs (jobs/reconcile), train (train/launch, driven by foreground.py with progress.py's notifier),
shell (ssh into a job's box), watch (status/cancel/logs), setup (doctor/invite), demo, run. jobkit.py
holds what the job commands share.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="lorabot",
    help="Train FLUX LoRAs on rented GPUs: operator tools for the lorabot Discord bot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_MODULES = ("vast", "dataset", "config", "ssh", "jobs", "train", "shell", "watch", "setup", "demo", "run")

for _name in _MODULES:
    importlib.import_module(f"bot.cli.{_name}").register(app)


def main() -> None:
    app()
