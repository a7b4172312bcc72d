"""Incremental parser of ai-toolkit's console output (../shared/reference/ai-toolkit.md §4, §7).

Feed it raw bytes as they arrive (any chunking); it yields typed events: phase changes, training
steps with s/it, lr and loss, download progress, saved checkpoints, written samples, notices and a
failure class with the line that shows it. tqdm redraws with `\\r`, so the stream is split on both `\\r`
and `\\n`; a partial line is kept until its end arrives; invalid UTF-8 is replaced, never fatal.

Chunk boundaries never change the events: only whole lines are decoded, and a line always starts after
an ASCII separator, where UTF-8 decoding is self-synchronising.

Failure policy: the first *specific* failure (CUDA OOM, gated model, host fault, disk full, no images,
job stopped, a NaN streak) is emitted as soon as its line is seen; a missing repo ("Repository Not
Found", diffusers' "is not a valid model identifier") is held back, since GatedRepoError subclasses it
and its chained traceback comes later; "Error running job: X" with an unrecognised X and an uncaught
traceback are held back and emitted by close() as `unknown` only if nothing more specific followed
and the run did not save its final LoRA. Text glued after a frame's closing `]` (a message printed
while tqdm's frame had no newline yet) is read as its own line.

Speed matters (a chatty run prints a tqdm redraw per step): events are slotted dataclasses and the
per-line path for progress bars is a couple of string searches and one regex match.
"""

from __future__ import annotations

import enum
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel


class Phase(enum.StrEnum):
    DOWNLOADING = "downloading"
    LOADING = "loading"
    QUANTIZING = "quantizing"
    CACHING_LATENTS = "caching_latents"
    SAMPLING = "sampling"
    TRAINING = "training"
    SAVING = "saving"
    DONE = "done"


class FailureKind(enum.StrEnum):
    CUDA_OOM = "cuda_oom"
    GATED_MODEL = "gated_model"  # gated repo, missing/invalid HF token, licence not accepted
    MODEL_NOT_FOUND = "model_not_found"  # the repo does not exist (typo), without a GatedRepoError
    HOST_FAULT = "host_fault"  # the rented GPU or its driver is broken: worth a retry elsewhere
    NAN_LOSS = "nan_loss"  # `loss is nan` K steps in a row: the LoRA is ruined, stop paying
    DISK_FULL = "disk_full"
    NO_IMAGES = "no_images"
    JOB_STOPPED = "job_stopped"  # SIGINT banner, "Job stopped", or killed by a stop signal
    KILLED = "killed"  # SIGKILL, usually the kernel's OOM killer (system RAM, e.g. while quantizing)
    STALLED = "stalled"  # for callers that kill a run after a Stalled event
    UNKNOWN = "unknown"


class NoticeKind(enum.StrEnum):
    OOM_SKIPPED = "oom_skipped"  # "# OOM during training step, skipping batch k/3 #": recoverable
    LOW_DISK = "low_disk"  # huggingface_hub's "Not enough free disk space" warning
    RESUMING = "resuming"  # the output folder already held a LoRA: the run resumes (§3)
    REMOVED_SAVE = "removed_save"
    NAN_LOSS = "nan_loss"  # "loss is nan": ai-toolkit swaps in a zero loss and carries on
    OPTIMIZER_SAVED = "optimizer_saved"  # "Saved optimizer to <dir>/optimizer.pt", after each save


# --- events -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PhaseChanged:
    phase: Phase
    detail: str = ""  # the line that started it, e.g. "Quantizing T5"


@dataclass(frozen=True, slots=True)
class Step:
    step: int
    total: int
    # measured from tqdm's elapsed field over a window of steps (pauses excluded), never the smoothed
    # rate of one frame, which spikes after every save and sample pause (issue #818: 365.80it/s)
    sec_per_it: float | None
    lr: float | None
    loss: float | None  # this step's own loss (the first frame that shows the count)
    eta_s: float | None  # (total - step) * sec_per_it: training steps only
    elapsed_s: float | None = None  # tqdm's elapsed field


@dataclass(frozen=True, slots=True)
class DownloadProgress:
    bytes_done: int
    bytes_total: int
    bytes_per_s: float | None
    file: str


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    path: str
    step: int | None  # from the <name>_<step:09d> suffix; for the final file, the last step seen
    final: bool  # <name>.safetensors: the finished LoRA


@dataclass(frozen=True, slots=True)
class SampleWritten:
    path: str
    step: int | None
    index: int | None  # prompt index


@dataclass(frozen=True, slots=True)
class Notice:
    kind: NoticeKind
    line: str


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    line: str
    last_lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Stalled:
    phase: Phase | None
    silent_s: float
    timeout_s: float


ProgressEvent = PhaseChanged | Step | DownloadProgress | CheckpointSaved | SampleWritten | Notice | Failure | Stalled


def event_to_dict(event: ProgressEvent) -> dict[str, Any]:
    """A JSON-ready dict with a "type" key (class name), for logs and the job store."""
    d = asdict(event)
    if "last_lines" in d:
        d["last_lines"] = list(d["last_lines"])
    return {"type": type(event).__name__, **d}


# --- patterns ---------------------------------------------------------------------------------
# The reference's bar pattern, plus tqdm's first frame ("0/3000 [00:00<?, ?it/s]").
_STEP_RE = re.compile(  # groups: step, elapsed, total, rate, unit, lr, loss
    r"(\d+)/(\d+) \[([\d:]+)<[\d:?]+,\s*(?:([\d.]+)(s/it|it/s)|\?it/s)(?:, lr: (\S+) loss: ([^\s\]]+))?"
)
# huggingface_hub download bars: unit_scale bytes, e.g. "4.49G/9.95G [00:41<00:50, 109MB/s]"
_DL_RE = re.compile(r"([\d.]+)([kMGTP]?)B?/([\d.]+)([kMGTP]?)B? \[[\d:]+<[\d:?]+,\s*(?:([\d.]+)([kMGTP]?)B/s)?")
_UNIT = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}  # tqdm divisor 1000
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FAIL_RE = re.compile(
    r"(?P<cuda_oom>CUDA out of memory|OutOfMemoryError|OOM during training step \d+ times in a row"
    r"|CUDA error: out of memory|cudaErrorMemoryAllocation)"
    # a bare "401 Client Error" is also what a missing repo gives an anonymous request: not gated
    r"|(?P<gated_model>GatedRepoError|Cannot access gated repo|is restricted\. You must have access"
    r"|does not appear to have a file named config\.json)"
    r"|(?P<host_fault>uncorrectable ECC error|CUDA driver version is insufficient|no CUDA-capable device"
    r"|unspecified launch failure|\bXid\b|CUDA error: an illegal memory access|GPU is lost)"
    r"|(?P<disk_full>No space left on device|os error 28|Errno 28\b|StorageFull)"
    r"|(?P<no_images>no images found in)"
    r"|(?P<job_stopped>Job stopped|KeyboardInterrupt)"
)
# held until close: GatedRepoError subclasses RepositoryNotFoundError, and its chained traceback (later
# lines) names it when the repo really is gated
_NOT_FOUND_RE = re.compile(r"Repository Not Found|is not a valid model identifier|RepositoryNotFoundError")
_NAN_LINE = "loss is nan"
_EXC_LINE_RE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b")
_RUNNING_JOB_RE = re.compile(r"^#\s*Running job:\s*(\S+)")
_CKPT_STEP_RE = re.compile(r"_(\d{9})\.safetensors$")
_SAMPLE_RE = re.compile(r"(\S*samples/(\d+)__(\d{9})_(\d+)\.(?:jpg|jpeg|png|webp))")

# Schnell's adapter is unloaded before and loaded after every sample round: not a loading phase
_NOT_A_PHASE = ("assistant lora", "inference lora")
# Line prefixes (after strip) that start a phase. Order matters only for shared prefixes.
_PHASE_PREFIXES: tuple[tuple[str, Phase], ...] = (
    ("Quantizing", Phase.QUANTIZING),
    ("Loading", Phase.LOADING),
    ("Making pipe", Phase.LOADING),
    ("Preparing Model", Phase.LOADING),
    ("Grabbing lora from the hub", Phase.DOWNLOADING),
    ("Fusing in LoRA", Phase.LOADING),
    ("create LoRA", Phase.LOADING),
    ("Caching latents", Phase.CACHING_LATENTS),
    ("Generating baseline samples", Phase.SAMPLING),
    ("Generating samples", Phase.SAMPLING),
    ("Generating Images", Phase.SAMPLING),
    ("Downloading", Phase.DOWNLOADING),
)
_PHASE_FIRST_CHARS = frozenset(p[0] for p, _ in _PHASE_PREFIXES)
_LOAD_PHASES = frozenset({Phase.LOADING, Phase.QUANTIZING, Phase.DOWNLOADING})
LOSS_WINDOW = 20  # steps in the reported moving-average loss

MAX_LINE_CHARS = 16_384  # longer lines are cut; a line without a separator cannot grow memory


def parse_sample_path(path: str) -> SampleWritten | None:
    """A SampleWritten for a file named like ai-toolkit's samples (`<ms>__<step:09d>_<i>.jpg`)."""
    m = _SAMPLE_RE.search(path)
    if not m:
        return None
    return SampleWritten(path=m.group(1), step=int(m.group(3)), index=int(m.group(4)))


def step_stride(total: int) -> int:
    """Training steps are reported every `stride` steps (see ProgressParser): at most ~250 Step
    events per run, plenty for a chat front-end, and what lets the parser skip the bar redraws of a
    run in C instead of building an event per `\\r`."""
    if total <= 250:
        return 1
    if total <= 2500:
        return 5
    if total <= 25000:
        return 10
    return 100


# Frames whose step ends in the stride's digits, found by a literal-prefixed scan over bytes (fast);
# the step's other digits are read backwards from the match. Groups: total, elapsed, rate, unit, lr, loss.
_STEP_TAIL = rb"/(\d+) \[([\d:]+)<[\d:?]+,\s*(?:([\d.]+)(s/it|it/s)|\?it/s)(?:, lr: (\S+) loss: ([^\s\]]+))?"
_STRIDE_RE: dict[int, re.Pattern[bytes]] = {
    1: re.compile(rb"\d" + _STEP_TAIL),
    5: re.compile(rb"[05]" + _STEP_TAIL),
    10: re.compile(rb"0" + _STEP_TAIL),
    100: re.compile(rb"00" + _STEP_TAIL),
}


# text glued after a frame's closing "]": tqdm ends frames with \r, so a message printed during
# training (stderr merged into stdout) lands on the frame's line (issue #544: "...e+00]loss is nan")
_GLUED_RE = re.compile(rb"\][^\n]")
SPEED_WINDOW_STEPS = 10  # s/it from two frames at least this many steps apart ...
SPEED_WINDOW_S = 10.0  # ... and this many seconds of tqdm's elapsed (its resolution is 1 s)


def _elapsed(text: str | bytes) -> float:
    """tqdm's elapsed field, "MM:SS" or "H:MM:SS" (hours may exceed 24)."""
    secs = 0
    for part in text.split(b":" if isinstance(text, bytes) else ":"):  # type: ignore[arg-type]
        secs = secs * 60 + int(part)
    return float(secs)


class ProgressParser:
    """Feed bytes, get events. `job_name` identifies the training bar (tqdm desc = job name); when
    not given it is learnt from the `# Running job: <name>` banner, and bars with lr/loss count too.

    Step events, for a run of consecutive training-bar frames: the first frame after another phase,
    every frame whose step is a positive multiple of `step_stride(total)`, and the last frame before
    any other line (or the end). `all_steps=True` reports every frame. ai-toolkit draws two frames
    per optimizer step (a postfix refresh that still shows the old count with the next step's loss,
    then the count update), an opening `0/N` frame and a repeated close frame: a step is reported
    once, from the first frame that shows its count, which carries that step's own loss. The rule
    depends only on the stream's content, so any chunking yields the same events.
    `step`/`total`/`sec_per_it` follow the latest frame read.

    `nan_limit` > 0: that many `loss is nan` lines in a row (no step with a real loss between) end
    in Failure(nan_loss); each one is a Notice(nan_loss) first.
    """

    def __init__(
        self, job_name: str | None = None, *, tail_lines: int = 40, all_steps: bool = False, nan_limit: int = 0
    ) -> None:
        self.job_name: str | None = None
        self.all_steps = all_steps
        self.phase: Phase | None = None
        self.step: int | None = None
        self.total: int | None = None
        self.sec_per_it: float | None = None
        self.failure: Failure | None = None  # first failure emitted
        self.final_checkpoint: str | None = None
        self._run_re: re.Pattern[bytes] | None = None
        self._job_prefix = b""
        self._pending = b""
        self._overflow = False
        self._closed = False
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._tail_bar = False  # last tail entry is a bar: the next bar redraw replaces it (like \r)
        self._last_step: Step | None = None  # last Step emitted
        self._held: Step | None = None  # last frame of the current run, reported when the run ends
        self._in_json = False
        self._unknown: str | None = None  # held-back "Error running job: ..." line
        self._exc_line: str | None = None  # last exception line of an uncaught traceback
        self._in_traceback = False
        self._not_found: str | None = None  # held-back "Repository Not Found" line
        self._trained = False  # a training frame was seen: "Loading ..." no longer starts a phase
        self._speed: deque[tuple[int, float]] = deque(maxlen=64)  # (step, elapsed) of parsed frames
        self.nan_limit = nan_limit
        self.nan_streak = 0  # "loss is nan" lines since the last step with a real loss
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)  # losses of the steps reported
        if job_name:
            self._set_job(job_name)

    # --- public ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[ProgressEvent]:
        if self._closed:
            raise RuntimeError("ProgressParser.feed() after close()")
        if not data:
            return []
        if self._overflow:
            # the start of an overlong line is kept; drop the rest of it, up to its separator
            seps = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
            if not seps:
                return []
            data = data[min(seps) :]
            self._overflow = False
        buf = self._pending + data if self._pending else data
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut < 0:
            self._keep_partial(buf)
            return []
        self._keep_partial(buf[cut + 1 :])
        out: list[ProgressEvent] = []
        self._block(buf[: cut + 1].replace(b"\r", b"\n"), out)
        return out

    def close(self) -> list[ProgressEvent]:
        """End of stream: flush the partial last line, emit held-back events, failures and `done`."""
        if self._closed:
            return []
        out: list[ProgressEvent] = []
        if self._pending:
            self._block(self._pending.replace(b"\r", b"\n") + b"\n", out)
            self._pending = b""
        self._flush_held(out)
        self._closed = True
        if self.failure is None:
            line = self._unknown or self._exc_line
            if self._not_found is not None:
                self._fail(FailureKind.MODEL_NOT_FOUND, self._not_found, out)
            elif self.final_checkpoint is not None and self._unknown is None:
                # a handled traceback (an unreadable image skipped, a retried download) in a run that
                # saved its final LoRA and never said "Error running job" is not a failure
                self.phase = Phase.DONE
                out.append(PhaseChanged(Phase.DONE))
            elif line is not None:
                self._fail(FailureKind.UNKNOWN, line, out)
        return out

    def smoothed_loss(self) -> float | None:
        """The mean loss of the last reported steps: one flow-matching step's loss is very noisy."""
        return sum(self.losses) / len(self.losses) if self.losses else None

    def tail(self) -> list[str]:
        """The last lines as a terminal would show them (bar redraws collapsed)."""
        return list(self._tail)

    # --- internals ------------------------------------------------------------------------------
    def _set_job(self, job_name: str) -> None:
        self.job_name = job_name
        self._job_prefix = job_name.encode() + b":"
        # a run of consecutive training-bar frames (blank lines between \r/\n pairs included)
        self._run_re = re.compile(rb"(?:" + re.escape(self._job_prefix) + rb"[^\n]*\n+)++")

    def _keep_partial(self, rest: bytes) -> None:
        limit = MAX_LINE_CHARS * 4 + 4  # enough bytes for MAX_LINE_CHARS characters
        if len(rest) > limit:
            rest = rest[:limit]
            self._overflow = True
        self._pending = rest

    def _block(self, buf: bytes, out: list[ProgressEvent]) -> None:
        """`buf` is whole lines, each ending in \\n. Lines are decoded one by one: a line starts
        after an ASCII separator, so decoding is independent of how the stream was chunked."""
        pos, n = 0, len(buf)
        find = buf.find
        while pos < n:
            run_re = self._run_re
            if run_re is not None and not self._in_json and buf.startswith(self._job_prefix, pos):
                m = run_re.match(buf, pos)
                if m is not None and _GLUED_RE.search(buf, pos, m.end()) is None:
                    end = m.end()
                    self._run(buf, pos, end, out)
                    pos = end
                    continue
            e = find(b"\n", pos)
            if e > pos:
                line = buf[pos:e].decode("utf-8", "replace")
                self._line(line, out)
            pos = e + 1

    def _run(self, buf: bytes, start: int, end: int, out: list[ProgressEvent]) -> None:
        """Training frames buf[start:end]: the first gets the full rule, the others only the stride
        rule, found by one regex scan; the last is held until the run's end is known."""
        first_end = buf.find(b"\n", start)
        self._frame(buf[start:first_end].decode("utf-8", "replace"), out)
        le = end - 1
        while buf[le - 1] == 10:  # the run ends in one or more newlines
            le -= 1
        last = buf[start:first_end]
        if le > first_end:
            last = buf[buf.rfind(b"\n", start, le) + 1 : le]
            total = self.total or 0
            stride = 1 if self.all_steps else step_stride(total)
            for m in _STRIDE_RE[stride].finditer(buf, first_end, le):
                i = m.start() + (stride == 100)  # index of the step's last digit
                j = buf.rfind(b"| ", i - 24, i)
                if j < 0:
                    continue
                digits = buf[j + 2 : i + 1]
                if not digits.isdigit():
                    continue
                step = int(digits)
                if step == 0 or step % stride:
                    continue
                self._emit(self._make_step(step, int(m.group(1)), m.group(2), m.group(3), m.group(4),
                                           m.group(5), m.group(6)), out)
            st = self._parse_frame(last.decode("utf-8", "replace"))
            prev_end = buf.rfind(b"\n", start, le)
            if st is not None and prev_end > first_end:
                # the run may end with the second frame of a step: hold the first, it has the step's loss
                prev_line = buf[buf.rfind(b"\n", start, prev_end) + 1 : prev_end]
                prev = self._parse_frame(prev_line.decode("utf-8", "replace"))
                if prev is not None and prev.step == st.step:
                    st = prev
            if st is not None:
                self._hold_step(st)
        line = last.decode("utf-8", "replace")
        if self._tail_bar:
            self._tail[-1] = line
        else:
            self._tail.append(line)
            self._tail_bar = True

    def _line(self, line: str, out: list[ProgressEvent]) -> None:
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS]
        if "\x1b" in line:
            line = _ANSI_RE.sub("", line)
        p = line.find("%|")
        if p >= 0 and not self._in_json:
            rest = ""
            q = line.find("]", p)
            if 0 <= q < len(line) - 1:
                line, rest = line[: q + 1], line[q + 1 :]
            if self._tail_bar:
                self._tail[-1] = line
            else:
                self._tail.append(line)
                self._tail_bar = True
            self._bar(line, p, out)
            if rest:
                self._line(rest, out)
            return
        self._flush_held(out)
        self._tail_bar = False
        self._tail.append(line)
        self._text(line, out)

    def _set_phase(self, phase: Phase, detail: str, out: list[ProgressEvent]) -> None:
        if phase is not self.phase:
            self._flush_held(out)
            self.phase = phase
            out.append(PhaseChanged(phase, detail))

    def _parse_frame(self, line: str) -> Step | None:
        m = _STEP_RE.search(line)
        if m is None:
            return None
        return self._make_step(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5), m.group(6),
                               m.group(7))

    def _make_step(
        self, step: int, total: int, elapsed: str | bytes, rate: str | bytes | None, unit: str | bytes | None,
        lr: Any, loss: Any,
    ) -> Step:
        el = _elapsed(elapsed)
        spi: float | None = None
        if rate is not None:  # the frame's own smoothed rate; _report replaces it with a measured one
            r = float(rate)
            spi = r if unit in ("s/it", b"s/it") else (1.0 / r if r > 0 else None)
        return Step(
            step,
            total,
            spi,
            _float(lr) if lr is not None else None,
            _float(loss) if loss is not None else None,
            (total - step) * spi if spi is not None else None,
            el,
        )

    def _frame(self, line: str, out: list[ProgressEvent]) -> None:
        """One training frame under the full rule."""
        self._trained = True
        st = self._parse_frame(line)
        if self.phase is not Phase.TRAINING:
            self._set_phase(Phase.TRAINING, self.job_name or "", out)
            if st is not None:
                self._emit(st, out)
            return
        if st is None:
            return
        stride = 1 if self.all_steps else step_stride(st.total)
        if st.step and st.step % stride == 0:
            self._emit(st, out)
        else:
            self._hold_step(st)

    def _hold_step(self, st: Step) -> None:
        held, last = self._held, self._last_step
        self.step, self.total = st.step, st.total
        if self.sec_per_it is None:
            self.sec_per_it = st.sec_per_it
        if (held is not None and held.step == st.step) or (last is not None and last.step == st.step):
            return  # a later frame of a step already held or reported: it shows the next step's loss
        self._held = st
        if st.loss:  # a real loss (ai-toolkit shows 0.000e+00 for a NaN step)
            self.nan_streak = 0

    def _emit(self, st: Step, out: list[ProgressEvent]) -> None:
        self._hold_step(st)
        held = self._held
        if held is not None and held.step == st.step:
            self._held = None
            self._report(held, out)

    def _report(self, st: Step, out: list[ProgressEvent]) -> None:
        last = self._last_step
        if last is None or last.step != st.step:
            st = self._measured(st)
            self._last_step = st
            if st.loss is not None:
                self.losses.append(st.loss)
            if st.sec_per_it is not None:
                self.sec_per_it = st.sec_per_it
            out.append(st)

    def _measured(self, st: Step) -> Step:
        """s/it from the elapsed field of reported steps (a chunking-independent window): the
        widest window of >= SPEED_WINDOW_STEPS steps and SPEED_WINDOW_S seconds; the frame's own
        rate only before there is one."""
        el = st.elapsed_s
        if el is None:
            return st
        speed = self._speed
        if speed and st.step <= speed[-1][0]:
            speed.clear()  # a new bar (a resumed run): its elapsed restarts
        speed.append((st.step, el))
        for s0, e0 in speed:  # oldest first
            if st.step - s0 < SPEED_WINDOW_STEPS:
                break
            if el - e0 >= SPEED_WINDOW_S:
                spi = (el - e0) / (st.step - s0)
                return Step(st.step, st.total, spi, st.lr, st.loss, (st.total - st.step) * spi, el)
        return st

    def _flush_held(self, out: list[ProgressEvent]) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._report(held, out)

    def _bar(self, line: str, p: int, out: list[ProgressEvent]) -> None:
        colon = line.rfind(":", 0, p)
        desc = line[:colon].strip() if colon >= 0 else ""
        job = self.job_name
        if (job is not None and desc == job) or (job is None and "loss:" in line):
            self._frame(line, out)
            return
        if desc.startswith("Caching latents"):
            self._set_phase(Phase.CACHING_LATENTS, desc, out)
        elif desc.startswith("Generating"):
            self._set_phase(Phase.SAMPLING, desc, out)
        elif "B/s" in line or "B/" in line:
            m = _DL_RE.search(line, p)
            if m is None:
                return
            self._set_phase(Phase.DOWNLOADING, desc, out)
            rate = m.group(5)
            out.append(
                DownloadProgress(
                    int(float(m.group(1)) * _UNIT[m.group(2)]),
                    int(float(m.group(3)) * _UNIT[m.group(4)]),
                    float(rate) * _UNIT[m.group(6)] if rate else None,
                    desc,
                )
            )

    def _text(self, line: str, out: list[ProgressEvent]) -> None:
        if self._in_json:
            # the JSON dump of process[0] at start echoes user text (prompts, paths): never parse it
            if line == "}":
                self._in_json = False
            return
        if line == "{":
            self._in_json = True
            return
        s = line.strip()
        if not s:
            return
        if s == _NAN_LINE or s.startswith(_NAN_LINE):
            self.nan_streak += 1
            out.append(Notice(NoticeKind.NAN_LOSS, s))
            if self.nan_limit and self.nan_streak >= self.nan_limit:
                self._fail(FailureKind.NAN_LOSS, f"{s} ({self.nan_streak} steps in a row)", out)
            return
        # notices first: the OOM-skip banner must not read as a fatal OOM
        if "OOM during training step, skipping" in s:
            out.append(Notice(NoticeKind.OOM_SKIPPED, s))
            return
        if "Not enough free disk space" in s:
            out.append(Notice(NoticeKind.LOW_DISK, s))
            return
        m = _FAIL_RE.search(s)
        if m is not None:
            self._fail(FailureKind(m.lastgroup or "unknown"), s, out)
            return
        if self._not_found is None and _NOT_FOUND_RE.search(s) is not None:
            self._not_found = s
            return
        c = s[0]
        if c == "E" and s.startswith("Error running job:"):
            if self._unknown is None:
                self._unknown = s
            return
        if c == "T" and s.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return
        if self._in_traceback and line[0] not in " \t" and _EXC_LINE_RE.match(s):
            self._exc_line = s
            self._in_traceback = False
            return
        if c == "S":
            if s.startswith("Saving at step"):
                self._set_phase(Phase.SAVING, s, out)
                return
            if s.startswith("Saved checkpoint to"):
                self._checkpoint(s[len("Saved checkpoint to") :].strip(), out)
                return
            if s.startswith("Saved optimizer to"):
                out.append(Notice(NoticeKind.OPTIMIZER_SAVED, s[len("Saved optimizer to") :].strip()))
                return
        if c == "#":
            mj = _RUNNING_JOB_RE.match(s)
            if mj is not None:
                if self.job_name is None:
                    self._set_job(mj.group(1))
                return
            if "RESUMING FROM" in s:
                out.append(Notice(NoticeKind.RESUMING, s))
                return
        if c == "R" and s.startswith("Removing old save"):
            out.append(Notice(NoticeKind.REMOVED_SAVE, s))
            return
        if c in _PHASE_FIRST_CHARS:
            for prefix, phase in _PHASE_PREFIXES:
                if s.startswith(prefix):
                    if phase in _LOAD_PHASES and (self._trained or s.endswith(_NOT_A_PHASE)):
                        return  # Schnell's assistant LoRA around sample rounds; model loading is over
                    self._set_phase(phase, s, out)
                    return
        if "__" in s and "samples" in s:
            sample = parse_sample_path(s)
            if sample is not None:
                out.append(sample)

    def _checkpoint(self, path: str, out: list[ProgressEvent]) -> None:
        m = _CKPT_STEP_RE.search(path)
        final = m is None and path.endswith(".safetensors")
        if not path.endswith(".safetensors"):
            return
        self._set_phase(Phase.SAVING, f"Saved checkpoint to {path}", out)
        step = int(m.group(1)) if m else self.step
        if final:
            self.final_checkpoint = path
        out.append(CheckpointSaved(path, step, final))

    def _fail(self, kind: FailureKind, line: str, out: list[ProgressEvent]) -> None:
        if self.failure is not None:
            return
        self.failure = Failure(kind, line, tuple(self._tail))
        out.append(self.failure)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --- stall detection --------------------------------------------------------------------------
class StallDetector:
    """No new output for `timeout_s` in a phase that should print -> one Stalled per silence.

    Training and sampling print a bar per step, so their timeout is stretched to `step_factor` times
    the last seen s/it when that is longer. After a failure or `done` nothing more is expected.
    `clock` is injectable for tests; call `record()` for every chunk read (even one with no events).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        phase_timeouts: Mapping[Phase, float] | None = None,
        step_factor: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self.phase_timeouts = dict(phase_timeouts or {})
        self.step_factor = step_factor
        self.clock = clock
        self.phase: Phase | None = None
        self.sec_per_it: float | None = None
        self.finished = False
        self.last_output = clock()
        self._reported = False

    def record(self, events: Sequence[ProgressEvent] = ()) -> None:
        self.last_output = self.clock()
        self._reported = False
        for ev in events:
            if isinstance(ev, PhaseChanged):
                self.phase = ev.phase
                self.finished = self.finished or ev.phase is Phase.DONE
            elif isinstance(ev, Step) and ev.sec_per_it is not None:
                self.sec_per_it = ev.sec_per_it
            elif isinstance(ev, Failure):
                self.finished = True

    def current_timeout(self) -> float:
        timeout = self.phase_timeouts.get(self.phase, self.timeout_s) if self.phase else self.timeout_s
        if self.phase in (Phase.TRAINING, Phase.SAMPLING, Phase.SAVING) and self.sec_per_it:
            timeout = max(timeout, self.step_factor * self.sec_per_it)
        return timeout

    def check(self) -> Stalled | None:
        if self.finished or self._reported:
            return None
        silent = self.clock() - self.last_output
        timeout = self.current_timeout()
        if silent < timeout:
            return None
        self._reported = True
        return Stalled(self.phase, silent, timeout)


# --- end of run -------------------------------------------------------------------------------
class Outcome(BaseModel):
    success: bool
    kind: FailureKind | None = None
    reason: str
    line: str | None = None
    exit_code: int | None = None
    warning: str | None = None  # success despite a late error: what went wrong after the final save


_SIGNAL_STOP = {130, -2, 143, -15}  # SIGINT / SIGTERM: a stop we (or someone) asked for
_SIGNAL_KILL = {137, -9}


def classify_exit(
    exit_code: int | None, final_lora_exists: bool, log: ProgressParser | str | Sequence[str]
) -> Outcome:
    """§4: success = the final `<name>.safetensors` exists, no "Job stopped" banner (current
    ai-toolkit exits 0 after SIGINT), and either exit 0 or the final `Saved checkpoint to` line was
    seen: the final sampling pass runs after the final save, and an error there (OOM, a host fault)
    leaves a complete LoRA, passed on with a warning. Otherwise the failure class from the log, then
    from the exit code.

    `log` is the live parser that read the whole run (closed here if it is not yet): its state is
    the truth. A text is parsed afresh, which is only right for a whole log: a tail can start inside
    the config dump, whose prompts would read as log lines."""
    if isinstance(log, ProgressParser):
        parser = log
    else:
        parser = ProgressParser()
        parser.feed((log if isinstance(log, str) else "\n".join(log)).encode("utf-8", "replace"))
    if not parser._closed:
        parser.close()
    failure = parser.failure
    stopped = (failure is not None and failure.kind is FailureKind.JOB_STOPPED) or exit_code in _SIGNAL_STOP
    if final_lora_exists and not stopped:
        if exit_code == 0:
            return Outcome(success=True, reason="training finished and the final LoRA exists", exit_code=0)
        if parser.final_checkpoint is not None:
            late = _REASONS[failure.kind] if failure is not None else f"the trainer exited with code {exit_code}"
            return Outcome(
                success=True, reason="the final LoRA was saved before the trainer failed", exit_code=exit_code,
                line=failure.line if failure is not None else None,
                warning=f"after the final save: {late}; the LoRA is complete",
            )
    if failure is not None and failure.kind is not FailureKind.UNKNOWN:
        return Outcome(
            success=False, kind=failure.kind, reason=_REASONS[failure.kind], line=failure.line, exit_code=exit_code
        )
    if exit_code in _SIGNAL_KILL:
        return Outcome(success=False, kind=FailureKind.KILLED, reason=_REASONS[FailureKind.KILLED], exit_code=exit_code)
    if exit_code in _SIGNAL_STOP:
        return Outcome(
            success=False, kind=FailureKind.JOB_STOPPED, reason="interrupted by a signal", exit_code=exit_code
        )
    line = failure.line if failure is not None else None
    if exit_code == 0:
        reason = "exited 0 but the final LoRA file is missing"
    elif exit_code is None:
        reason = "the trainer's exit status is unknown"
    else:
        reason = f"the trainer exited with code {exit_code}"
    return Outcome(success=False, kind=FailureKind.UNKNOWN, reason=reason, line=line, exit_code=exit_code)


_REASONS: dict[FailureKind, str] = {
    FailureKind.CUDA_OOM: "the GPU ran out of memory",
    FailureKind.GATED_MODEL: "the base model is gated: the HF token is missing or its licence is not accepted",
    FailureKind.MODEL_NOT_FOUND: "the base model repository does not exist on Hugging Face (check the model path)",
    FailureKind.HOST_FAULT: "the rented GPU or its driver failed (a fault of the machine, not of the job)",
    FailureKind.NAN_LOSS: "the loss became NaN: training diverged (try a lower learning rate)",
    FailureKind.DISK_FULL: "the rented machine's disk is full",
    FailureKind.NO_IMAGES: "the trainer found no images in the dataset",
    FailureKind.JOB_STOPPED: "the job was stopped",
    FailureKind.KILLED: "the trainer was killed (SIGKILL; often the out-of-memory killer for system RAM)",
    FailureKind.STALLED: "the trainer stopped printing output",
    FailureKind.UNKNOWN: "the trainer failed",
}
