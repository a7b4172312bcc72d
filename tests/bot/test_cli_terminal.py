"""The review's L2 and L8: box output shown by `lorabot logs` loses its terminal escape sequences,
and error lines print Rich markup from a box, Vast.ai or R2 as text."""

from __future__ import annotations

import pytest
import typer

from bot.cli import common
from bot.cli.watch import _emit_log


def test_logs_strip_escape_sequences(capsys: pytest.CaptureFixture[str]) -> None:
    hostile = b"step 1\r\n\x1b]52;c;ZXZpbA==\x07\x1b]0;owned\x07\xc2\x9b31mred\tok\n"
    _emit_log(hostile, [])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert out == "step 1\r\n]52;c;ZXZpbA==]0;owned31mred\tok\n"


def test_fail_prints_markup_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        common.fail("Vast.ai said [link=https://evil.example]click[/link] [bold]x[/bold]\x1b[2J")
    err = capsys.readouterr().err
    assert "[link=https://evil.example]click[/link]" in err and "[bold]x[/bold]" in err
    assert "\x1b" not in err.replace("\x1b[1;31m", "").replace("\x1b[0m", "")
