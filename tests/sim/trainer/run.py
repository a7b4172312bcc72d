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
                             nan@stepN ("loss is nan" every step from N, loss shown as 0),
                             oom_final[@S] (CUDA OOM in the final sampling pass, after the final save, S s into it),
                             host_fault@stepN (uncorrectable ECC error), host_hang@stepN (the same
                             error printed, then hung), repo_missing (no such repo),
                             hang_load (silent forever after "Loading transformer", like an old image
                             downloading the base model), quiet_download (no download bars),
                             once (the sim_fault file is removed: only this run fails)

The console output follows the real trainer (issue 16, reviews/ai-toolkit.md S3-1): the training bar
is a tqdm bar with smoothing 0.7 whose pause/unpause around saves and samples makes the next rate
spike, two frames per step (the postfix refresh with the old count, then the update), an opening
`0/N` frame and a repeated close frame; rates padded like tqdm's `{:5.2f}`; 40-`=` banners; resume
from the newest `<name>*` file by ctime, which dies on a truncated file like the real loader.
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


def write_safetensors(path: str, rank: int, meta: dict, step: int) -> None:
    """A peft-format FLUX LoRA: lora_A/lora_B only. ai-toolkit forces alpha = rank for FLUX and its
    peft save drops every `.alpha` key (S1-1)."""
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


def read_safetensors_meta(path: str) -> dict:
    """What the real loader does first: a truncated or empty file raises like safetensors does."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 8:
        raise JobError("Error while deserializing header: HeaderTooSmall", "safetensors_rust.SafetensorError")
    n = struct.unpack("<Q", raw[:8])[0]
    if 8 + n > len(raw):
        raise JobError("Error while deserializing header: InvalidHeaderDeserialization",
                       "safetensors_rust.SafetensorError")
    header = json.loads(raw[8 : 8 + n])
    end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] or [0])
    if 8 + n + end > len(raw):
        raise JobError("Error while deserializing header: MetadataIncompleteBuffer",
                       "safetensors_rust.SafetensorError")
    return header.get("__metadata__") or {}


class Bar:
    """tqdm as ai-toolkit's ToolkitProgressBar drives it: smoothing 0.7, frames `\r`-led with no
    newline, rate `{:5.2f}`, and pause()/unpause() that shift start_t and reset last_print_t, so the
    first update after a pause feeds the EMA a tiny interval (the rate spikes, issue #818)."""

    def __init__(self, desc: str, total: int, initial: int = 0) -> None:
        self.desc, self.total, self.n = desc, total, initial
        self.postfix = ""
        self.start_t = self.last_print_t = time.time()
        self.last_print_n = initial
        self.alpha = 0.7
        self.ema_dn = self.ema_dt = 0.0
        self.calls = 0
        self.paused_at = None  # type: float | None
        self.refresh()

    def _rate(self) -> float | None:
        if not self.calls or not self.ema_dt:
            return None
        return self.ema_dn / self.ema_dt  # the bias corrections cancel

    def refresh(self) -> None:
        now = self.paused_at if self.paused_at is not None else time.time()
        elapsed = now - self.start_t
        rate = self._rate()
        pct = 100 * self.n / self.total if self.total else 100
        filled = int(10 * self.n / self.total) if self.total else 10
        if rate is None:
            rate_s, remaining = "?it/s", "?"
        else:
            rate_s = ("%5.2fit/s" % rate) if rate >= 1 else ("%5.2fs/it" % (1 / rate))
            remaining = fmt_time((self.total - self.n) / rate)
        text = "%s: %3.0f%%|%s%s| %d/%d [%s<%s, %s%s]" % (
            self.desc, pct, "█" * filled, " " * (10 - filled), self.n, self.total, fmt_time(elapsed), remaining,
            rate_s, (", " + self.postfix) if self.postfix else "",
        )
        sys.stderr.write("\r" + text)
        sys.stderr.flush()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self.refresh()

    def update(self, k: int) -> None:
        if self.paused_at is not None:
            return
        self.n += k
        now = time.time()
        dt, dn = now - self.last_print_t, self.n - self.last_print_n
        if dn > 0:
            beta = 1 - self.alpha
            self.ema_dn = self.alpha * dn + beta * self.ema_dn
            self.ema_dt = self.alpha * dt + beta * self.ema_dt
            self.calls += 1
        self.last_print_t, self.last_print_n = now, self.n
        self.refresh()

    def pause(self) -> None:
        if self.paused_at is None:
            self.paused_at = time.time()

    def unpause(self) -> None:
        if self.paused_at is not None:
            now = time.time()
            self.start_t += now - self.paused_at
            self.last_print_t = now
            self.paused_at = None

    def close(self) -> None:
        self.refresh()
        sys.stderr.write("\n")
        sys.stderr.flush()


def hf_download_bars() -> None:
    """huggingface_hub's bars, shown in non-TTY logs since d586125b (2026-06-24): decimal units."""
    files = ("diffusion_pytorch_model-00001-of-00003.safetensors", "diffusion_pytorch_model-00002-of-00003.safetensors")
    sys.stderr.write("\rFetching %d files:   0%%|          | 0/%d [00:00<?, ?it/s]" % (len(files), len(files)))
    for name in files:
        for pct, done in ((0, "0.00"), (45, "4.49G"), (100, "9.98G")):
            filled = "#" * (pct // 10)
            sys.stderr.write("\r%s: %3d%%|%-10s| %s/9.98G [00:%02d<00:%02d, 243MB/s]" % (
                name, pct, filled, done if pct else "0.00", pct // 5, (100 - pct) // 5))
        sys.stderr.write("\n")
    sys.stderr.write("\rLoading checkpoint shards: 100%|##########| 3/3 [00:01<00:00,  2.71it/s]\n")
    sys.stderr.flush()


def hang() -> None:
    while True:
        time.sleep(3600)


def load_model(model_path: str, bars: bool = True) -> None:
    """What diffusers' from_pretrained costs on the box (issue 18): files missing from the HF cache are
    downloaded (the stand-in hub next to this script times them by the box's bandwidth; a prefetch
    under way holds the file locks, so this waits for it), then load + quantize take `load_s`, plus
    `cold_read_s` for the first load on a machine (later ones read the weights from the page cache)."""
    if os.path.isdir(model_path):
        return
    import huggingface_hub as hub  # the stand-in next to this script, as ai-toolkit's own env provides it

    if bars and not float(hub.knobs().get("inet_down_mbps") or 0.0):
        hf_download_bars()  # no bandwidth modelled: the real bars' format, at once

    subfolders = ("transformer/", "scheduler/", "vae/", "tokenizer/", "tokenizer_2/", "text_encoder/",
                  "text_encoder_2/")
    for name, _size in hub.FLUX_FILES if model_path.startswith("black-forest-labs/FLUX.1") else ():
        if name.startswith(subfolders) and not hub.try_to_load_from_cache(model_path, name):
            hub.hf_hub_download(model_path, name, progress=bars)
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
    alpha = rank  # FLUX is always peft format in ai-toolkit: linear_alpha is overwritten with the rank
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
    if "repo_missing" in FAULTS:
        raise JobError(
            "%s is not a local folder and is not a valid model identifier listed on "
            "'https://huggingface.co/models'\nIf this is a private repository, make sure to pass a token having "
            "permission to this repo either by logging in with `hf auth login` or by passing `token=<your_token>`"
            % model_path, "OSError")
    if model.get("assistant_lora_path"):
        out("Grabbing lora from the hub: %s" % model["assistant_lora_path"])
    out("Loading transformer")
    if model_path.startswith("black-forest-labs/") and "gated" in FAULTS and os.environ.get("HF_TOKEN"):
        # a valid token whose licence is not accepted: 403, and diffusers wraps it; GatedRepoError
        # shows only in the chained traceback
        url = "https://huggingface.co/%s/resolve/main/transformer/config.json" % model_path
        raise JobError(
            "%s is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'"
            "\nIf this is a private repository, make sure to pass a token having permission to this repo either by "
            "logging in with `hf auth login` or by passing `token=<your_token>`" % model_path,
            "OSError",
            "huggingface_hub.errors.GatedRepoError: 403 Client Error. (Request ID: Root=1-sim)\n\nCannot access "
            "gated repo for url %s.\nAccess to model %s is restricted and you are not in the authorized list. "
            "Visit https://huggingface.co/%s to ask for access." % (url, model_path, model_path),
        )
    if model_path.startswith("black-forest-labs/") and not os.environ.get("HF_TOKEN"):
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
    if "hang_load" in FAULTS:
        hang()
    load_model(model_path, bars="quiet_download" not in FAULTS)
    sleep = min(0.05, SEC_PER_STEP)
    for line in ("Quantizing transformer", "Loading VAE", "Loading T5", "Quantizing T5", "Loading CLIP",
                 "Making pipe", "Preparing Model"):
        time.sleep(sleep)
        out(line)
    if model.get("assistant_lora_path"):
        out("Loading assistant lora")
        out("Fusing in LoRA")
    out("create LoRA network. base dim (rank): %d, alpha: %d" % (rank, alpha))
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
            cbar = Bar("Caching latents to disk", len(images))
            for _ in range(len(images)):
                cbar.update(1)
            cbar.close()
            del captioned

    # --- resume: get_latest_save_path globs <name>*.safetensors, <name>*.pt and <name>* and takes
    # the newest by ctime, whatever it is (a stray "<name>...part" file included) ------------------
    start_step = 0
    found = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith(name)]
    if found:
        latest = max(found, key=os.path.getctime)
        out("#### IMPORTANT RESUMING FROM %s ####" % latest)
        out("Loading from %s" % latest)
        meta_in = read_safetensors_meta(latest)
        info = meta_in.get("training_info")
        if info:
            start_step = int(json.loads(info).get("step", 0))
            out("Found step %d in metadata, starting from there" % start_step)
        opt = os.path.join(out_dir, "optimizer.pt")
        if os.path.exists(opt):
            out("Loading optimizer state from %s" % opt)

    samples_dir = os.path.join(out_dir, "samples")
    meta = dict(config.get("meta") or {}, ss_output_name=name)

    def make_samples(step: int, final: bool = False) -> None:
        if disable_sampling or not prompts:
            return
        if model.get("assistant_lora_path"):
            out("Unloading assistant lora")
        if final and "oom_final" in FAULTS:
            time.sleep(FAULTS["oom_final"] or 0)  # oom_final@S: S seconds into the pass
            raise JobError(
                "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 23.55 GiB of "
                "which 1.01 GiB is free.", "torch.OutOfMemoryError")
        os.makedirs(os.path.join(samples_dir, ".thumbs"), exist_ok=True)
        gbar = Bar("Generating Images", len(prompts))
        for i in range(len(prompts)):
            ms = int(time.time() * 1000)
            fname = "%d__%09d_%d.jpg" % (ms, step, i)
            write_sample(os.path.join(samples_dir, fname), step, i, 64)
            write_sample(os.path.join(samples_dir, ".thumbs", fname), step, i, 32)
            gbar.update(1)
        sys.stderr.write("\r")
        if model.get("assistant_lora_path"):
            out("Loading assistant lora")

    def save_at(step: int, final: bool = False) -> None:
        path = os.path.join(out_dir, "%s.safetensors" % name if final else "%s_%09d.safetensors" % (name, step))
        if not final:
            out("\nSaving at step %d" % step)
        m = dict(meta, training_info={"step": step, "epoch": 0})
        if trigger:
            m["ss_tag_frequency"] = {"1_%s" % trigger: {trigger: 1}}
        write_safetensors(path, rank, m, step)
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

    if train.get("skip_first_sample") or disable_sampling:
        out("Skipping first sample due to config setting")
    elif start_step <= 1 and prompts:
        out("Generating baseline samples before training")
        make_samples(0)

    # --- training ----------------------------------------------------------------------------
    # the real loop (BaseSDTrainProcess.run): for loop index `step`, train, set_postfix_str (a frame
    # with the old count and this step's loss), save/sample at `step` (paused), update to step + 1
    lr = float(train.get("lr", 1e-6))
    oom_streak = 0
    rnd = random.Random(0)
    pbar = Bar(name, steps, initial=start_step)
    pbar.pause()
    step = start_step
    while step < steps:
        step_no = step + 1
        pbar.unpause()
        if FAULTS.get("hang") is not None and step_no >= FAULTS["hang"]:
            hang()
        if FAULTS.get("crash") is not None and step_no >= FAULTS["crash"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULTS.get("exception") is not None and step_no >= FAULTS["exception"]:
            raise RuntimeError("sim: exception in training step %d" % step_no)
        if FAULTS.get("host_hang") is not None and step_no >= FAULTS["host_hang"]:
            out("")
            out("RuntimeError: CUDA error: uncorrectable ECC error encountered")
            hang()
        if FAULTS.get("host_fault") is not None and step_no >= FAULTS["host_fault"]:
            raise JobError("CUDA error: uncorrectable ECC error encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call", "torch.AcceleratorError")
        time.sleep(SEC_PER_STEP)
        if FAULTS.get("oom") is not None and step_no >= FAULTS["oom"]:
            oom_streak += 1
            if oom_streak > 3:
                raise RuntimeError("OOM during training step 3 times in a row, aborting training")
            out("")
            out("#############################################")
            out("# OOM during training step, skipping batch %d/3 #" % oom_streak)
            out("#############################################")
            continue
        oom_streak = 0
        loss = 0.6 * (1 + rnd.random()) / (1 + step_no / 50)
        if FAULTS.get("nan") is not None and step_no >= FAULTS["nan"]:
            out("loss is nan")  # lands glued after the last frame, which ends in \r, not \n
            loss = 0.0
        pbar.set_postfix_str("lr: %.1e loss: %.3e" % (lr, loss))
        if step != start_step and save_every and step % save_every == 0:
            pbar.pause()
            save_at(step)
            pbar.unpause()
        if step != start_step and sample_every and step % sample_every == 0:
            pbar.pause()
            make_samples(step)
            pbar.unpause()
        pbar.update(step + 1 - pbar.n)
        step = step_no
    pbar.close()
    save_at(steps, final=True)
    make_samples(steps, final=True)
    out("")


def banner_failure(exc: BaseException) -> None:
    out("=" * 40)
    out("Result:")
    out(" - 0 completed jobs")
    out(" - 1 failure")
    out("=" * 40)


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
        out("=" * 40)
        out("Job stopped")
        out("=" * 40)
        return 0
    except Exception as exc:
        kind = exc.args[1] if isinstance(exc, JobError) and len(exc.args) > 1 else type(exc).__name__
        message = exc.args[0] if isinstance(exc, JobError) else (
            "[Errno %d] %s" % (exc.errno, exc.strerror) if isinstance(exc, OSError) and exc.errno else str(exc)
        )
        sys.stderr.write("\n")
        out("Error running job: %s" % message)
        banner_failure(exc)
        if isinstance(exc, JobError) and len(exc.args) > 2:
            sys.stdout.write("Traceback (most recent call last):\n  File \"huggingface_hub/utils/_http.py\", "
                             "line 409, in hf_raise_for_status\n")
            out(exc.args[2])
            out("\nThe above exception was the direct cause of the following exception:\n")
        sys.stdout.write("Traceback (most recent call last):\n  File \"run.py\", line 90, in <module>\n")
        out("%s: %s" % (kind, message))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
