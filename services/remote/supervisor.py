#!/usr/bin/env python3
"""lorabot's supervisor of one training job on the rented box (stdlib only; shipped per job).

    supervisor.py launch --job-dir DIR --config ABS_CONFIG [--python PY] [--aitoolkit DIR] ...
    supervisor.py status --job-dir DIR
    supervisor.py stop   --job-dir DIR [--wait S]

`launch` starts `<python> run.py <config>` in the ai-toolkit folder, detached in its own session
(double fork + setsid) so it outlives the SSH connection, and returns at once. The daemon keeps in
the job folder:
    log.txt      trainer stdout + stderr (appended; read by byte offset)
    pid          the trainer's pid (leader of its own process group)
    status.json  {phase: starting|running|stopping|exited, heartbeat, supervisor_pid, trainer_pid,
                  exit_code, signal, started_at, finished_at, stop_requested, error}, written atomically
    lock         flock held by the daemon for its whole life: a second launch sees it and does nothing
    stop         created by `stop`: SIGINT to the trainer's group, then SIGTERM, then SIGKILL after
                 the grace periods
    bot_heartbeat touched by the bot on every monitor cycle (the dead-man's switch reads its mtime)

Dead-man's switch (`--deadman S`, `--deadline-in S`): when the bot has not touched bot_heartbeat for S
seconds, or the job's hard deadline passed, the daemon stops the trainer (as `stop` does) and ends the
rental itself: DELETE /api/v0/instances/$CONTAINER_ID/ with the instance-scoped $CONTAINER_API_KEY
Vast.ai gives every instance (read from `--container-environ`, /proc/1/environ: SSH sessions do not
inherit it); if that is refused, PUT state=stopped with the same key; if that fails too, SIGTERM to
`--container-pid` (1: the container's init, so the container stops and only its storage bills), and
that only where CONTAINER_ID says this is a Vast.ai container.
The daemon keeps watching after the trainer exits, until the bot's heartbeat goes stale.
The trainer's environment comes from `<job dir>/env` (KEY=VALUE lines, mode 600; HF_TOKEN lives
there); its values are never written to the log or the status.
"""

# ruff: noqa: UP031  (%-formatting: these scripts run on whatever Python the box has)
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

PHASES = ("starting", "running", "stopping", "exited")


def _paths(job_dir: str) -> dict[str, str]:
    return {
        name: os.path.join(job_dir, name)
        for name in ("log.txt", "pid", "status.json", "lock", "stop", "env", "supervisor.log", "bot_heartbeat")
    }


def read_status(job_dir: str) -> dict:
    try:
        with open(os.path.join(job_dir, "status.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def write_status(job_dir: str, status: dict) -> None:
    path = os.path.join(job_dir, "status.json")
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(status, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # readers never see a half-written file


def read_env_file(path: str) -> dict:
    env = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if not line or line.startswith("#") or "=" not in line:
                    continue
                key, _, value = line.partition("=")
                env[key.strip()] = value
    except FileNotFoundError:
        pass
    return env


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of someone else still answers kill(0); look at /proc where we can
    with contextlib.suppress(OSError):
        with open("/proc/%d/stat" % pid) as fh:
            if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
    return True


def _locked(lock_path: str) -> bool:
    """True while a daemon holds the job's lock."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing also drops our probe lock
    return False


def status_report(job_dir: str) -> dict:
    st = read_status(job_dir)
    p = _paths(job_dir)
    st.setdefault("phase", "absent")
    st["supervisor_alive"] = _locked(p["lock"])
    st["trainer_alive"] = _alive(st.get("trainer_pid"))
    st["stop_requested"] = bool(st.get("stop_requested")) or os.path.exists(p["stop"])
    try:
        st["log_size"] = os.path.getsize(p["log.txt"])
    except OSError:
        st["log_size"] = 0
    st["now"] = time.time()
    return st


# --------------------------------------------------------------------------------------------------
# launch


def launch(args: argparse.Namespace) -> int:
    job_dir = os.path.abspath(args.job_dir)
    os.makedirs(job_dir, exist_ok=True)
    p = _paths(job_dir)
    lock_fd = os.open(p["lock"], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)  # a daemon already runs this job
        print(json.dumps(dict(status_report(job_dir), launched=False)))
        return 0
    if read_status(job_dir).get("phase") in PHASES:
        # this job ran (or runs without a daemon, which cannot happen while we hold the lock): never
        # start the trainer twice, even after it finished
        os.close(lock_fd)
        print(json.dumps(dict(status_report(job_dir), launched=False)))
        return 0
    now = time.time()
    write_status(job_dir, {"phase": "starting", "heartbeat": now, "started_at": now, "stop_requested": False})

    pid = os.fork()
    if pid == 0:  # first child: new session, fork again so the daemon is not a session leader
        try:
            os.setsid()
            if os.fork() == 0:
                _daemon(args, job_dir, lock_fd)
                os._exit(0)
        finally:
            os._exit(0)
    os.close(lock_fd)  # the daemon keeps the lock through its own copy of the descriptor
    os.waitpid(pid, 0)
    deadline = time.time() + args.launch_wait
    while time.time() < deadline:
        st = read_status(job_dir)
        if st.get("phase") in ("running", "stopping", "exited"):
            break
        time.sleep(0.02)
    print(json.dumps(dict(status_report(job_dir), launched=True)))
    return 0


def _daemon(args: argparse.Namespace, job_dir: str, lock_fd: int) -> None:
    p = _paths(job_dir)
    devnull = os.open(os.devnull, os.O_RDWR)
    errlog = os.open(p["supervisor.log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(errlog, 1)
    os.dup2(errlog, 2)
    os.close(devnull)
    os.close(errlog)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    status = read_status(job_dir)
    status.update(supervisor_pid=os.getpid())
    try:
        _supervise(args, job_dir, p, status)
    except Exception as exc:  # never leave the status at "running" without a daemon
        status.update(phase="exited", finished_at=time.time(), error="supervisor: %s" % exc)
        if status.get("exit_code") is None:
            status["exit_code"] = 70
        write_status(job_dir, status)
    finally:
        os.close(lock_fd)


def _supervise(args: argparse.Namespace, job_dir: str, p: dict, status: dict) -> None:
    env = dict(os.environ)
    env.update(read_env_file(p["env"]))
    env["PYTHONUNBUFFERED"] = "1"
    log = os.open(p["log.txt"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = subprocess.Popen(
            [args.python, "run.py", args.config],
            cwd=args.aitoolkit,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop signals reach every worker it spawns
            close_fds=True,
        )
    except OSError as exc:
        os.write(log, ("lorabot supervisor: cannot start the trainer: %s\n" % exc.strerror).encode())
        os.close(log)
        status.update(phase="exited", exit_code=127, finished_at=time.time(), error=str(exc.strerror))
        write_status(job_dir, status)
        return
    os.close(log)
    with open(p["pid"] + ".tmp", "w") as fh:
        fh.write("%d\n" % proc.pid)
    os.replace(p["pid"] + ".tmp", p["pid"])
    status.update(phase="running", trainer_pid=proc.pid, heartbeat=time.time())
    write_status(job_dir, status)
    deadline = time.time() + args.deadline_in if args.deadline_in > 0 else None

    escalation: list = []  # [(deadline, signal), ...] once a stop is requested
    last_beat = 0.0
    while True:
        rc = proc.poll()
        if rc is not None:
            break
        now = time.time()
        if not escalation and "deadman" not in status:
            reason = _deadman_reason(args, p, status, deadline, now)
            if reason:  # the bot is gone (or the job is past its end): stop training, as `stop` does
                status["deadman"] = reason
                _touch_stop(p)
        if not escalation and os.path.exists(p["stop"]):
            status.update(phase="stopping", stop_requested=True, stop_requested_at=now)
            _signal_group(proc.pid, signal.SIGINT)
            escalation = [
                (now + args.grace_int, signal.SIGTERM),
                (now + args.grace_int + args.grace_term, signal.SIGKILL),
            ]
            last_beat = 0.0
        while escalation and now >= escalation[0][0]:
            sig = escalation.pop(0)[1]
            status["escalated"] = signal.Signals(sig).name
            _signal_group(proc.pid, sig)
            last_beat = 0.0
        if now - last_beat >= args.heartbeat:
            status["heartbeat"] = now
            write_status(job_dir, status)
            last_beat = now
        time.sleep(min(0.2, args.heartbeat))
    # the trainer is gone; make sure stragglers of its group go too
    _signal_group(proc.pid, signal.SIGKILL)
    status.update(
        phase="exited",
        exit_code=rc if rc >= 0 else 128 - rc,  # shell convention: killed by signal N -> 128+N
        signal=signal.Signals(-rc).name if rc < 0 else None,
        finished_at=time.time(),
        heartbeat=time.time(),
    )
    write_status(job_dir, status)
    # the trainer is done, the rental is not: keep the switch armed until the bot collects and
    # destroys (the container then goes with it) or goes silent (then end the rental here)
    while "deadman" not in status:
        if args.deadman <= 0 and deadline is None:
            return
        now = time.time()
        reason = _deadman_reason(args, p, status, deadline, now)
        if reason:
            status["deadman"] = reason
            break
        time.sleep(min(1.0, args.heartbeat))
    status["deadman_action"] = "ending the rental"
    write_status(job_dir, status)
    status["deadman_action"] = end_rental(args)
    write_status(job_dir, status)


def _deadman_reason(args: argparse.Namespace, p: dict, status: dict, deadline: float | None, now: float) -> str:
    if deadline is not None and now > deadline:
        return "the job's hard deadline passed"
    if args.deadman > 0:
        try:
            last = os.path.getmtime(p["bot_heartbeat"])
        except OSError:
            last = 0.0
        last = max(last, float(status.get("started_at") or 0.0))
        if now - last > args.deadman:
            return "no word from the bot for %.0f s" % (now - last)
    return ""


def _touch_stop(p: dict) -> None:
    if not os.path.exists(p["stop"]):
        with open(p["stop"] + ".tmp", "w") as fh:
            fh.write("%f\n" % time.time())
        os.replace(p["stop"] + ".tmp", p["stop"])


def container_env(path: str) -> dict:
    """CONTAINER_ID / CONTAINER_API_KEY: our environment first, else the container's init's."""
    env = {}
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            raw = fh.read(1 << 20)
        for item in raw.replace(b"\n", b"\0").split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                env[key.strip()] = value.strip()
    for key in ("CONTAINER_ID", "CONTAINER_API_KEY"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _vast(method: str, url: str, key: str, body: object = None) -> bool:
    import urllib.request

    if not url.startswith(("https://", "http://")):
        return False
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={  # noqa: S310 - checked above
        "Authorization": "Bearer " + key, "Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - http(s) only, checked above
            answer = json.loads(resp.read(1 << 20) or b"{}")
    except Exception as exc:  # refused, unreachable, not JSON: the next way out is tried
        sys.stderr.write("lorabot supervisor: %s %s failed: %s\n" % (method, url.split("?")[0], exc))
        return False
    return isinstance(answer, dict) and answer.get("success") is not False


def end_rental(args: argparse.Namespace) -> str:
    """Destroy this instance with its own key; else stop it; else stop the container (storage bills)."""
    env = container_env(args.container_environ)
    cid, key = env.get("CONTAINER_ID", ""), env.get("CONTAINER_API_KEY", "")
    if cid.isdigit() and key and args.vast_api_url:
        url = "%s/api/v0/instances/%s/" % (args.vast_api_url.rstrip("/"), cid)
        if _vast("DELETE", url, key):
            return "destroyed through the Vast.ai API"
        if _vast("PUT", url, key, {"state": "stopped"}):
            return "stopped through the Vast.ai API"
    if args.container_pid > 0 and cid:  # only inside a Vast.ai container: never some other machine's init
        try:
            os.kill(args.container_pid, signal.SIGTERM)
            return "sent SIGTERM to pid %d" % args.container_pid
        except OSError as exc:
            return "could not end the rental: %s" % exc
    return "could not end the rental: no instance key, and not in a Vast.ai container"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------------------------------
# status / stop


def status_cmd(args: argparse.Namespace) -> int:
    print(json.dumps(status_report(os.path.abspath(args.job_dir))))
    return 0


def stop_cmd(args: argparse.Namespace) -> int:
    job_dir = os.path.abspath(args.job_dir)
    p = _paths(job_dir)
    if not os.path.exists(p["stop"]):
        with open(p["stop"] + ".tmp", "w") as fh:
            fh.write("%f\n" % time.time())
        os.replace(p["stop"] + ".tmp", p["stop"])
    deadline = time.time() + args.wait
    st = status_report(job_dir)
    while time.time() < deadline and st.get("phase") != "exited" and st["supervisor_alive"]:
        time.sleep(0.1)
        st = status_report(job_dir)
    print(json.dumps(st))
    return 0


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="supervisor.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    la = sub.add_parser("launch")
    la.add_argument("--job-dir", required=True)
    la.add_argument("--config", required=True, help="absolute path of the job config")
    la.add_argument("--python", default=sys.executable or "python3")
    la.add_argument("--aitoolkit", default="/app/ai-toolkit")  # where ostris/aitoolkit's image keeps it
    la.add_argument("--grace-int", type=float, default=60.0, help="seconds after SIGINT before SIGTERM")
    la.add_argument("--grace-term", type=float, default=15.0, help="seconds after SIGTERM before SIGKILL")
    la.add_argument("--heartbeat", type=float, default=5.0)
    la.add_argument("--launch-wait", type=float, default=10.0)
    la.add_argument("--deadman", type=float, default=0.0, help="end the rental after S s without a bot heartbeat")
    la.add_argument("--deadline-in", type=float, default=0.0, help="end the rental S s from now")
    la.add_argument("--vast-api-url", default="https://console.vast.ai")
    la.add_argument("--container-environ", default="/proc/1/environ")
    la.add_argument("--container-pid", type=int, default=1, help="stopped when the API refuses; 0: never")
    st = sub.add_parser("status")
    st.add_argument("--job-dir", required=True)
    sp = sub.add_parser("stop")
    sp.add_argument("--job-dir", required=True)
    sp.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the trainer to exit")
    args = ap.parse_args(argv)
    if args.cmd == "launch":
        if not os.path.isabs(args.config):
            ap.error("--config must be an absolute path")
        return launch(args)
    if args.cmd == "status":
        return status_cmd(args)
    return stop_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
