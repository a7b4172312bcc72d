"""Time left in a training run: what services/quote.py counts, with measured figures (issue 16, S2-4).

tqdm's elapsed field, and so the parser's s/it, leave out ai-toolkit's pauses for saves and sample
rounds (ToolkitProgressBar.pause), and a FLUX sample round (prompts x 20 steps at 1024²) can take
longer than hundreds of training steps. So the ETA is: remaining steps at the measured s/it, plus the
remaining sample rounds at their measured duration, plus the remaining saves at theirs. Until a round
or a save has been timed, the quote's per-round estimate stands in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services import progress as prog


def _per_unit(quote: Mapping[str, Any], phase: str, units: int) -> float:
    for p in quote.get("phases") or ():
        if p.get("name") == phase and units > 0:
            return (float(p.get("low_s", 0.0)) + float(p.get("high_s", 0.0))) / 2 / units
    return 0.0


def rounds_after(step: int, total: int, every: int, *, final: bool = True) -> int:
    """Saves or sample rounds still to come after loop index `step`: one at every positive multiple
    of `every` below `total` (ai-toolkit's `step % every == 0`), plus the final one."""
    if every <= 0:
        return 0
    if step >= total:
        return 0
    first = (step // every + 1) * every
    return max(0, (total - 1 - first) // every + 1) + (1 if final else 0)


class EtaModel:
    """Feed it the parser's events with the time they were read; ask eta() for the seconds left."""

    def __init__(self, recipe: Mapping[str, Any], quote: Mapping[str, Any]) -> None:
        steps = int(recipe.get("steps") or 0)
        self.sample_every = int(recipe.get("sample_every") or 0) if recipe.get("sample_prompts") else 0
        self.save_every = int(recipe.get("save_every") or 0)
        sample_rounds = rounds_after(0, steps, self.sample_every) + (0 if recipe.get("skip_first_sample") else 1)
        self.sample_s = _per_unit(quote, "sampling", sample_rounds)
        self.save_s = _per_unit(quote, "saving", rounds_after(0, steps, self.save_every))
        self._timed: dict[prog.Phase, list[float]] = {prog.Phase.SAMPLING: [], prog.Phase.SAVING: []}
        self._open: tuple[prog.Phase, float] | None = None

    def record(self, events: list[prog.ProgressEvent], now: float) -> None:
        for ev in events:
            if isinstance(ev, prog.PhaseChanged | prog.Step):
                phase = ev.phase if isinstance(ev, prog.PhaseChanged) else prog.Phase.TRAINING
                if self._open is not None and self._open[0] is not phase:
                    self._timed[self._open[0]].append(now - self._open[1])
                    self._open = None
                if phase in self._timed and self._open is None:
                    self._open = (phase, now)

    def _mean(self, phase: prog.Phase, prior: float) -> float:
        timed = self._timed[phase][-5:]
        return sum(timed) / len(timed) if timed else prior

    def eta(self, step: int, total: int, sec_per_it: float | None) -> float | None:
        if sec_per_it is None:
            return None
        rounds = rounds_after(step, total, self.sample_every)
        saves = rounds_after(step, total, self.save_every)
        return ((total - step) * sec_per_it + rounds * self._mean(prog.Phase.SAMPLING, self.sample_s)
                + saves * self._mean(prog.Phase.SAVING, self.save_s))
