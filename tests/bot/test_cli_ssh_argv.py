"""The review's H6: `lorabot ssh` / `launch` run OpenSSH with the same hardened options as the
pipeline's own transfers, so an operator's ~/.ssh/config (ForwardAgent, forwards, ProxyCommand,
ControlPath) never reaches a rented box."""

from __future__ import annotations

from pathlib import Path

from bot.cli.shell import ssh_argv, write_known_hosts
from services.jobs import Job
from services.openssh import HOST_ALIAS
from services.settings import load_settings


def _job() -> Job:
    return Job(ssh_host="-oProxyCommand=evil", ssh_port=2222, host_key="ssh-ed25519 AAAAkey")


def test_the_argv_is_hardened_and_pinned(tmp_path: Path) -> None:
    s = load_settings(work_dir=str(tmp_path), ssh_user="root")
    known = write_known_hosts(s, _job())
    assert known.read_text() == f"{HOST_ALIAS} ssh-ed25519 AAAAkey\n"
    for tty in (False, True):
        argv = ssh_argv(s, _job(), known, "ls", tty=tty)
        assert argv[:3] == ["ssh", "-F", "/dev/null"]  # no user config at all
        assert {"-a", "-x"} <= set(argv)  # no agent, no X11
        for opt in ("IdentityAgent=none", "ForwardAgent=no", "ClearAllForwardings=yes", "PermitLocalCommand=no",
                    "ControlMaster=no", "ControlPath=none", "StrictHostKeyChecking=yes",
                    f"UserKnownHostsFile={known}", f"HostKeyAlias={HOST_ALIAS}"):
            assert opt in argv, opt
        # the host never reads as an option
        assert argv[-3:] == ["--", "-oProxyCommand=evil", "ls"]
        assert ("-t" in argv) == tty and ("-T" in argv) != tty
