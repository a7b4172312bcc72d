"""services.eta: the ETA counts sample rounds and saves at their measured time (review S2-4)."""

from __future__ import annotations

import pytest

from services import progress as prog
from services.eta import EtaModel, rounds_after

RECIPE = {"steps": 1000, "sample_every": 250, "save_every": 250, "sample_prompts": ["a", "b"]}
QUOTE = {"phases": [{"name": "sampling", "low_s": 400, "high_s": 600}, {"name": "saving", "low_s": 20, "high_s": 60}]}


def test_rounds_after() -> None:
    assert rounds_after(0, 1000, 250) == 4  # 250, 500, 750 and the final one
    assert rounds_after(250, 1000, 250) == 3
    assert rounds_after(999, 1000, 250) == 1
    assert rounds_after(1000, 1000, 250) == 0
    assert rounds_after(0, 1000, 0) == 0


def test_eta_uses_the_quote_then_measured_rounds() -> None:
    m = EtaModel(RECIPE, QUOTE)
    # 5 sample rounds (baseline + 3 + final) share the quote's 500 s; 4 saves share 40 s
    assert m.eta(500, 1000, 2.0) == pytest.approx(500 * 2.0 + 2 * 100 + 2 * 10)
    # a sample round measured at 30 s and a save at 4 s replace the priors
    m.record([prog.PhaseChanged(prog.Phase.SAVING)], 100.0)
    m.record([prog.PhaseChanged(prog.Phase.SAMPLING)], 104.0)
    m.record([prog.Step(501, 1000, 2.0, None, None, None)], 134.0)
    assert m.eta(501, 1000, 2.0) == pytest.approx(499 * 2.0 + 2 * 30 + 2 * 4)
    assert m.eta(501, 1000, None) is None
