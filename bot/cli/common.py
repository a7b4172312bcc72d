"""Shared plumbing of the CLI: settings with one-line errors, JSON output, running coroutines."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from bot.cli.terminal import plain
from services.settings import Settings, SettingsError, load_settings

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

# exit codes shared by every command
EXIT_OK = 0
EXIT_NOT_READY = 1  # also: a generic failure of the thing asked for
EXIT_USAGE = 2  # bad input, bad settings, rejected archive
EXIT_INFRA = 3  # a provider or the network failed
EXIT_CANCELLED = 4


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line on stderr and exit."""
    # the message may quote a box, Vast.ai or R2: its markup and control characters print as text (L8)
    err_console.print(f"[bold red]error:[/] {plain(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def settings(*required: str, why: str = "") -> Settings:
    try:
        s = load_settings()
        if required:
            s.require(*required, why=why)
        return s
    except SettingsError as exc:
        fail(str(exc))


def print_json(doc: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, default=str) + "\n")
    sys.stdout.flush()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
