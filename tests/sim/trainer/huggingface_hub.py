"""Stand-in for the parts of huggingface_hub the box uses (copied next to the stand-in run.py, where
ai-toolkit's Python finds it first): `HfApi.model_info(files_metadata=True)`, `hf_hub_download`,
`try_to_load_from_cache`, with the real cache layout (`$HF_HOME/hub/models--org--name/snapshots/<rev>/`),
per-file locks (a second downloader waits for the first), and the real costs on a compressed clock.

The FLUX.1 repos list the real files and sizes; downloading one takes size / the box's inet_down,
times the time factor (`sim_net.json` next to this file: {"inet_down_mbps", "time_factor", "load_s",
"fail_prefetch"}), and writes a small placeholder. Every real download is appended to
`sim_downloads.log` next to this file (it outlives the cache of a machine) so tests can tell a
cold cache from a warm one.
"""

# ruff: noqa: UP031
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REVISION = "0ef5fff789c832c5c7f4e127f94c8b54bbcced44"

FLUX_FILES = (
    ("ae.safetensors", 335_304_388),
    ("flux1-dev.safetensors", 23_802_932_552),
    ("model_index.json", 536),
    ("scheduler/scheduler_config.json", 273),
    ("text_encoder/config.json", 613),
    ("text_encoder/model.safetensors", 246_144_152),
    ("text_encoder_2/config.json", 782),
    ("text_encoder_2/model-00001-of-00002.safetensors", 4_994_582_224),
    ("text_encoder_2/model-00002-of-00002.safetensors", 4_530_066_360),
    ("text_encoder_2/model.safetensors.index.json", 19_885),
    ("tokenizer/merges.txt", 524_619),
    ("tokenizer/vocab.json", 1_059_962),
    ("tokenizer_2/spiece.model", 791_656),
    ("tokenizer_2/tokenizer.json", 2_424_035),
    ("transformer/config.json", 378),
    ("transformer/diffusion_pytorch_model-00001-of-00003.safetensors", 9_983_040_304),
    ("transformer/diffusion_pytorch_model-00002-of-00003.safetensors", 9_949_328_904),
    ("transformer/diffusion_pytorch_model-00003-of-00003.safetensors", 3_870_584_832),
    ("transformer/diffusion_pytorch_model.safetensors.index.json", 121_262),
    ("vae/config.json", 820),
    ("vae/diffusion_pytorch_model.safetensors", 167_666_902),
)


class GatedRepoError(Exception):
    pass


def knobs() -> dict:
    try:
        with open(os.path.join(HERE, "sim_net.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _hub_dir() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _repo_dir(repo_id: str) -> str:
    return os.path.join(_hub_dir(), "models--" + repo_id.replace("/", "--"))


def _files(repo_id: str) -> tuple:
    if repo_id.startswith("black-forest-labs/FLUX.1"):
        return FLUX_FILES
    raise OSError("Repository Not Found for url: https://huggingface.co/api/models/%s" % repo_id)


class _Sibling:
    def __init__(self, rfilename: str, size: int | None) -> None:
        self.rfilename, self.size = rfilename, size


class _Info:
    def __init__(self, repo_id: str, siblings: list) -> None:
        self.id, self.sha, self.siblings = repo_id, REVISION, siblings


def _check_access(repo_id: str, token: Any) -> None:
    if repo_id.startswith("black-forest-labs/") and not (token or os.environ.get("HF_TOKEN")):
        raise GatedRepoError(
            "401 Client Error. Cannot access gated repo for url https://huggingface.co/%s. "
            "Access to model %s is restricted." % (repo_id, repo_id))


class HfApi:
    def __init__(self, token: Any = None) -> None:
        self.token = token

    def model_info(self, repo_id: str, files_metadata: bool = False, **_: Any) -> _Info:
        _check_access(repo_id, self.token)
        if knobs().get("fail_prefetch"):
            raise OSError("sim: the hub is unreachable from this box")
        return _Info(repo_id, [_Sibling(n, s if files_metadata else None) for n, s in _files(repo_id)])


def try_to_load_from_cache(repo_id: str, filename: str, **_: Any) -> Any:
    path = os.path.join(_repo_dir(repo_id), "snapshots", REVISION, filename)
    return path if os.path.exists(path) else None


def _bar(name: str, done: float, total: float, elapsed: float) -> None:
    def unit(n: float) -> str:
        for u in ("", "k", "M", "G", "T"):
            if n < 1000:
                return "%.3g%s" % (n, u)
            n /= 1000
        return "%.3gP" % n

    rate = done / elapsed if elapsed > 0 else 0
    pct = int(100 * done / total) if total else 100
    sys.stderr.write("\r%s: %3d%%|%s| %sB/%sB [00:%02d<00:00, %sB/s]" % (
        os.path.basename(name), pct, "#" * (pct // 10), unit(done), unit(total), int(elapsed) % 60, unit(rate)))
    sys.stderr.flush()


def hf_hub_download(repo_id: str, filename: str, token: Any = None, progress: bool = False, **_: Any) -> str:
    _check_access(repo_id, token)
    sizes = dict(_files(repo_id))
    if filename not in sizes:
        raise OSError("%s does not appear to have a file named %s" % (repo_id, filename))
    path = os.path.join(_repo_dir(repo_id), "snapshots", REVISION, filename)
    locks = os.path.join(_hub_dir(), ".locks", "models--" + repo_id.replace("/", "--"))
    os.makedirs(locks, exist_ok=True)
    with open(os.path.join(locks, filename.replace("/", "_") + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process mid-download: wait for it, as the real hub
        if os.path.exists(path):
            return path
        k = knobs()
        size = sizes[filename]
        inet = float(k.get("inet_down_mbps") or 0.0)
        seconds = size * 8 / (inet * 1e6) * float(k.get("time_factor", 1.0)) if inet > 0 else 0.0
        t0 = time.time()
        while True:
            elapsed = time.time() - t0
            if progress and seconds > 0:
                _bar(filename, min(size, size * elapsed / seconds), size, elapsed)
            if elapsed >= seconds:
                break
            time.sleep(min(0.05, seconds - elapsed))
        if progress and seconds > 0:
            sys.stderr.write("\n")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".incomplete", "w") as fh:
            fh.write("sim placeholder of %d bytes\n" % size)
        os.replace(path + ".incomplete", path)
        with open(os.path.join(HERE, "sim_downloads.log"), "a") as fh:
            fh.write("%s %s %d\n" % (repo_id, filename, size))
        return path
