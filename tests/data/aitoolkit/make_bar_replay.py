"""Regenerate bar_replay_27a03a91.txt: the real tqdm, driven the way ai-toolkit drives it.

    pip install --target /tmp/tq tqdm && PYTHONPATH=/tmp/tq python tests/data/aitoolkit/make_bar_replay.py

Not run by the tests (tqdm is not a dependency of lorabot); its output file is. The bar class below
behaves like ai-toolkit's toolkit/progress_bar.py at 27a03a91 (smoothing 0.7; pause() remembers the
time; unpause() shifts start_t by the paused span and resets last_print_t), and the loop follows the
print order of BaseSDTrainProcess.run() at that commit: the bar opens and pauses; each loop index
`step` unpauses, trains (1.62 s on a fake clock), set_postfix_str() with the step's loss (a redraw
with the old count), saves and samples at multiples of 250 while paused, then update(step + 1 - n);
close() redraws once more; then the final save and the final sample round.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import tqdm.std
from tqdm import tqdm as Tqdm

NOW = [1_000_000.0]
tqdm.std.time = lambda: NOW[0]  # type: ignore[assignment]  # a fake clock for tqdm's timing


class PausableBar(Tqdm):  # type: ignore[misc]
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("smoothing", 0.7)
        super().__init__(*args, **kwargs)
        self.paused = False
        self.last_time = self._time()

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.last_time = self._time()

    def unpause(self) -> None:
        if self.paused:
            self.paused = False
            cur_t = self._time()
            self.start_t += cur_t - self.last_time
            self.last_print_t = cur_t

    def update(self, n: float | None = 1) -> bool | None:
        if not self.paused:
            return super().update(n)  # type: ignore[no-any-return]
        return None


def main() -> None:
    name, steps, every, spi, prompts = "lora_replay", 760, 250, 1.62, 2
    out = io.StringIO()
    rnd = random.Random(7)
    root = "/workspace/lorabot/jobs/replay/output/" + name

    def say(text: str) -> None:
        out.write(text + "\n")

    def sample_round(step: int) -> None:
        gen = Tqdm(total=prompts, desc="Generating Images", file=out, mininterval=0)
        for i in range(prompts):
            NOW[0] += 21.0  # 20 sample steps at 1024²
            gen.update(1)
            del i
        out.write("\r")
        del step

    say("Generating baseline samples before training")
    sample_round(0)
    bar = PausableBar(total=steps, desc=name, leave=True, initial=0, file=out, mininterval=0, miniters=1)
    bar.pause()
    for step in range(steps):
        bar.unpause()
        NOW[0] += spi * rnd.uniform(0.95, 1.05)
        loss = 0.6 * (1 + rnd.random()) / (1 + step / 300)
        bar.set_postfix_str(f"lr: {1e-4:.1e} loss: {loss:.3e}")
        if step and step % every == 0:
            bar.pause()
            say(f"\nSaving at step {step}")
            NOW[0] += 6.0
            say(f"Saved checkpoint to {root}/{name}_{step:09d}.safetensors")
            say(f"Saved optimizer to {root}/optimizer.pt")
            bar.unpause()
            bar.pause()
            sample_round(step)
            bar.unpause()
            NOW[0] += 0.05  # the logger commit and the like before update(): a tiny dt, the rate spikes
        bar.update(step + 1 - bar.n)
    bar.close()
    NOW[0] += 6.0
    say(f"Saved checkpoint to {root}/{name}.safetensors")
    sample_round(steps)
    say("")
    Path(__file__).with_name("bar_replay_27a03a91.txt").write_text(out.getvalue(), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
