"""services.progress over what ai-toolkit really prints (issue 16): console excerpts from public
ai-toolkit issues and a replay of its real progress bar, all in tests/data/aitoolkit/."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from services.progress import (
    CheckpointSaved,
    Failure,
    FailureKind,
    Notice,
    NoticeKind,
    Phase,
    PhaseChanged,
    ProgressEvent,
    ProgressParser,
    Step,
    classify_exit,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "aitoolkit"
CORPUS = sorted(p for p in DATA.iterdir() if p.suffix == ".txt")


def parse(data: bytes, job: str | None = None, chunks: int | None = None, **kw: int | bool) -> list[ProgressEvent]:
    p = ProgressParser(job, **kw)  # type: ignore[arg-type]
    out: list[ProgressEvent] = []
    if chunks is None:
        out += p.feed(data)
    else:
        for i in range(0, len(data), chunks):
            out += p.feed(data[i : i + chunks])
    return out + p.close()


def of(events: list[ProgressEvent], cls: type) -> list:
    return [e for e in events if isinstance(e, cls)]


def test_every_corpus_file_names_its_source() -> None:
    assert len(CORPUS) >= 8
    for path in CORPUS:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert path.name == "bar_replay_27a03a91.txt" or first.startswith(
            "# source: https://github.com/ostris/ai-toolkit/issues/"), path.name


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunking_never_changes_the_events(path: Path, chunk: int) -> None:
    data = path.read_bytes()
    assert parse(data, chunks=chunk) == parse(data)


FAILURES = {
    "issue_929_cuda_error_oom.txt": (FailureKind.CUDA_OOM, "Error running job: CUDA error: out of memory"),
    "issue_45_cuda_out_of_memory.txt": (FailureKind.CUDA_OOM, "Error running job: CUDA out of memory."),
    "issue_676_gated_401.txt": (FailureKind.GATED_MODEL, "401 Client Error."),
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_real_failures_are_classified(name: str) -> None:
    kind, line = FAILURES[name]
    data = (DATA / name).read_bytes()
    p = ProgressParser()
    events = p.feed(data) + p.close()
    (fail,) = of(events, Failure)
    assert fail.kind is kind and fail.line.startswith(line)
    out = classify_exit(1, False, p)  # from the live parser
    assert out.kind is kind and not out.success


def test_issue_680_after_a_sample_pause() -> None:
    events = parse((DATA / "issue_680_rate_after_samples.txt").read_bytes())
    (ckpt,) = of(events, CheckpointSaved)
    assert ckpt.step == 5250 and not ckpt.final
    assert [n.kind for n in of(events, Notice)] == [NoticeKind.OPTIMIZER_SAVED]
    assert PhaseChanged(Phase.SAMPLING, "Generating Images") in events
    (step,) = of(events, Step)
    assert (step.step, step.total, step.loss, step.elapsed_s) == (5384, 8000, 0.3462, 3 * 3600 + 41 * 60 + 53)
    assert not of(events, Failure)


def test_issue_818_speed_is_measured_from_elapsed_not_the_spiked_rate() -> None:
    steps = of(parse((DATA / "issue_818_rate_spike.txt").read_bytes(), "my_first_lora_v1", all_steps=True), Step)
    assert [s.step for s in steps] == [19, 49]
    assert steps[0].sec_per_it == 17.64  # no window yet: the frame's own rate
    # 365.80it/s (0.0027 s/it, ETA 8 s) on the frame; the elapsed field says 471 s for 30 steps
    assert steps[1].sec_per_it == pytest.approx((13 * 60 + 26 - 5 * 60 - 35) / 30)
    assert steps[1].eta_s == pytest.approx(2951 * steps[1].sec_per_it)


def test_issue_387_loading_phases_and_no_training_bar() -> None:
    events = parse((DATA / "issue_387_loading.txt").read_bytes())
    phases = [e.phase for e in of(events, PhaseChanged)]
    assert phases == [Phase.LOADING, Phase.QUANTIZING, Phase.LOADING, Phase.QUANTIZING, Phase.LOADING]
    assert not of(events, Step) and not of(events, Failure)


def test_issue_544_nan_glued_to_a_frame_is_read_as_its_own_line() -> None:
    data = (DATA / "issue_544_nan_glued.txt").read_bytes()
    events = parse(data, "lora_zimg", all_steps=True)
    assert [n.kind for n in of(events, Notice)] == [NoticeKind.NAN_LOSS, NoticeKind.NAN_LOSS]
    assert [s.step for s in of(events, Step)] == [41, 42, 43]
    p = ProgressParser("lora_zimg", nan_limit=2)
    stopped = p.feed(data) + p.close()
    (fail,) = of(stopped, Failure)
    assert fail.kind is FailureKind.NAN_LOSS and "2 steps in a row" in fail.line


# --- the replay of the real bar (make_bar_replay.py: tqdm 4.70.1, ai-toolkit's loop at 27a03a91) -----
REPLAY = DATA / "bar_replay_27a03a91.txt"


def replay_losses() -> dict[int, float]:
    """Step k's own loss (loop index k - 1), as make_bar_replay.py drew them."""
    rnd = random.Random(7)
    losses = {}
    for step in range(760):
        rnd.uniform(0.95, 1.05)
        losses[step + 1] = float(f"{0.6 * (1 + rnd.random()) / (1 + step / 300):.3e}")
    return losses


def test_replay_one_step_event_per_optimizer_step_with_its_own_loss() -> None:
    data = REPLAY.read_bytes()
    losses = replay_losses()
    events = parse(data, "lora_replay", all_steps=True)
    steps = of(events, Step)
    assert [s.step for s in steps] == list(range(0, 761))  # the opening 0/760 frame, then each step once
    assert all(s.loss == losses[s.step] for s in steps[1:])
    # the stride (5 for 760 steps) thins the events, never duplicates or shifts a loss
    strided = of(parse(data, "lora_replay"), Step)
    nums = [s.step for s in strided]
    assert nums == sorted(set(nums)) and set(range(5, 761, 5)) <= set(nums)
    assert all(s.loss == losses[s.step] for s in strided if s.step)


def test_replay_speed_ignores_the_spikes_after_saves_and_samples() -> None:
    data = REPLAY.read_bytes()
    steps = of(parse(data, "lora_replay", all_steps=True), Step)
    spikes = re.findall(r"([\d.]+)it/s, lr", data.decode())
    assert len(spikes) >= 3 and all(float(r) > 1 for r in spikes)  # the replay's frames do spike after pauses...
    measured = [s.sec_per_it for s in steps if s.step >= 20]
    assert all(1.5 <= spi <= 1.75 for spi in measured if spi is not None), measured  # ...the parser does not


def test_replay_ends_done_and_succeeds() -> None:
    p = ProgressParser("lora_replay")
    events = p.feed(REPLAY.read_bytes()) + p.close()
    assert events[-1] == PhaseChanged(Phase.DONE)
    assert [c.step for c in of(events, CheckpointSaved)] == [250, 500, 750, 760]
    assert classify_exit(0, True, p).success
    # the reported loss is a moving average of the last reported steps, not one noisy step
    reported = [s.loss for s in of(events, Step) if s.loss is not None][-20:]
    assert p.smoothed_loss() == pytest.approx(sum(reported) / len(reported))
    assert p.smoothed_loss() == pytest.approx(sum(list(replay_losses().values())[-100:]) / 100, rel=0.15)
