"""`lorabot dataset check|pack`: exit codes and the --json shape of the contract."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bot.cli.dataset import register

from .corpus import Entry, basic_entries, image_bytes, make_zip, symlink_entry

app = typer.Typer()
register(app)
runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "LORABOT_WORK_DIR": str(tmp_path / "work"),
        "LORABOT_DATASET_MIN_IMAGES": "3",
        "LORABOT_DATASET_MIN_SIDE": "64",
    }


def _zip(tmp_path: Path, entries: list[Entry]) -> str:
    path = tmp_path / "ds.zip"
    path.write_bytes(make_zip(entries))
    return str(path)


def test_check_ready_json(tmp_path: Path, env: dict[str, str]) -> None:
    result = runner.invoke(app, ["dataset", "check", _zip(tmp_path, basic_entries(4)), "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ready"] is True and doc["images"] == 4 and doc["captioned"] == 4 and doc["problems"] == []
    assert isinstance(doc["repairs"], list) and isinstance(doc["summary"], str)
    # the temporary work folder is gone afterwards
    assert list((tmp_path / "work").iterdir()) == []


def test_check_not_ready_lists_problems(tmp_path: Path, env: dict[str, str]) -> None:
    src = _zip(tmp_path, [*basic_entries(3), ("bare.jpg", image_bytes(seed=9))])
    result = runner.invoke(app, ["dataset", "check", src, "--json"], env=env)
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ready"] is False
    assert doc["problems"] == [
        {
            "code": "missing_caption",
            "path": "bare.jpg",
            "message": "no caption, and no trigger word to fill it with (pass --trigger)",
            "severity": "error",
        }
    ]
    # the trigger word fills it, as ai-toolkit would
    fixed = runner.invoke(app, ["dataset", "check", src, "--trigger", "ohwx"], env=env)
    assert fixed.exit_code == 0, fixed.output


def test_check_rejected_exits_2(tmp_path: Path, env: dict[str, str]) -> None:
    src = _zip(tmp_path, [*basic_entries(3), (symlink_entry("x.jpg"), b"/etc/passwd")])
    human = runner.invoke(app, ["dataset", "check", src], env=env)
    assert human.exit_code == 2 and "symbolic link" in human.stderr
    as_json = runner.invoke(app, ["dataset", "check", src, "--json"], env=env)
    assert as_json.exit_code == 2
    doc = json.loads(as_json.stdout)
    assert doc["ready"] is False and doc["problems"][0]["code"] == "symlink"


def test_check_http_url_is_rejected(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["dataset", "check", "http://example.com/x.zip", "--json"], env=env)
    assert result.exit_code == 2
    assert json.loads(result.stdout)["problems"][0]["code"] == "url_scheme"


def test_pack(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out.tar"
    src = _zip(tmp_path, basic_entries(3, prefix="nested/"))
    result = runner.invoke(app, ["dataset", "pack", src, "-o", str(out), "--trigger", "ohwx"], env=env)
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == sorted(
            ["img00.jpg", "img00.txt", "img01.jpg", "img01.txt", "img02.jpg", "img02.txt", "manifest.json"]
        )
    not_ready = runner.invoke(
        app, ["dataset", "pack", _zip(tmp_path, basic_entries(1)), "-o", str(tmp_path / "no.tar")], env=env
    )
    assert not_ready.exit_code == 1 and not (tmp_path / "no.tar").exists()


def test_console_script_end_to_end(tmp_path: Path, env: dict[str, str]) -> None:
    """Through the real `lorabot` app, as an operator runs it."""
    src = _zip(tmp_path, basic_entries(3))
    proc = subprocess.run(
        [sys.executable, "-c", "from bot.cli import main; main()", "dataset", "check", src, "--json"],
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"] == 3
