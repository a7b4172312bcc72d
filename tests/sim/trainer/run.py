#!/usr/bin/env python3
"""Stand-in for ostris/ai-toolkit's `run.py` (see ../shared/reference/ai-toolkit.md §1-5).

Honours the contract the bot relies on: `python run.py CONFIG` with a YAML/JSON job config (`${VAR}`
substitution, `[name]` tokens), the keys the real sd_trainer needs, the dataset folder rules (recursive,
hidden and `_controls` skipped, captions by basename), the console lines in their real formats (a tqdm
bar redrawn with `\\r` on stderr), the output layout (`config.yaml`, `<name>_<step:09d>.safetensors`
keeping the newest N, the final `<name>.safetensors`, `samples/<ms>__<step:09d>_<i>.jpg`), resume,
exit codes (0 success, 1 error banner, SIGINT -> "Job stopped" banner and 0) and the gated-model 401
when a black-forest-labs model is asked for without HF_TOKEN.

Knobs (environment, or a `sim_fault` / `sim_sec_per_step` file next to this script):
  LORABOT_SIM_SEC_PER_STEP   seconds per step (default 0.02)
  LORABOT_SIM_FAULT          comma list of: oom (while loading), oom@stepN (in a step, aborts after 3),
                             gated (401), disk_full (while downloading), disk_full@stepN (at a save),
                             hang@stepN (no output, forever), crash@stepN (SIGKILL, like the OOM killer),
                             ignore_sigint, ignore_sigterm, exception@stepN (a plain Python error),
                             once (the sim_fault file is removed: only this run fails)
"""

# ruff: noqa: UP031  (%-formatting: these scripts run on whatever Python the box has)
from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class JobError(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# knobs


def _knob(name: str, file_name: str, default: str) -> str:
    value = os.environ.get(name)
    if value is not None:
        return value
    try:
        with open(os.path.join(HERE, file_name)) as fh:
            return fh.read().strip()
    except OSError:
        return default


def parse_faults(text: str) -> dict:
    faults = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, at = part.partition("@")
        step = int(at[4:]) if at.startswith("step") else (int(at) if at else None)
        faults[name] = step
    return faults


FAULTS = parse_faults(_knob("LORABOT_SIM_FAULT", "sim_fault", ""))
if "once" in FAULTS:  # the faults hit this run only (the next job on the box trains normally)
    try:
        os.remove(os.path.join(HERE, "sim_fault"))
    except OSError:
        pass
SEC_PER_STEP = float(_knob("LORABOT_SIM_SEC_PER_STEP", "sim_sec_per_step", "0.02"))


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# config


def find_config(arg: str) -> str:
    candidates = [os.path.join(HERE, "config", arg)]
    candidates += [os.path.join(HERE, "config", arg + ext) for ext in (".yaml", ".yml", ".json", ".jsonc")]
    candidates += [arg, os.path.join(os.getcwd(), arg)]
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
    raise ValueError("Could not find config file %s" % arg)


def load_config(arg: str) -> dict:
    path = find_config(arg)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()

    def env(m: re.Match) -> str:
        var = m.group(1)
        if var not in os.environ:
            raise ValueError("Environment variable %s not set. Please ensure it's set before running" % var)
        return os.environ[var]

    text = re.sub(r"\$\{([^}]+)\}", env, text)
    if path.endswith((".yaml", ".yml")):
        import yaml  # the real toolkit depends on PyYAML

        return yaml.safe_load(text)
    if path.endswith((".json", ".jsonc")):
        return json.loads(text)
    raise ValueError("Config file %s must be a yaml or json file" % path)


def replace_name(obj: Any, name: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("[name]", name)
    if isinstance(obj, list):
        return [replace_name(v, name) for v in obj]
    if isinstance(obj, dict):
        return {k: replace_name(v, name) for k, v in obj.items()}
    return obj


def need(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d or d[key] in (None, ""):
        raise JobError("%s.%s is required" % (where, key))
    return d[key]


# --------------------------------------------------------------------------------------------------
# safetensors (header length, JSON header, raw data), LoRA-shaped


def write_safetensors(path: str, rank: int, alpha: float, meta: dict, step: int) -> None:
    hidden = 3072  # FLUX transformer width
    tensors = {}
    blobs = []
    offset = 0
    rnd = random.Random(step)
    for block in range(4):
        base = "transformer.single_transformer_blocks.%d.proj_out" % block
        for part, shape in (("lora_A", (rank, hidden)), ("lora_B", (hidden, rank))):
            count = shape[0] * shape[1]
            # float16 values: small random A (like kaiming init), B drifting from zero with the step
            scale = 0.01 if part == "lora_A" else 0.0001 * step
            pattern = struct.pack("<256e", *(rnd.uniform(-scale, scale) for _ in range(256)))
            data = (pattern * (count // 256 + 1))[: count * 2]  # tiled: cheap, still plausible values
            tensors["%s.%s.weight" % (base, part)] = {
                "dtype": "F16",
                "shape": list(shape),
                "data_offsets": [offset, offset + len(data)],
            }
            blobs.append(data)
            offset += len(data)
        alpha_data = struct.pack("<e", alpha)
        tensors["%s.alpha" % base] = {"dtype": "F16", "shape": [], "data_offsets": [offset, offset + 2]}
        blobs.append(alpha_data)
        offset += 2
    tensors["__metadata__"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    header = json.dumps(tensors, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    if "disk_full" in FAULTS and FAULTS["disk_full"] is not None and step >= FAULTS["disk_full"]:
        raise OSError(28, 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for blob in blobs:
            fh.write(blob)
    os.replace(tmp, path)


def write_sample(path: str, step: int, index: int, size: int) -> None:
    os.makedirs(os.path.join(os.path.dirname(path), ".tmp"), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), ".tmp", os.path.basename(path))
    try:
        from PIL import Image

        colour = ((step * 37) % 256, (index * 91) % 256, 128)
        Image.new("RGB", (size, size), colour).save(tmp, "JPEG", quality=80)
    except ImportError:  # a bare box: still a JPEG-framed file
        with open(tmp, "wb") as fh:
            fh.write(b"\xff\xd8\xff\xd9")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# the job


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return "%d:%02d:%02d" % (h, m, s) if h else "%02d:%02d" % (m, s)


def bar(desc: str, n: int, total: int, elapsed: float, postfix: str = "") -> None:
    pct = int(100 * n / total) if total else 100
    filled = int(10 * n / total) if total else 10
    rate = n / elapsed if elapsed > 0 and n else 0.0
    rate_s = ("%.2fit/s" % rate) if rate >= 1 else ("%.2fs/it" % (1 / rate) if rate else "?it/s")
    remaining = fmt_time((total - n) / rate) if rate else "?"
    text = "%s: %3d%%|%s%s| %d/%d [%s<%s, %s%s]" % (
        desc, pct, "█" * filled, " " * (10 - filled), n, total, fmt_time(elapsed), remaining, rate_s,
        (", " + postfix) if postfix else "",
    )
    sys.stderr.write("\r" + text)
    sys.stderr.flush()


def hang() -> None:
    while True:
        time.sleep(3600)


def load_model(model_path: str) -> None:
    """What diffusers' from_pretrained costs on the box (issue 18): files missing from the HF cache are
    downloaded (the stand-in hub next to this script times them by the box's bandwidth; a prefetch
    under way holds the file locks, so this waits for it), then load + quantize take `load_s`, plus
    `cold_read_s` for the first load on a machine (later ones read the weights from the page cache)."""
    if os.path.isdir(model_path):
        return
    import huggingface_hub as hub  # the stand-in next to this script, as ai-toolkit's own env provides it

    subfolders = ("transformer/", "scheduler/", "vae/", "tokenizer/", "tokenizer_2/", "text_encoder/",
                  "text_encoder_2/")
    for name, _size in hub.FLUX_FILES if model_path.startswith("black-forest-labs/FLUX.1") else ():
        if name.startswith(subfolders) and not hub.try_to_load_from_cache(model_path, name):
            hub.hf_hub_download(model_path, name, progress=True)
    knobs = hub.knobs()
    load_s = float(knobs.get("load_s") or 0.0)
    # the first load on a machine reads the weights from disk; later ones find them in the page cache
    page_cache = os.path.join(os.path.dirname(hub._hub_dir()), "sim_page_cache")
    if not os.path.exists(page_cache):
        load_s += float(knobs.get("cold_read_s") or 0.0)
    if load_s:
        time.sleep(load_s)
    with open(page_cache, "w") as fh:
        fh.write("weights read once on this machine\n")


def list_images(folder: str) -> list:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "_controls")
        for f in sorted(files):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS):
                found.append(os.path.join(root, f))
    return found


def run_job(config: dict) -> None:
    if config.get("job") != "extension":
        raise JobError("Unknown job type %s" % config.get("job"))
    cfg = need(config, "config", "root")
    name = str(need(cfg, "name", "config"))
    config = replace_name(config, name)
    cfg = config["config"]
    processes = need(cfg, "process", "config")
    if not isinstance(processes, list) or not processes:
        raise JobError("config.process must be a non-empty list")
    proc = processes[0]
    ptype = proc.get("type")
    if ptype in ("ui_trainer", "diffusion_trainer"):
        raise JobError("AITK_JOB_ID not set")
    if ptype != "sd_trainer":
        raise JobError("Unknown process type %s" % ptype)
    training_folder = str(need(proc, "training_folder", "process[0]"))
    network = need(proc, "network", "process[0]")
    rank = int(need(network, "linear", "network"))
    alpha = float(network.get("linear_alpha", network.get("alpha", 1.0)))
    train = need(proc, "train", "process[0]")
    steps = int(train.get("steps", 1000))
    model = need(proc, "model", "process[0]")
    model_path = str(need(model, "name_or_path", "model"))
    if not (model.get("is_flux") or model.get("arch") == "flux"):
        raise JobError("this stand-in only trains FLUX (model.is_flux or model.arch: flux)")
    datasets = need(proc, "datasets", "process[0]")
    if not isinstance(datasets, list) or not datasets:
        raise JobError("process[0].datasets must be a non-empty list")
    save = proc.get("save") or {}
    save_every = int(save.get("save_every", 1000))
    keep = int(save.get("max_step_saves_to_keep", 5))
    sample = proc.get("sample") or {}
    sample_every = int(sample.get("sample_every", 100))
    prompts = sample.get("prompts") or []
    disable_sampling = bool(train.get("disable_sampling", False))
    trigger = proc.get("trigger_word")

    out("Running 1 job")
    out(json.dumps(proc, indent=4))
    ema = (train.get("ema_config") or {}).get("use_ema")
    if ema:
        out("Using EMA")
    out("#############################################")
    out("# Running job: %s" % name)
    out("#############################################")
    out("")
    out("")
    out("Running  1 process")

    out_dir = os.path.join(training_folder, name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        try:
            import yaml

            yaml.safe_dump(config, fh)
        except ImportError:
            json.dump(config, fh, indent=2)

    # --- model loading -----------------------------------------------------------------------
    out("Loading Flux model")
    out("Loading transformer")
    if model_path.startswith("black-forest-labs/") and ("gated" in FAULTS or not os.environ.get("HF_TOKEN")):
        url = "https://huggingface.co/%s/resolve/main/transformer/config.json" % model_path
        raise JobError(
            "401 Client Error. (Request ID: Root=1-sim)\n\nCannot access gated repo for url %s.\n"
            "Access to model %s is restricted. You must have access to it and be authenticated to access it. "
            "Please log in." % (url, model_path),
            "GatedRepoError",
        )
    if "disk_full" in FAULTS and FAULTS["disk_full"] is None:
        out("UserWarning: Not enough free disk space to download the file. The expected file size is: "
            "23802.00 MB. The target location /root/.cache/huggingface/hub only has 1024.00 MB free disk space.")
        raise OSError(28, "No space left on device")
    if "oom" in FAULTS and FAULTS["oom"] is None:
        out("Quantizing transformer")
        raise JobError(
            "CUDA out of memory. Tried to allocate 126.00 MiB. GPU 0 has a total capacity of 23.55 GiB of "
            "which 98.81 MiB is free. Process 4242 has 12.97 GiB memory in use.",
            "torch.OutOfMemoryError",
        )
    load_model(model_path)
    sleep = min(0.05, SEC_PER_STEP)
    for line in ("Quantizing transformer", "Loading VAE", "Loading T5", "Quantizing T5", "Loading CLIP",
                 "Making pipe", "Preparing Model"):
        time.sleep(sleep)
        out(line)
    out("create LoRA network. base dim (rank): %d, alpha: %g" % (rank, alpha))
    out("create LoRA for U-Net: 494 modules.")
    out("enable LoRA for U-Net")

    # --- datasets ----------------------------------------------------------------------------
    for ds in datasets:
        folder = str(need(ds, "folder_path", "datasets[]"))
        resolutions = ds.get("resolution", 512)
        resolutions = resolutions if isinstance(resolutions, list) else [resolutions]
        ext = ds.get("caption_ext", ".txt")
        ext = ext if ext.startswith(".") else "." + ext
        for res in resolutions:
            out("Dataset: %s" % folder)
            out("  -  Preprocessing image dimensions")
            images = list_images(folder) if os.path.isdir(folder) else []
            if not images:
                raise AssertionError("no images found in %s" % folder)
            captioned = 0
            for img in images:
                cap = os.path.splitext(img)[0] + ext
                if os.path.isfile(cap):
                    with open(cap, encoding="utf-8") as fh:
                        captioned += bool(fh.read().strip())
            with open(os.path.join(folder, ".aitk_size.json"), "w") as fh:
                json.dump({os.path.relpath(i, folder): [res, res] for i in images}, fh)
            out("  -  Found %d images" % len(images))
            out("Bucket sizes for %s:" % folder)
            out("%dx%d: %d files" % (res, res, len(images)))
            out("1 buckets made")
            out("Caching latents for %s" % folder)
            out(" - Saving latents to disk")
            t0 = time.time()
            for i in range(len(images)):
                bar("Caching latents to disk", i + 1, len(images), time.time() - t0)
            sys.stderr.write("\n")
            del captioned

    # --- resume ------------------------------------------------------------------------------
    start_step = 0
    ckpts = sorted(f for f in os.listdir(out_dir) if re.fullmatch(re.escape(name) + r"_\d{9}\.safetensors", f))
    if ckpts:
        start_step = int(ckpts[-1][len(name) + 1 : -len(".safetensors")])
        out("#### IMPORTANT RESUMING FROM %s ####" % os.path.join(out_dir, ckpts[-1]))

    samples_dir = os.path.join(out_dir, "samples")
    meta = dict(config.get("meta") or {}, ss_output_name=name)

    def make_samples(step: int) -> None:
        if disable_sampling or not prompts:
            return
        os.makedirs(samples_dir, exist_ok=True)
        t0 = time.time()
        for i in range(len(prompts)):
            ms = int(time.time() * 1000)
            write_sample(os.path.join(samples_dir, "%d__%09d_%d.jpg" % (ms, step, i)), step, i, 64)
            bar("Generating Images", i + 1, len(prompts), time.time() - t0)
        sys.stderr.write("\r")

    def save_at(step: int, final: bool = False) -> None:
        path = os.path.join(out_dir, "%s.safetensors" % name if final else "%s_%09d.safetensors" % (name, step))
        if not final:
            out("Saving at step %d" % step)
        m = dict(meta, training_info={"step": step, "epoch": 0})
        if trigger:
            m["ss_tag_frequency"] = {"1_dataset": {trigger: 1}}
        write_safetensors(path, rank, alpha, m, step)
        out("Saved checkpoint to %s" % path)
        if not final:
            with open(os.path.join(out_dir, "optimizer.pt"), "wb") as fh:
                fh.write(b"sim optimizer state %d" % step)
            out("Saved optimizer to %s" % os.path.join(out_dir, "optimizer.pt"))
            saves = sorted(f for f in os.listdir(out_dir)
                           if re.fullmatch(re.escape(name) + r"_\d{9}\.safetensors", f))
            for old in saves[: max(0, len(saves) - keep)]:
                out("Removing old save: %s" % os.path.join(out_dir, old))
                os.remove(os.path.join(out_dir, old))

    if start_step == 0 and not disable_sampling and prompts:
        if sample.get("skip_first_sample") or train.get("skip_first_sample"):
            out("Skipping first sample due to config setting")
        else:
            out("Generating baseline samples before training")
            make_samples(0)

    # --- training ----------------------------------------------------------------------------
    lr = float(train.get("lr", 1e-6))
    t0 = time.time()
    oom_streak = 0
    rnd = random.Random(0)
    step = start_step
    while step < steps:
        step_no = step + 1
        if FAULTS.get("hang") is not None and step_no >= FAULTS["hang"]:
            hang()
        if FAULTS.get("crash") is not None and step_no >= FAULTS["crash"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULTS.get("exception") is not None and step_no >= FAULTS["exception"]:
            raise RuntimeError("sim: exception in training step %d" % step_no)
        time.sleep(SEC_PER_STEP)
        if FAULTS.get("oom") is not None and step_no >= FAULTS["oom"]:
            oom_streak += 1
            if oom_streak > 3:
                raise RuntimeError("OOM during training step 3 times in a row, aborting training")
            sys.stderr.write("\n")
            out("#############################################")
            out("# OOM during training step, skipping batch %d/3 #" % oom_streak)
            out("#############################################")
            continue
        oom_streak = 0
        step = step_no
        loss = 0.6 * (1 + rnd.random()) / (1 + step / 50)
        bar(name, step, steps, time.time() - t0, "lr: %.1e loss: %.3e" % (lr, loss))
        if step % save_every == 0 and step != steps and step > 0:
            sys.stderr.write("\n")
            save_at(step)
        if sample_every and step % sample_every == 0 and step != steps:
            make_samples(step)
    sys.stderr.write("\n")
    save_at(steps, final=True)
    make_samples(steps)
    out("")


def banner_failure(exc: BaseException) -> None:
    out("=" * 45)
    out("Result:")
    out(" - 0 completed jobs")
    out(" - 1 failure")
    out("=" * 45)


def main(argv: list) -> int:
    if "ignore_sigint" in FAULTS:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "ignore_sigterm" in FAULTS:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = [a for a in argv if not a.startswith("-")]
    if not args:
        out("usage: run.py CONFIG [CONFIG ...]")
        return 2
    try:
        config = load_config(args[0])
    except Exception:
        traceback.print_exc()
        return 1
    try:
        run_job(config)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        out("=" * 45)
        out("Job stopped")
        out("=" * 45)
        return 0
    except Exception as exc:
        kind = exc.args[1] if isinstance(exc, JobError) and len(exc.args) > 1 else type(exc).__name__
        message = exc.args[0] if isinstance(exc, JobError) else (
            "[Errno %d] %s" % (exc.errno, exc.strerror) if isinstance(exc, OSError) and exc.errno else str(exc)
        )
        sys.stderr.write("\n")
        out("Error running job: %s" % message)
        banner_failure(exc)
        sys.stdout.write("Traceback (most recent call last):\n  File \"run.py\", line 90, in <module>\n")
        out("%s: %s" % (kind, message))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
