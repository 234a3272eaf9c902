"""`planetlab-agent decommission` removes the host accounts the agent made (issue 15),
and only those: real accounts made with useradd, named by this test's pid."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from agent import config
from agent.decommission import remove_host_accounts

PID = os.getpid()


def _user(name: str, shell: str, home: Path) -> None:
    home.mkdir(parents=True)
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", shell, name], check=True,
                   capture_output=True)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="useradd needs root")
def test_decommission_removes_the_agents_accounts_only(tmp_path: Path) -> None:
    cfg = config.from_mapping({"state_dir": str(tmp_path / "s"), "run_dir": str(tmp_path / "r"),
                               "host_accounts": 1, "account_home_base": str(tmp_path)}, "t")
    ours, ctl, operator, stranger = (f"dc{PID % 100000}{c}" for c in "acos")
    try:
        _user(ours, cfg.shell_path, tmp_path / ours)
        _user(ctl, cfg.controller_shell_path, tmp_path / ctl)
        _user(operator, "/bin/sh", tmp_path / operator)      # an operator's own, same name
        _user(stranger, cfg.shell_path, tmp_path / stranger)  # not a sliver of this agent
        said: list[str] = []
        problems: list[str] = []
        remove_host_accounts(cfg, [ours, ctl, operator, f"dc{PID % 100000}gone"], said.append,
                             problems)
        assert problems == []
        assert not _exists(ours) and not (tmp_path / ours).exists()
        assert not _exists(ctl)
        assert _exists(operator) and (tmp_path / operator).exists()
        assert _exists(stranger)
        assert said == [f"removed host account {ours}", f"removed host account {ctl}"]
    finally:
        for name in (ours, ctl, operator, stranger):
            subprocess.run(["userdel", name], capture_output=True)
