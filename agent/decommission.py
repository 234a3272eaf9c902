"""`planetlab-agent decommission`: a node leaving PlanetLab (or a tryout ending).

Stops every sliver (kills its processes), removes the host accounts (`ssh SLICE@node`)
the agent made for its slivers (only an account of a sliver it knows whose login
shell is one of the agent's: an operator's own account of the same name stays),
then removes what the agent made in the kernel and under /run: every sliver root mount and the layer store's mount (its
loop device goes with it), the node-wide cgroup parent in every hierarchy, the
traffic-shaping qdiscs of `[bandwidth] interfaces`, and the run directory. The state
directory stays (agent.db, images, the store's image file with the slivers' files):
remove it by hand when the data is not wanted.

Refused while an agent runs: it would bring the slivers back. The agent's lock is
held throughout, so none starts meanwhile.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.lockfile import PidLock


def _bandwidth_interfaces(cfg: AgentConfig) -> tuple[str, ...]:
    """`[bandwidth] interfaces` of the config (read from its file: the table may be
    unknown to the config loader of this version)."""
    table = getattr(cfg, "bandwidth", None)
    if table is not None:
        return tuple(getattr(table, "interfaces", ()))
    if cfg.source.startswith("<"):
        return ()
    try:
        data = tomllib.loads(Path(cfg.source).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return ()
    from agent.bandwidth import parse_config

    return parse_config(data.get("bandwidth"), cfg.source).interfaces


def _known_slivers(cfg: AgentConfig, contexts: Path) -> list[str]:
    """The slivers this agent made: its state database's and its run directory's."""
    from kernel.context import Context

    names = set(Context.list(contexts))
    if (Path(cfg.state_dir) / "agent.db").exists():
        from agent.state import State

        with State.open(cfg.state_dir) as state:
            names.update(state.slivers())
    return sorted(names)


def remove_host_accounts(cfg: AgentConfig, names: list[str], say: Callable[[str], Any],
                         problems: list[str]) -> None:
    from agent.accounts import HostAccountError, remove_host_account

    shells = (cfg.shell_path, cfg.controller_shell_path)
    for name in names:
        try:
            made = pwd.getpwnam(name).pw_shell in shells
        except KeyError:
            continue
        if not made:
            continue
        try:
            remove_host_account(name, shells, Path(cfg.account_home_base))
            say(f"removed host account {name}")
        except (HostAccountError, OSError, subprocess.SubprocessError) as exc:
            problems.append(f"host account {name}: {exc}")


def decommission(cfg: AgentConfig, say: Callable[[str], Any] = print,
                 interfaces: tuple[str, ...] = ()) -> list[str]:
    """Do it; `say` gets one line per thing removed. `interfaces`: shaped interfaces
    besides the config's `[bandwidth] interfaces`. Returns the problems (empty: all
    done). Raises lockfile.AlreadyRunning while an agent runs."""
    from kernel.cgroups import detect_layout, remove_parent
    from kernel.context import Context
    from kernel.rootfs import unmount_all

    problems: list[str] = []
    run_dir, state_dir = Path(cfg.run_dir), Path(cfg.state_dir)
    contexts = run_dir / "contexts"
    with PidLock(state_dir, run_dir):
        known = _known_slivers(cfg, contexts)
        for name in Context.list(contexts):
            try:
                Context.destroy_stale(contexts, name, cgroup_parent=cfg.cgroup_parent)
                say(f"stopped sliver {name}")
            except OSError as exc:
                problems.append(f"sliver {name}: {exc}")
        remove_host_accounts(cfg, known, say, problems)
        try:
            for mount in unmount_all(state_dir / "roots"):
                say(f"unmounted {mount}")
        except OSError as exc:
            problems.append(f"unmounting under {state_dir / 'roots'}: {exc}")
        try:
            for top in remove_parent(detect_layout(), cfg.cgroup_parent):
                say(f"removed cgroup {top}")
        except OSError as exc:
            problems.append(f"cgroup {cfg.cgroup_parent}: {exc}")
        try:
            configured = _bandwidth_interfaces(cfg)
        except ValueError as exc:
            problems.append(f"[bandwidth]: {exc}")
            configured = ()
        for ifname in dict.fromkeys((*configured, *interfaces)):
            from kernel.tc import Shaper

            try:
                with Shaper(ifname) as shaper:
                    shaper.remove_all()
                say(f"removed traffic shaping on {ifname}")
            except OSError as exc:
                problems.append(f"tc on {ifname}: {exc}")
        socket_path = Path(cfg.socket_path)
        if socket_path.is_socket():
            socket_path.unlink(missing_ok=True)
        if run_dir.is_dir():
            # The pid file goes too; its lock stays held on the open file until the end.
            shutil.rmtree(run_dir, ignore_errors=True)
            if run_dir.exists():
                problems.append(f"run directory {run_dir}: not entirely removed")
            else:
                say(f"removed {run_dir}")
    return problems
