"""`lorabot config render`: a job config on stdout; a bad value is one error line and exit 2."""

from __future__ import annotations

import json
import re

import pytest
import typer
import yaml
from typer.testing import CliRunner

from bot.cli import config as config_cli

runner = CliRunner()


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()
    config_cli.register(a)

    @a.callback()
    def _root() -> None:  # keeps "config" a sub-command even with a single group
        return None

    return a


def render(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["config", "render", *args])
    return result.exit_code, result.stdout, result.stderr


def test_yaml_default_preset(app: typer.Typer) -> None:
    code, out, err = render(app, "--name", "My LoRA", "--trigger", "ohwx")
    assert code == 0, err
    doc = yaml.safe_load(out)
    p = doc["config"]["process"][0]
    job = doc["config"]["name"]
    # unique per render: ai-toolkit would silently resume a re-used name from the same folder
    again = yaml.safe_load(render(app, "--name", "My LoRA", "--trigger", "ohwx")[1])["config"]["name"]
    assert re.fullmatch(r"lora_My_LoRA_[0-9a-f]{6}", job) and job != again
    assert p["trigger_word"] == "ohwx" and p["train"]["steps"] == 1500  # the character preset
    assert p["training_folder"] == "/workspace/lorabot/output"
    assert p["datasets"][0]["folder_path"] == f"/workspace/lorabot/datasets/{job}"
    assert doc["meta"]["name"] == "My LoRA"


def test_json_with_overrides_and_paths(app: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORABOT_REMOTE_ROOT", "/srv/box/")
    code, out, err = render(
        app, "--name", "x", "--trigger", "sks", "--steps", "42", "--rank", "8", "--lr", "0.0002",
        "--preset", "fast", "--format", "json", "--base-model", "schnell", "--job-name", "lora_7",
    )
    assert code == 0, err
    doc = json.loads(out)
    p = doc["config"]["process"][0]
    assert doc["config"]["name"] == "lora_7"
    assert (p["train"]["steps"], p["network"]["linear"], p["network"]["linear_alpha"]) == (42, 8, 8)
    assert p["train"]["lr"] == 0.0002
    assert p["datasets"][0]["resolution"] == [512, 768]  # fast
    assert p["model"]["assistant_lora_path"] == "ostris/FLUX.1-schnell-training-adapter"
    assert p["training_folder"] == "/srv/box/output"
    code, out, _ = render(app, "--name", "x", "--trigger", "t", "--dataset-dir", "/d", "--training-folder", "/o")
    assert yaml.safe_load(out)["config"]["process"][0]["datasets"][0]["folder_path"] == "/d"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps: Input should be greater than or equal to 1 (got 0)"),
        (["--rank", "500"], "rank: Input should be less than or equal to 128"),
        (["--lr", "1"], "learning_rate must be between"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--format", "xml"], "--format must be yaml or json"),
        (["--base-model", "pro"], "base_model: Input should be 'dev' or 'schnell'"),
        (["--job-name", "../etc"], "job name must be"),
        (["--dataset-dir", "relative"], "dataset dir must be an absolute path"),
        (["--trigger", "a: {b: 1}"], "trigger word must start"),
        (["--trigger", "${HF_TOKEN}"], "must not contain '$'"),
    ],
)
def test_bad_values_are_one_line_exit_2(app: typer.Typer, args: list[str], message: str) -> None:
    base = ["--name", "x", "--trigger", "t"]
    code, out, err = render(app, *base, *args)
    assert code == 2
    assert out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_registered_on_the_real_cli() -> None:
    from bot.cli import app as real_app

    result = runner.invoke(real_app, ["config", "render", "--name", "n", "--trigger", "t", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["job"] == "extension"
