"""services.progress: ai-toolkit output -> events, on real lines from the reference and long streams."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.progress import (
    CheckpointSaved,
    DownloadProgress,
    Failure,
    FailureKind,
    Notice,
    NoticeKind,
    Phase,
    PhaseChanged,
    ProgressEvent,
    ProgressParser,
    SampleWritten,
    StallDetector,
    Stalled,
    Step,
    classify_exit,
    event_to_dict,
    parse_sample_path,
    step_stride,
)


def _load_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "progress.py"
    spec = importlib.util.spec_from_file_location("bench_progress", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_progress"] = mod
    spec.loader.exec_module(mod)
    return mod


generate_stream = _load_bench().generate_stream

LINE_818 = "my_first_lora_v1:   1%|   | 19/3000 [05:35<14:36:19, 17.64s/it, lr: 1.0e-04 loss: 1.038e+00]"


def parse(data: bytes, job: str | None = None, chunks: list[int] | None = None, **kw: bool) -> list[ProgressEvent]:
    p = ProgressParser(job, **kw)
    out: list[ProgressEvent] = []
    if chunks is None:
        out += p.feed(data)
    else:
        pos = 0
        for size in chunks:
            out += p.feed(data[pos : pos + size])
            pos += size
        out += p.feed(data[pos:])
    return out + p.close()


def of(events: list[ProgressEvent], cls: type) -> list:
    return [e for e in events if isinstance(e, cls)]


# --- real lines from the reference -----------------------------------------------------------
@pytest.mark.parametrize("job", ["my_first_lora_v1", None])
def test_issue_818_progress_line(job: str | None) -> None:
    events = parse(LINE_818.encode() + b"\n", job)
    assert events[0] == PhaseChanged(Phase.TRAINING, job or "")
    (step,) = of(events, Step)
    assert (step.step, step.total, step.sec_per_it, step.lr, step.loss) == (19, 3000, 17.64, 1e-4, 1.038)
    assert step.eta_s == pytest.approx(2981 * 17.64)


def test_it_per_s_is_converted_and_first_frame_without_rate() -> None:
    data = (
        b"j:   0%|          | 0/10 [00:00<?, ?it/s]"
        b"\rj:  50%|#####     | 5/10 [00:01<00:01,  4.00it/s, lr: 4.0e-04 loss: 2.500e-01]\n"
    )
    steps = of(parse(data, "j"), Step)
    assert steps[0] == Step(0, 10, None, None, None, None, 0.0)
    assert steps[1].sec_per_it == pytest.approx(0.25) and steps[1].loss == 0.25


def test_cr_separated_redraws_every_step_and_terminal_tail() -> None:
    frames = "".join(
        f"\rj: {i:3d}%|          | {i}/100 [{i * 3 // 2 // 60:02d}:{i * 3 // 2 % 60:02d}<00:10,  1.10s/it, "
        f"lr: 1.0e-04 loss: {i / 100:.3e}]"
        for i in range(1, 101)
    )
    p = ProgressParser("j")
    events = p.feed(frames.encode()) + p.close()
    assert [s.step for s in of(events, Step)] == list(range(1, 101))
    assert p.tail() == [frames.rsplit("\r", 1)[1]]  # redraws collapse like a terminal
    # s/it is measured from the elapsed field over a window, not the frame's smoothed rate
    assert (p.step, p.total) == (100, 100) and p.sec_per_it == pytest.approx(1.5, rel=0.02)


def test_long_runs_report_every_stride_plus_first_and_last() -> None:
    assert [step_stride(n) for n in (100, 250, 251, 2500, 3000, 25000, 30000)] == [1, 1, 5, 5, 10, 10, 100]
    frames = "".join(f"\rj: 1%|  | {i}/3000 [00:01<00:10, 1.50s/it, lr: 1.0e-04 loss: 1.0e-01]" for i in range(0, 38))
    data = frames.encode() + b"\nSaving at step 37\n"
    assert [s.step for s in of(parse(data, "j"), Step)] == [0, 10, 20, 30, 37]
    assert [s.step for s in of(parse(data, "j", all_steps=True), Step)] == list(range(38))


def test_download_bar_and_phase() -> None:
    line = "diffusion_pytorch_model-00001-of-00003.safetensors:  45%|████▌     | 4.49G/9.95G [00:41<00:50, 109MB/s]\n"
    events = parse(line.encode())
    assert events[0].phase is Phase.DOWNLOADING  # type: ignore[union-attr]
    (dl,) = of(events, DownloadProgress)
    assert (dl.bytes_done, dl.bytes_total, dl.bytes_per_s) == (4_490_000_000, 9_950_000_000, 109e6)
    assert dl.file.startswith("diffusion_pytorch_model-00001")


def test_model_loading_lines_map_to_phases() -> None:
    text = (
        "Loading Flux model\nLoading transformer\nQuantizing transformer\nLoading VAE\nLoading T5\n"
        "Quantizing T5\nLoading CLIP\nMaking pipe\nPreparing Model\nGrabbing lora from the hub: x\n"
        "Fusing in LoRA\nCaching latents for /d\nCaching latents to disk:  50%|#  | 1/2 [00:01<00:01,  1.00it/s]\n"
        "Generating baseline samples before training\n"
    )
    phases = [(e.phase, e.detail) for e in of(parse(text.encode()), PhaseChanged)]
    assert phases == [
        (Phase.LOADING, "Loading Flux model"),
        (Phase.QUANTIZING, "Quantizing transformer"),
        (Phase.LOADING, "Loading VAE"),
        (Phase.QUANTIZING, "Quantizing T5"),
        (Phase.LOADING, "Loading CLIP"),
        (Phase.DOWNLOADING, "Grabbing lora from the hub: x"),
        (Phase.LOADING, "Fusing in LoRA"),
        (Phase.CACHING_LATENTS, "Caching latents for /d"),
        (Phase.SAMPLING, "Generating baseline samples before training"),
    ]


def test_saves_checkpoints_notices_and_samples() -> None:
    text = (
        "#### IMPORTANT RESUMING FROM /o/j/j_000000250.safetensors ####\n"
        "j:   8%|  | 250/3000 [00:01<00:10, 1.50s/it, lr: 1.0e-04 loss: 1.0e-01]\n"
        "Saving at step 250\nSaved checkpoint to /o/j/j_000000250.safetensors\nSaved optimizer to /o/j/optimizer.pt\n"
        "Removing old save: /o/j/j_000000000.safetensors\n"
        "Sample written: /o/j/samples/1724243000123__000000250_1.jpg\n"
        "##########\n# OOM during training step, skipping batch 1/3 #\n##########\n"
        "j: 100%|  | 3000/3000 [00:01<00:00, 1.50s/it, lr: 1.0e-04 loss: 1.0e-01]\n"
        "Saved checkpoint to /o/j/j.safetensors\n\n"
    )
    events = parse(text.encode(), "j")
    assert of(events, Notice) == [
        Notice(NoticeKind.RESUMING, "#### IMPORTANT RESUMING FROM /o/j/j_000000250.safetensors ####"),
        Notice(NoticeKind.OPTIMIZER_SAVED, "/o/j/optimizer.pt"),  # backed up with its checkpoint
        Notice(NoticeKind.REMOVED_SAVE, "Removing old save: /o/j/j_000000000.safetensors"),
        Notice(NoticeKind.OOM_SKIPPED, "# OOM during training step, skipping batch 1/3 #"),
    ]
    assert of(events, CheckpointSaved) == [
        CheckpointSaved("/o/j/j_000000250.safetensors", 250, False),
        CheckpointSaved("/o/j/j.safetensors", 3000, True),
    ]
    assert of(events, SampleWritten) == [SampleWritten("/o/j/samples/1724243000123__000000250_1.jpg", 250, 1)]
    assert not of(events, Failure)
    assert events[-1] == PhaseChanged(Phase.DONE)


def test_parse_sample_path() -> None:
    assert parse_sample_path("/o/j/samples/1724243000123__000000500_0.jpg") == SampleWritten(
        "/o/j/samples/1724243000123__000000500_0.jpg", 500, 0
    )
    assert parse_sample_path("/o/j/samples/.tmp") is None


# --- a long generated stream ------------------------------------------------------------------
def test_generated_stream_event_sequence() -> None:
    data = generate_stream(job="lora_gen", steps=3000, save_every=250, sample_every=500)
    assert data.count(b"\n") + data.count(b"\r") > 3000
    p = ProgressParser()  # the job name is learnt from the "# Running job:" banner
    events = p.feed(data) + p.close()
    assert p.job_name == "lora_gen"
    phases = [e.phase for e in of(events, PhaseChanged)]
    assert phases[:9] == [
        Phase.LOADING, Phase.DOWNLOADING, Phase.QUANTIZING, Phase.LOADING, Phase.QUANTIZING, Phase.LOADING,
        Phase.CACHING_LATENTS, Phase.SAMPLING, Phase.TRAINING,
    ]
    assert phases[-3:] == [Phase.SAVING, Phase.SAMPLING, Phase.DONE]
    ckpts = of(events, CheckpointSaved)
    assert [c.step for c in ckpts] == [*range(250, 3000, 250), 3000]
    assert [c.final for c in ckpts] == [False] * 11 + [True]
    assert p.final_checkpoint == "/workspace/lorabot/output/lora_gen/lora_gen.safetensors"
    steps = [s.step for s in of(events, Step)]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 3000
    assert set(range(10, 3001, 10)) <= set(steps)  # stride 10 for 3000 steps
    assert len(steps) < 400
    # the config dump's decoy prompts ("Saving at step 5", "CUDA out of memory") stay inert
    assert not of(events, Failure) and 5 not in [c.step for c in ckpts]
    assert sum(1 for e in of(events, DownloadProgress) if e.bytes_done == e.bytes_total) == 3
    json.dumps([event_to_dict(e) for e in events])  # serialisable for logs and the store


FAILURE_TAIL = (
    b"Saving at step 10\nSaved checkpoint to /o/j/j_000000010.safetensors\n"
    b"Error running job: 401 Client Error. (Request ID: Root=1-abc)\n\n"
    b"Cannot access gated repo for url https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/x.\n"
    b"caf\xc3\xa9 \xff\xfe broken bytes\r\n"
    b"========================================\nResult:\n - 0 completed jobs\n - 1 failure\n"
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_chunk_boundaries_never_change_events(data: st.DataObject) -> None:
    stream = generate_stream(job="j", steps=400, save_every=100, sample_every=200) + FAILURE_TAIL
    whole = parse(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    sizes = [b - a for a, b in itertools.pairwise([0, *cuts])]
    assert parse(stream, chunks=sizes) == whole
    tiny = data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=400))
    assert parse(stream, chunks=tiny) == whole


def test_byte_by_byte_equals_whole() -> None:
    stream = generate_stream(job="j", steps=300) + FAILURE_TAIL
    assert parse(stream, chunks=[1] * len(stream)) == parse(stream)


def test_invalid_and_split_utf8_is_tolerated() -> None:
    line = "Dataset: /data/ÉÆ日本\n".encode() + b"\xff\xfe\x80 junk\nError running job: bad \xe2\x28\xa1 value\n"
    for chunks in (None, [1] * len(line), [14, 1, 1, 3]):
        events = parse(line, chunks=chunks)
        (fail,) = of(events, Failure)
        assert fail.kind is FailureKind.UNKNOWN and fail.line.startswith("Error running job: bad \ufffd")
        assert "Dataset: /data/ÉÆ日本" in fail.last_lines


def test_overlong_line_is_bounded() -> None:
    p = ProgressParser("j")
    for _ in range(200):
        assert p.feed(b"x" * 10_000) == []
    assert len(p._pending) < 100_000
    events = p.feed(b"tail\nLoading VAE\n")
    assert events == [PhaseChanged(Phase.LOADING, "Loading VAE")]


def test_feed_after_close_is_an_error() -> None:
    p = ProgressParser()
    p.close()
    with pytest.raises(RuntimeError):
        p.feed(b"x\n")


# --- every failure class ----------------------------------------------------------------------
TRAINING = b"j:   1%|  | 7/3000 [00:01<00:10, 1.50s/it, lr: 1.0e-04 loss: 1.0e-01]\n"


@pytest.mark.parametrize(
    ("text", "kind", "line"),
    [
        (
            b"Error running job: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
            b"47.54 GiB of which 11.06 MiB is free. Process 1234 has 13.20 GiB memory in use.\n",
            FailureKind.CUDA_OOM,
            "Error running job: CUDA out of memory. Tried to allocate 20.00 MiB.",
        ),
        (
            b"# OOM during training step, skipping batch 3/3 #\n"
            b"RuntimeError: OOM during training step 3 times in a row, aborting training\n",
            FailureKind.CUDA_OOM,
            "RuntimeError: OOM during training step 3 times in a row",
        ),
        (
            b"Error running job: 401 Client Error. (Request ID: Root=1-66)\n\nCannot access gated repo for url "
            b"https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/model_index.json.\nAccess to model "
            b"black-forest-labs/FLUX.1-dev is restricted. You must have access to it and be authenticated to "
            b"access it. Please log in.\n",
            FailureKind.GATED_MODEL,
            "Cannot access gated repo",
        ),
        (
            b"huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: x)\n",
            FailureKind.GATED_MODEL,
            "huggingface_hub.errors.GatedRepoError",
        ),
        (
            b"Error running job: black-forest-labs/FLUX.1-dev does not appear to have a file named config.json.\n",
            FailureKind.GATED_MODEL,
            "Error running job: black-forest-labs/FLUX.1-dev does not appear",
        ),
        (
            b"UserWarning: Not enough free disk space to download the file. The expected file size is: 9984.00 MB. "
            b"The target location /root/.cache only has 2000.00 MB free disk space.\n"
            b"OSError: [Errno 28] No space left on device\n",
            FailureKind.DISK_FULL,
            "OSError: [Errno 28] No space left on device",
        ),
        (
            b"Error running job: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })\n",
            FailureKind.DISK_FULL,
            "Error running job: IoError(Os { code: 28, kind: StorageFull",
        ),
        (b"RuntimeError: Data processing error: No space left on device (os error 28)\n", FailureKind.DISK_FULL,
         "RuntimeError: Data processing error"),
        (
            b"Error running job: no images found in /workspace/lorabot/datasets/j\n"
            b"AssertionError: no images found in /workspace/lorabot/datasets/j\n",
            FailureKind.NO_IMAGES,
            "Error running job: no images found in /workspace/lorabot/datasets/j",
        ),
        (b"========================================\nJob stopped\n========================================\n",
         FailureKind.JOB_STOPPED, "Job stopped"),
        (b"Error running job: Job stopped\n", FailureKind.JOB_STOPPED, "Error running job: Job stopped"),
        (b"Error running job: Environment variable HF_HOME not set\nResult:\n - 1 failure\n",
         FailureKind.UNKNOWN, "Error running job: Environment variable HF_HOME not set"),
        (b"Traceback (most recent call last):\n  File \"run.py\", line 1, in <module>\n    main()\n"
         b"ValueError: something odd\n", FailureKind.UNKNOWN, "ValueError: something odd"),
    ],
)
def test_failure_classes(text: bytes, kind: FailureKind, line: str) -> None:
    p = ProgressParser("j")
    events = p.feed(TRAINING + text) + p.close()
    (fail,) = of(events, Failure)
    assert fail.kind is kind and fail.line.startswith(line)
    assert (fail.last_lines and fail.last_lines[-1] == fail.line) or kind is FailureKind.UNKNOWN
    assert p.failure == fail
    assert PhaseChanged(Phase.DONE) not in events
    # the step the run reached is reported before the failure
    assert of(events, Step)[-1].step == 7
    if kind is FailureKind.DISK_FULL and b"UserWarning" in text:
        assert of(events, Notice)[0].kind is NoticeKind.LOW_DISK
    if kind is FailureKind.UNKNOWN:
        assert events[-1] is fail  # held back until close: nothing more specific followed


def test_specific_failure_is_reported_immediately() -> None:
    p = ProgressParser("j")
    events = p.feed(b"Error running job: CUDA out of memory. Tried to allocate 1 GiB\n")
    assert [e.kind for e in of(events, Failure)] == [FailureKind.CUDA_OOM]
    assert p.feed(b"torch.OutOfMemoryError: CUDA out of memory.\n") == []  # only the first failure
    assert p.close() == []


# --- end of run ---------------------------------------------------------------------------------
SUCCESS_TAIL = (
    "j: 100%|#| 10/10 [00:10<00:00, 1.00s/it, lr: 1.0e-04 loss: 1.0e-01]\n"
    "Saved checkpoint to /o/j/j.safetensors\n"
)


def test_classify_exit_success_needs_all_three() -> None:
    assert classify_exit(0, True, SUCCESS_TAIL).success is True
    out = classify_exit(0, False, SUCCESS_TAIL)
    assert (out.success, out.kind) == (False, FailureKind.UNKNOWN)
    assert out.reason == "exited 0 but the final LoRA file is missing"
    stopped = classify_exit(0, True, [*SUCCESS_TAIL.splitlines(), "=" * 40, "Job stopped", "=" * 40])
    assert (stopped.success, stopped.kind) == (False, FailureKind.JOB_STOPPED)
    # the final save was seen: a later error (the final sampling pass) is a warning, not a failure
    late = classify_exit(1, True, SUCCESS_TAIL)
    assert late.success is True and late.warning and "after the final save" in late.warning
    assert classify_exit(1, True, "j: 100%|#| 10/10 [00:10<00:00, 1.00s/it]\n").success is False


@pytest.mark.parametrize(
    ("code", "tail", "kind"),
    [
        (1, "Error running job: CUDA out of memory. Tried to allocate 2 GiB", FailureKind.CUDA_OOM),
        (1, "OSError: [Errno 28] No space left on device", FailureKind.DISK_FULL),
        (137, "Quantizing transformer", FailureKind.KILLED),
        (-9, "", FailureKind.KILLED),
        (143, "Loading T5", FailureKind.JOB_STOPPED),
        (-2, "", FailureKind.JOB_STOPPED),
        (1, "Error running job: weird\nResult:\n - 1 failure", FailureKind.UNKNOWN),
        (None, "", FailureKind.UNKNOWN),
    ],
)
def test_classify_exit_failures(code: int | None, tail: str, kind: FailureKind) -> None:
    out = classify_exit(code, False, tail)
    assert out.success is False and out.kind is kind and out.reason
    assert out.exit_code == code
    json.loads(out.model_dump_json())


# --- stall detection ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_stall_detector() -> None:
    clock = Clock()
    det = StallDetector(600, phase_timeouts={Phase.QUANTIZING: 900}, clock=clock)
    det.record([PhaseChanged(Phase.LOADING)])
    clock.t += 599
    assert det.check() is None
    clock.t += 2
    stall = det.check()
    assert stall == Stalled(Phase.LOADING, 601.0, 600.0)
    assert det.check() is None  # once per silence
    det.record([PhaseChanged(Phase.QUANTIZING)])  # quantizing may be silent longer
    clock.t += 800
    assert det.check() is None
    clock.t += 101
    assert isinstance(det.check(), Stalled)
    # a slow step stretches the training timeout
    det.record([PhaseChanged(Phase.TRAINING), Step(1, 10, 200.0, None, None, None)])
    clock.t += 900
    assert det.check() is None
    clock.t += 101
    assert det.check() == Stalled(Phase.TRAINING, 1001.0, 1000.0)
    det.record([Failure(FailureKind.CUDA_OOM, "x", ())])
    clock.t += 10_000
    assert det.check() is None


def test_stall_detector_done_and_bad_timeout() -> None:
    clock = Clock()
    det = StallDetector(5, clock=clock)
    det.record()
    clock.t += 6
    assert det.check() == Stalled(None, 6.0, 5.0)
    det.record([PhaseChanged(Phase.DONE)])
    clock.t += 60
    assert det.check() is None
    with pytest.raises(ValueError):
        StallDetector(0)


# --- against the stand-in trainer (tests/sim/trainer/run.py) with rendered configs --------------
TRAINER = Path(__file__).resolve().parents[2] / "tests" / "sim" / "trainer" / "run.py"


@pytest.mark.skipif(not TRAINER.exists(), reason="stand-in trainer not present")
@pytest.mark.parametrize(
    ("preset", "fault", "kind"),
    [
        ("character", "", None),
        ("fast", "", None),
        ("style", "oom@step7", FailureKind.CUDA_OOM),
        ("fast", "gated", FailureKind.GATED_MODEL),
        ("fast", "disk_full", FailureKind.DISK_FULL),
        ("fast", "exception@step5", FailureKind.UNKNOWN),
    ],
)
def test_stand_in_trainer_output(tmp_path: Path, preset: str, fault: str, kind: FailureKind | None) -> None:
    import os
    import subprocess

    from PIL import Image

    from services.recipe import FluxRecipe, expected_outputs, render_config

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a photo of ohwx")
    recipe = FluxRecipe.from_preset(preset, name="n", trigger_word="ohwx", steps=20, save_every=10, sample_every=10)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(render_config(recipe, job_name="lora_t", dataset_dir=str(data), training_folder=str(tmp_path / "o")))
    env = {**os.environ, "LORABOT_SIM_SEC_PER_STEP": "0", "LORABOT_SIM_FAULT": fault,
           "HF_TOKEN": "" if fault == "gated" else "hf_x", "PYTHONUNBUFFERED": "1"}
    # one pipe for both, as the supervisor's log file has them
    proc = subprocess.run([sys.executable, str(TRAINER), str(cfg)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    stream = proc.stdout
    events = parse(stream, "lora_t", chunks=[97] * (len(stream) // 97))
    assert events == parse(stream)
    final = Path(expected_outputs("lora_t", str(tmp_path / "o")).final_lora)
    outcome = classify_exit(proc.returncode, final.exists(), stream.decode(errors="replace"))
    if kind is None:
        assert proc.returncode == 0, stream.decode(errors="replace")[-2000:]
        assert outcome.success and final.exists()
        assert [c.step for c in of(events, CheckpointSaved)][-1] == 20
        assert of(events, Step)[-1].step == 20
        assert not of(events, Failure)
    else:
        assert not outcome.success and outcome.kind is kind, (outcome, stream.decode(errors="replace")[-1500:])
        assert [f.kind for f in of(events, Failure)][:1] == [kind]


# --- the real ai-toolkit (issue 16) -----------------------------------------------------------
@pytest.mark.parametrize(
    "line",
    [
        "Error running job: CUDA error: uncorrectable ECC error encountered",
        "RuntimeError: CUDA driver version is insufficient for CUDA runtime version",
        "RuntimeError: No CUDA GPUs are available; no CUDA-capable device is detected",
        "torch.AcceleratorError: CUDA error: unspecified launch failure",
        "NVRM: Xid (PCI:0000:01:00): 79, pid=1234, GPU has fallen off the bus.",
    ],
)
def test_host_and_driver_faults(line: str) -> None:
    p = ProgressParser("j")
    (fail,) = of(p.feed(TRAINING + line.encode() + b"\n") + p.close(), Failure)
    assert fail.kind is FailureKind.HOST_FAULT
    assert classify_exit(1, False, p).kind is FailureKind.HOST_FAULT


MISSING_REPO = (
    b"Error running job: someone/FLUX.1-dvv is not a local folder and is not a valid model identifier listed on "
    b"'https://huggingface.co/models'\n"
    b"If this is a private repository, make sure to pass a token having permission to this repo\n"
    b"Traceback (most recent call last):\n"
    b"huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. (Request ID: Root=1-x)\n\n"
    b"Repository Not Found for url: https://huggingface.co/api/models/someone/FLUX.1-dvv.\n"
)


def test_a_missing_repo_is_not_a_gated_one() -> None:
    p = ProgressParser("j")
    (fail,) = of(p.feed(MISSING_REPO) + p.close(), Failure)
    assert fail.kind is FailureKind.MODEL_NOT_FOUND
    # the same wrapper with GatedRepoError in the chained traceback: gated after all
    gated = MISSING_REPO + b"huggingface_hub.errors.GatedRepoError: 403 Client Error.\n"
    p = ProgressParser("j")
    (fail,) = of(p.feed(gated) + p.close(), Failure)
    assert fail.kind is FailureKind.GATED_MODEL


def test_schnell_assistant_lora_lines_do_not_flip_the_phase() -> None:
    data = (
        b"Loading assistant lora\nFusing in LoRA\n"
        + TRAINING
        + b"Unloading assistant lora\nGenerating Images:   0%|          | 0/2 [00:00<?, ?it/s]\r"
        b"Loading assistant lora\nLoading transformer\n"
        + TRAINING.replace(b" 7/3000", b" 8/3000")
    )
    phases = [e.phase for e in of(parse(data, "j"), PhaseChanged)]
    assert phases == [Phase.LOADING, Phase.TRAINING, Phase.SAMPLING, Phase.TRAINING]


def test_a_handled_traceback_in_a_run_that_saved_its_final_file_is_done() -> None:
    data = (
        TRAINING
        + b"Traceback (most recent call last):\n  File \"data_loader.py\", line 550\n"
        b"PIL.UnidentifiedImageError: cannot identify image file '/d/bad.png'\n"
        + b"Saved checkpoint to /o/j/j.safetensors\n"
    )
    events = parse(data, "j")
    assert events[-1] == PhaseChanged(Phase.DONE) and not of(events, Failure)
    # with "Error running job" after the final save it is a failure of the run, the LoRA still counts
    late = data + b"Error running job: boom\n"
    p = ProgressParser("j")
    events = p.feed(late) + p.close()
    assert of(events, Failure)[0].kind is FailureKind.UNKNOWN
    out = classify_exit(1, True, p)
    assert out.success and out.warning and "after the final save" in out.warning


def test_classify_exit_from_the_live_parser_ignores_the_prompts_in_the_config_dump() -> None:
    """A 40-line tail can start inside the config dump: its prompts would read as log lines."""
    prompts = b"".join(b'    "prompt %d": "a cat, Job stopped, KeyboardInterrupt",\n' % i for i in range(60))
    dump = b"{\n" + prompts + b"}\n"
    data = dump + b"Loading transformer\nError running job: weird\n"
    p = ProgressParser("j")
    p.feed(data)
    tail = p.tail()
    assert classify_exit(1, False, p).kind is FailureKind.UNKNOWN
    assert classify_exit(1, False, tail).kind is FailureKind.JOB_STOPPED  # the old way was fooled


def test_two_frames_per_step_report_each_step_once_with_its_own_loss() -> None:
    # ai-toolkit's order: postfix refresh (old count, new loss), then update (new count, same loss)
    frames = "j:   0%|  | 0/100 [00:00<?, ?it/s]"
    for k in range(1, 31):
        frames += f"\rj:   1%|  | {k - 1}/100 [00:{k:02d}<00:10,  1.00s/it, lr: 1.0e-04 loss: {k / 100:.3e}]"
        frames += f"\rj:   1%|  | {k}/100 [00:{k:02d}<00:10,  1.00s/it, lr: 1.0e-04 loss: {k / 100:.3e}]"
    frames += f"\rj:  30%|  | 30/100 [00:30<00:10,  1.00s/it, lr: 1.0e-04 loss: {30 / 100:.3e}]\n"
    for chunk in (None, [5] * 2000, [333] * 40):
        steps = of(parse(frames.encode(), "j", chunks=chunk, all_steps=True), Step)
        assert [s.step for s in steps] == list(range(31))
        assert [s.loss for s in steps[1:]] == [k / 100 for k in range(1, 31)]
