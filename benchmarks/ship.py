"""Benchmark: `lorabot push-dataset` against `tar -c | ssh tar -x` (OpenSSH) on the same files.

    python benchmarks/ship.py [--mb 1024] [--repeat 2] [--keep DIR]

Both push into the local sshd of tests/sim/sshd.py (loopback) in the same run. Printed:
- OpenSSH: wall time of `tar -C SRC -c . | ssh ... 'mkdir -p D && tar -x -C D'` (no verification);
- lorabot ship: the SSH part of push-dataset (connect, stream through the OpenSSH client when there is
  one, extract, sha256 of every file on the box),
  as the command reports it, and the ratio to OpenSSH (goal <= 1.10);
- lorabot total: the whole command, which also checks every image with Pillow (services.dataset.prepare)
  before anything is sent; that QA pass is reported separately because the baseline does none;
- peak RSS of the `lorabot` process (goal < 200 MB, whatever the dataset size).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.sim.sshd import run_sshd  # noqa: E402

IMAGE_MB = 2.5  # per file, like a phone photo


def make_images(folder: Path, total_mb: int, seed: int = 7) -> int:
    """Valid JPEGs of random noise; a few distinct bases, each copy made unique by random trailing bytes
    after the EOI marker (decoders ignore them), so no two files are duplicates and none compress."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    bases = []
    for b in range(8):
        path = folder / f"_base{b}.jpg"
        Image.effect_noise((1400, 1400), 80 + b).convert("RGB").save(path, "JPEG", quality=97)
        bases.append(path.read_bytes())
        path.unlink()
    target = total_mb * 1024 * 1024
    written = n = 0
    while written < target:
        base = bases[n % len(bases)]
        pad = int(IMAGE_MB * 1024 * 1024) - len(base)
        data = base + rnd.randbytes(max(64, pad))
        (folder / f"photo_{n:05d}.jpg").write_bytes(data)
        (folder / f"photo_{n:05d}.txt").write_text(f"a photo number {n}")
        written += len(data)
        n += 1
    return written


def openssh_push(src: Path, info: object, dest: str) -> float:
    i = info
    ssh = ["ssh", "-i", str(i.client_key_path), "-p", str(i.port), "-o", "StrictHostKeyChecking=no",  # type: ignore[attr-defined]
           "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
           f"{i.user}@{i.host}", f"mkdir -p '{dest}' && tar -x -C '{dest}'"]  # type: ignore[attr-defined]
    t = time.perf_counter()
    tar = subprocess.Popen(["tar", "-C", str(src), "-c", "."], stdout=subprocess.PIPE)
    ssh_rc = subprocess.run(ssh, stdin=tar.stdout, check=False).returncode
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0 or ssh_rc != 0:
        raise SystemExit("the OpenSSH baseline failed")
    return time.perf_counter() - t


def lorabot_push(src: Path, info: object, dest: str, work: Path) -> tuple[float, float, int]:
    """(total wall s, ship s as reported, peak RSS bytes) of one `lorabot push-dataset` run."""
    i = info
    cmd = [shutil.which("lorabot") or "lorabot", "push-dataset"]
    cmd += [str(src), "--host", i.host, "--port", str(i.port), "--user", i.user,  # type: ignore[attr-defined]
            "--key", str(i.client_key_path), "--dest", dest, "--python", sys.executable]  # type: ignore[attr-defined]
    env = dict(os.environ, LORABOT_WORK_DIR=str(work), LORABOT_DATASET_MAX_BYTES=str(64 * 1024**3),
               LORABOT_DATASET_MAX_FILES="100000", COLUMNS="200")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=work)
    _pid, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t
    out = (proc.stdout.read() if proc.stdout else b"") + (proc.stderr.read() if proc.stderr else b"")
    text = out.decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lorabot push-dataset failed:\n{text}")
    m = re.search(r"in (\d+(?:\.\d+)?)s;", text.replace("\n", " "))
    ship = float(m.group(1)) if m else float("nan")
    return total, ship, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="dataset size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, alternating; the best counts")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="lorabot-ship-"))
    try:
        src = base / "src"
        if not src.exists():
            t = time.perf_counter()
            size = make_images(src, args.mb)
            print(f"made {size / 1024**2:.0f} MiB of images in {time.perf_counter() - t:.1f}s", flush=True)
        size = sum(p.stat().st_size for p in src.iterdir())
        with run_sshd(base / "sim") as server:
            info = server.info
            ossh: list[float] = []
            ours: list[tuple[float, float, int]] = []
            for r in range(args.repeat):
                dest_o = info.root_dir / f"openssh{r}"
                dest_l = info.root_dir / f"lorabot{r}"
                # each run starts with no dirty pages left by the other one to write back
                os.sync()
                ossh.append(openssh_push(src, info, str(dest_o)))
                work = base / f"work{r}"
                work.mkdir(exist_ok=True)
                os.sync()
                ours.append(lorabot_push(src, info, str(dest_l), work))
                for d in (dest_o, dest_l, work):
                    shutil.rmtree(d, ignore_errors=True)
                print(f"run {r + 1}: openssh {ossh[-1]:.2f}s, lorabot ship {ours[-1][1]:.2f}s "
                      f"(total {ours[-1][0]:.2f}s)", flush=True)
        best_o = min(ossh)
        best_ship = min(o[1] for o in ours)
        best_total = min(o[0] for o in ours)
        peak = max(o[2] for o in ours)
        mib = size / 1024**2
        print(f"\ndataset: {mib:.0f} MiB in {len(list(src.glob('*.jpg')))} images")
        print(f"OpenSSH tar|ssh tar -x:        {best_o:7.2f}s  ({mib / best_o:6.1f} MiB/s)")
        print(f"lorabot ship (incl. verify):   {best_ship:7.2f}s  ({mib / best_ship:6.1f} MiB/s)  "
              f"ratio {best_ship / best_o:.2f} (goal <= 1.10)")
        print(f"lorabot push-dataset total:    {best_total:7.2f}s  ratio {best_total / best_o:.2f} "
              "(includes the Pillow QA of every image and Python start-up)")
        print(f"peak RSS of lorabot:           {peak / 1024**2:7.1f} MB (goal < 200 MB)")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
