#!/usr/bin/env python3
"""Fetch the base model into the box's Hugging Face cache while the bot ships the dataset (issue 18).

    prefetch.py start  --job-dir DIR --repo REPO [--aitoolkit DIR] [--hf-home DIR]   (HF_TOKEN on stdin)
    prefetch.py status --job-dir DIR

`start` detaches a worker in its own session (it outlives the SSH channel) and returns at once. The
worker downloads exactly what ai-toolkit's FLUX loader reads (toolkit/stable_diffusion_model.py:
`FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer")`, then the scheduler, vae,
tokenizer_2 + text_encoder_2 (T5) and text_encoder + tokenizer (CLIP) subfolders), never the
single-file checkpoints at the repo root, through huggingface_hub from ai-toolkit's own Python, with
the download settings ai-toolkit's run.py turns on (HF_XET_HIGH_PERFORMANCE=1, Xet enabled). It
writes `<job dir>/prefetch.json` {state: running|done|failed, bytes_total, bytes_done, files,
started_at, finished_at, error} and logs to `<job dir>/prefetch.log`. The token comes on stdin and
lives only in the worker's environment. A failed prefetch changes nothing for the job: the trainer
then downloads what is missing itself (huggingface_hub's file locks make a trainer that starts
mid-download wait for the file instead of fetching it twice).
"""

# ruff: noqa: UP031  (%-formatting: this script runs on whatever Python the box has)
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
import traceback

# the subfolders ai-toolkit's FLUX loader reads (diffusers layout)
FLUX_SUBFOLDERS = ("transformer", "scheduler", "vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
ALLOW_PATTERNS = ["model_index.json"] + ["%s/*" % s for s in FLUX_SUBFOLDERS]


def wanted(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in ALLOW_PATTERNS)


def _status_path(job_dir: str) -> str:
    return os.path.join(job_dir, "prefetch.json")


def write_status(job_dir: str, status: dict) -> None:
    path = _status_path(job_dir)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(status, fh, sort_keys=True)
    os.replace(tmp, path)


def read_status(job_dir: str) -> dict:
    try:
        with open(_status_path(job_dir), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {"state": "absent"}


def log(msg: str) -> None:
    sys.stdout.write("%s %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    status = {"state": "running", "repo": args.repo, "bytes_total": 0, "bytes_done": 0, "bytes_fetched": 0,
              "files": 0, "started_at": time.time(), "finished_at": None, "error": None}
    write_status(args.job_dir, status)
    try:
        if args.aitoolkit:
            sys.path.insert(0, args.aitoolkit)  # ai-toolkit's environment provides huggingface_hub
        from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

        token = os.environ.get("HF_TOKEN") or None
        info = HfApi(token=token).model_info(args.repo, files_metadata=True)
        files = [(s.rfilename, int(s.size or 0)) for s in info.siblings or [] if wanted(s.rfilename)]
        status["bytes_total"] = sum(size for _, size in files)
        status["files"] = len(files)
        write_status(args.job_dir, status)
        log("prefetch %s: %d files, %.2f GB" % (args.repo, len(files), status["bytes_total"] / 1e9))
        # big files last: the small configs and tokenizers let the loader start its checks early
        for name, size in sorted(files, key=lambda f: f[1]):
            cached = try_to_load_from_cache(args.repo, name)
            if not isinstance(cached, str):
                t0 = time.time()
                hf_hub_download(args.repo, name, token=token)
                status["bytes_fetched"] += size
                log("%s %.2f GB in %.1fs" % (name, size / 1e9, time.time() - t0))
            status["bytes_done"] += size
            write_status(args.job_dir, status)
        status["state"] = "done"
    except BaseException as exc:  # any failure: the trainer downloads on its own
        log("prefetch failed: %s" % exc)
        traceback.print_exc(file=sys.stdout)
        status["state"] = "failed"
        status["error"] = "%s: %s" % (type(exc).__name__, str(exc)[:300])
    status["finished_at"] = time.time()
    write_status(args.job_dir, status)
    log("prefetch %s" % status["state"])
    return 0 if status["state"] == "done" else 1


def start(args: argparse.Namespace) -> int:
    current = read_status(args.job_dir)
    if current.get("state") in ("running", "done"):
        print(json.dumps(current))
        return 0
    os.makedirs(args.job_dir, exist_ok=True)
    token = sys.stdin.read().strip() if not sys.stdin.isatty() else ""
    env = dict(os.environ)
    env.setdefault("HF_XET_HIGH_PERFORMANCE", "1")  # as ai-toolkit's run.py
    env.setdefault("HF_HUB_DISABLE_XET", "0")
    if args.hf_home:
        env["HF_HOME"] = args.hf_home
    if token:
        env["HF_TOKEN"] = token
    argv = [sys.executable, os.path.abspath(__file__), "run", "--job-dir", args.job_dir, "--repo", args.repo]
    if args.aitoolkit:
        argv += ["--aitoolkit", args.aitoolkit]
    with open(os.path.join(args.job_dir, "prefetch.log"), "ab") as logf:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True, close_fds=True)
    status = {"state": "running", "repo": args.repo, "bytes_total": 0, "bytes_done": 0, "bytes_fetched": 0,
              "files": 0, "started_at": time.time(), "finished_at": None, "error": None}
    print(json.dumps(status))
    return 0


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prefetch.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("start", "run", "status"):
        p = sub.add_parser(name)
        p.add_argument("--job-dir", required=True)
        if name != "status":
            p.add_argument("--repo", required=True)
            p.add_argument("--aitoolkit", default="")
        if name == "start":
            p.add_argument("--hf-home", default="")
    args = ap.parse_args(argv)
    if args.cmd == "status":
        print(json.dumps(read_status(args.job_dir)))
        return 0
    return start(args) if args.cmd == "start" else run(args)


if __name__ == "__main__":
    sys.exit(main())
