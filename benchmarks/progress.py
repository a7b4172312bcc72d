"""Throughput of services.progress.ProgressParser on a generated ai-toolkit stream.

    python benchmarks/progress.py [--steps N] [--chunk BYTES] [--goal MBPS]

The stream mimics a real FLUX run (reference/ai-toolkit.md §4): start-up banner and config dump,
HF download bars, loading/quantizing, latent caching, baseline samples, two tqdm redraws (`\\r`) per
training step with lr/loss (as ai-toolkit draws them), periodic saves and samples, the final save.
Exit status 1 below the goal.
`generate_stream` is also used by tests/services/test_progress.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.progress import ProgressParser

BAR = "██████████"


def _bar(desc: str, n: int, total: int, rate: str, post: str = "") -> str:
    pct = n * 100 // total if total else 0
    filled = BAR[: pct // 10].ljust(10)
    return f"{desc}: {pct:3d}%|{filled}| {n}/{total} [00:{n % 60:02d}<01:{(total - n) % 60:02d}, {rate}{post}]"


def generate_stream(
    job: str = "lora_bench",
    steps: int = 3000,
    save_every: int = 250,
    sample_every: int = 250,
    prompts: int = 2,
    out: str = "/workspace/lorabot/output",
    dataset: str = "/workspace/lorabot/datasets/lora_bench",
) -> bytes:
    """A whole successful run; every training step is one `\\r` redraw with lr and loss."""
    parts: list[str] = []
    w = parts.append
    w("Running 1 job\n{\n")
    w('    "type": "sd_trainer",\n    "trigger_word": "ohwx",\n')
    # user text in the config dump must stay inert: these are not real events
    w('    "prompts": ["Saving at step 5", "CUDA out of memory", "Job stopped"]\n}\n')
    w("Using EMA\n#############################################\n")
    w(f"# Running job: {job}\n#############################################\n\nRunning  1 process\n")
    w("Loading Flux model\nLoading transformer\n")
    for shard in range(1, 4):
        name = f"diffusion_pytorch_model-0000{shard}-of-00003.safetensors"
        for g in range(0, 10):
            w(f"\r{name}: {g * 10:3d}%|{BAR[:g]:<10}| {g}.00G/9.98G [00:{g:02d}<00:45, 215MB/s]")
        w(f"\r{name}: 100%|{BAR}| 9.98G/9.98G [00:46<00:00, 215MB/s]\n")
    w("Quantizing transformer\nLoading VAE\nLoading T5\n")
    w(f"\r{_bar('Loading checkpoint shards', 2, 2, ' 1.50it/s')}\n")
    w("Quantizing T5\nLoading CLIP\nMaking pipe\nPreparing Model\n")
    w("create LoRA network. base dim (rank): 16, alpha: 16\ncreate LoRA for U-Net: 494 modules.\n")
    w(f"Dataset: {dataset}\n  -  Preprocessing image dimensions\n  -  Found 20 images\n")
    w(f"Bucket sizes for {dataset}:\n1024x1024: 20 files\n1 buckets made\n")
    w(f"Caching latents for {dataset}\n - Saving latents to disk\n")
    for i in range(21):
        w("\r" + _bar("Caching latents to disk", i, 20, " 3.91it/s"))
    w("\nGenerating baseline samples before training\n")

    def samples(step: int) -> None:
        for i in range(prompts + 1):
            w("\r" + _bar("Generating Images", i, prompts, " 1.10s/it"))
        w("\n")

    samples(0)
    w("\r" + f"{job}:   0%|          | 0/{steps} [00:00<?, ?it/s]")
    for step in range(1, steps + 1):
        loss = 0.3 + (step % 97) / 1000
        # two frames per step, as ai-toolkit draws them: set_postfix_str redraws the old count with
        # the new loss, then update() draws the new count
        w("\r" + _bar(job, step - 1, steps, " 1.62s/it", f", lr: 1.0e-04 loss: {loss:.3e}"))
        w("\r" + _bar(job, step, steps, " 1.62s/it", f", lr: 1.0e-04 loss: {loss:.3e}"))
        if step < steps and step % save_every == 0:
            w(f"\nSaving at step {step}\n")
            w(f"Saved checkpoint to {out}/{job}/{job}_{step:09d}.safetensors\n")
            w(f"Saved optimizer to {out}/{job}/optimizer.pt\n")
        if step < steps and sample_every and step % sample_every == 0:
            w("\n")
            samples(step)
    w(f"\nSaved checkpoint to {out}/{job}/{job}.safetensors\n")
    samples(steps)
    w("\n")
    return "".join(parts).encode()


def measure(data: bytes, chunk: int, job: str | None = "lora_bench") -> tuple[float, int]:
    parser = ProgressParser(job)
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(data), chunk):
        n += len(parser.feed(data[i : i + chunk]))
    n += len(parser.close())
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=65_536)
    ap.add_argument("--goal", type=float, default=50.0, help="MB/s")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    data = generate_stream(steps=args.steps)
    mb = len(data) / 1e6
    best = min(measure(data, args.chunk)[0] for _ in range(args.repeat))
    _, events = measure(data, args.chunk)
    lines = data.count(b"\n") + data.count(b"\r")
    rate = mb / best
    print(
        f"progress parser: {mb:.1f} MB, {lines} lines, {events} events, chunk {args.chunk} B: "
        f"{rate:.1f} MB/s (goal > {args.goal:.0f} MB/s) {'PASS' if rate > args.goal else 'FAIL'}"
    )
    return 0 if rate > args.goal else 1


if __name__ == "__main__":
    raise SystemExit(main())
