"""The slice login shells at their fixed system path.

Host accounts (`ssh SLICE@node`) get `vsh` as their login shell, controller slices
`forward_api_calls`. /etc/passwd names them by path, so they live at one path that
does not move with a source checkout and that only root can write
(config.SYSTEM_SHELL_DIR); the agent installs its own build there at every start,
atomically (a login in progress keeps the old file), so the shell always matches the
running agent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.config import SYSTEM_SHELL_DIR, AgentConfig, ConfigError

log = logging.getLogger("agent.loginshell")

SHELLS = ("vsh", "forward_api_calls")
BUILT_DIR = Path(__file__).resolve().parent / "bin"   # `make native` builds them here


def install(src_dir: Path = BUILT_DIR, dest_dir: Path = Path(SYSTEM_SHELL_DIR),
            names: tuple[str, ...] = SHELLS) -> list[Path]:
    """Copy each program `names` from `src_dir` to `dest_dir` (mode 0755, owned by root)
    where its content differs; returns the files written."""
    written: list[Path] = []
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    for name in names:
        src = src_dir / name
        try:
            data = src.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{src}: the slice login shell is not built (run `make "
                              "native`), or set host_accounts = 0") from None
        dest = dest_dir / name
        try:
            if dest.read_bytes() == data and dest.stat().st_mode & 0o7777 == 0o755:
                continue
        except FileNotFoundError:
            pass
        tmp = dest_dir / f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o700)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o755)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        written.append(dest)
    return written


def install_for(cfg: AgentConfig) -> None:
    """At agent start: install the shells when host accounts use the agent's own."""
    if not cfg.host_accounts or cfg.ssh_shell:
        return
    for path in install():
        log.info("installed slice login shell %s", path)


#: The sliver tools: programs every sliver finds read-only at SLIVER_TOOLS_DIR
#: (`plapi`, the slice API client), bind-mounted from `<run_dir>/tools`.
SLIVER_TOOLS = ("plapi",)
SLIVER_TOOLS_DIR = "/usr/lib/planetlab"


def install_sliver_tools(run_dir: Path) -> Path | None:
    """`<run_dir>/tools` with the sliver tools (root-owned, so read-only to every
    sliver); None, said in the log, when they are not built."""
    dest = run_dir / "tools"
    try:
        install(BUILT_DIR, dest, SLIVER_TOOLS)
    except ConfigError as exc:
        log.warning("no sliver tools: %s", exc)
        return None
    dest.chmod(0o755)
    return dest
