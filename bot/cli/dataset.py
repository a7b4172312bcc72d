"""`lorabot dataset check|pack`: judge a dataset before any money is spent, and pack it.

Exit codes (../shared/cli-contract.md): 0 ready, 1 not ready (problems listed), 2 input rejected.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from bot.cli.common import EXIT_NOT_READY, EXIT_OK, EXIT_USAGE, err_console, fail, print_json, run, settings
from services.dataset import DatasetError, DatasetReport, PreparedDataset, pack, prepare, rejected_report
from services.settings import Settings

dataset_app = typer.Typer(help="Check and pack training datasets.", no_args_is_help=True)

SourceArg = Annotated[str, typer.Argument(help="zip file, folder, or https URL")]
TriggerOpt = Annotated[str | None, typer.Option("--trigger", help="the LoRA's trigger word")]


def _prepare(source: str, work: Path, cfg: Settings, trigger: str | None) -> PreparedDataset:
    return run(prepare(source, work, cfg, trigger))


def _print_report(report: DatasetReport) -> None:
    err_console.print(report.summary, highlight=False, markup=False)
    for p in report.problems:
        where = f"{p.path}: " if p.path else ""
        err_console.print(f"  {p.severity.value} {p.code}: {where}{p.message}", highlight=False, markup=False)


def _work_dir(cfg: Settings) -> tempfile.TemporaryDirectory[str]:
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="dataset-", dir=cfg.work_dir)


@dataset_app.command("check")
def check(
    source: SourceArg,
    trigger: TriggerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
) -> None:
    """Check a dataset: exit 0 ready, 1 not ready, 2 rejected."""
    cfg = settings()
    with _work_dir(cfg) as tmp:
        try:
            report = _prepare(source, Path(tmp), cfg, trigger).report
        except DatasetError as exc:
            if as_json:
                print_json(rejected_report(exc).model_dump(mode="json"))
                raise typer.Exit(EXIT_USAGE) from None
            fail(f"rejected: {exc}", EXIT_USAGE)
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        _print_report(report)
    raise typer.Exit(EXIT_OK if report.ready else EXIT_NOT_READY)


@dataset_app.command("pack")
def pack_cmd(
    source: SourceArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="the tar to write")],
    trigger: TriggerOpt = None,
) -> None:
    """Check, clean and pack a dataset into a deterministic tar with manifest.json."""
    cfg = settings()
    with _work_dir(cfg) as tmp:
        try:
            prepared = _prepare(source, Path(tmp), cfg, trigger)
        except DatasetError as exc:
            fail(f"rejected: {exc}", EXIT_USAGE)
        if not prepared.report.ready:
            _print_report(prepared.report)
            fail("not packed: the dataset is not ready", EXIT_NOT_READY)
        try:
            pack(prepared.folder, prepared.manifest, out)
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror}", EXIT_NOT_READY)
    m = prepared.manifest
    err_console.print(
        f"packed {m.images} images, {m.captions} captions ({m.total_bytes} bytes) into {out}\n"
        f"dataset sha256 {m.dataset_sha256}",
        highlight=False,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
