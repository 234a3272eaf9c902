"""`planetlab-agent sliver ...` and `planetlab-agent enter` end to end, as a user
runs them (a subprocess each), over a temp state dir with the busybox image."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.cgroups import SliverCgroup, detect_layout
from tests.kernel.busybox_image import cleanup_roots, make_busybox_tree
from tests.kernel.test_context_support import processes_with

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


class Cli:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def __call__(self, *args: str, check: bool = True, input: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--state-dir", str(self.state_dir), *args],
            cwd=REPO, capture_output=True, text=True, timeout=60, input=input,
            stdin=None if input is not None else subprocess.DEVNULL)
        if check:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def names(self) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(self("sliver", "list", "--json").stdout)}


@pytest.fixture(scope="module")
def cli() -> Iterator[Cli]:
    sd = Path(tempfile.mkdtemp(prefix=f"clitest{os.getpid()}-", dir="/tmp"))
    os.chmod(sd, 0o755)
    c = Cli(sd)
    try:
        c("image", "import", "bb", str(make_busybox_tree(sd / "src")))
        yield c
    finally:
        try:
            for name in c.names():
                c("sliver", "destroy", name, check=False)
        finally:
            cleanup_roots(sd / "roots")
            shutil.rmtree(sd, ignore_errors=True)


def _nothing_left(cli: Cli, name: str) -> None:
    assert name not in cli.names()
    assert not (cli.state_dir / "run/contexts" / name).exists()
    assert not (cli.state_dir / "roots" / name).exists()
    assert not SliverCgroup(detect_layout(), name).exists()
    assert processes_with(f"--hostname={name}") == []
    assert f"/roots/{name} " not in Path("/proc/mounts").read_text()


def test_create_enter_stop_start_destroy(cli: Cli) -> None:
    a, b = f"c{os.getpid()}a", f"c{os.getpid()}b"
    out = cli("sliver", "create", a, "--image", "bb", "--pids-max", "50",
              "--cpu-share", "2", "--mem-max", str(64 << 20)).stdout
    assert out.startswith(f"created {a}: uids ")
    cli("sliver", "create", b, "--image", "bb")
    rows = cli.names()
    assert rows[a]["state"] == rows[b]["state"] == "running"
    ra, rb = rows[a]["uid_base"], rows[b]["uid_base"]
    assert abs(ra - rb) >= 65536                           # chosen disjoint
    assert cli("enter", a, "--", "hostname").stdout.strip() == a
    assert cli("enter", a, "--user", "user", "--", "id", "-u").stdout.strip() == "1000"
    assert cli("enter", a, "--", "sh", "-c", "exit 5", check=False).returncode == 5
    assert cli("enter", a, "--", "cat", input="piped").stdout == "piped"
    assert cli("enter", a, "--", "cat", "/sys/fs/cgroup/pids.max", check=False) \
        .returncode != 0                                  # no cgroupfs view inside
    cli("sliver", "stop", a)
    assert cli.names()[a]["state"] == "stopped"
    res = cli("enter", a, "--", "true", check=False)
    assert res.returncode == 1 and "stopped" in res.stderr
    cli("sliver", "start", a)
    assert cli.names()[a]["state"] == "running"
    # After a crash of the init, `start` brings the sliver back from its record.
    pid = cli.names()[b]["init_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cli.names()[b]["state"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli.names()[b]["state"] == "dead"
    assert "again" in cli("sliver", "start", b).stdout
    assert cli.names()[b]["uid_base"] == rb
    assert cli("enter", b, "--", "true").returncode == 0
    for n in (a, b):
        assert cli("sliver", "destroy", n).stdout.strip() == f"destroyed {n}"
        _nothing_left(cli, n)


def test_refusals_leave_nothing(cli: Cli) -> None:
    a = f"c{os.getpid()}r"
    cli("sliver", "create", a, "--image", "bb", "--uid-base", "3000000000")
    try:
        res = cli("sliver", "create", a, "--image", "bb", check=False)
        assert res.returncode == 1 and "exists already" in res.stderr
        other = f"c{os.getpid()}o"
        res = cli("sliver", "create", other, "--image", "bb", "--uid-base", "3000000001",
                  check=False)
        assert res.returncode == 1 and "overlaps" in res.stderr and a in res.stderr
        _nothing_left(cli, other)
        res = cli("sliver", "create", other, "--image", "nosuch", check=False)
        assert res.returncode == 1 and "nosuch" in res.stderr
        _nothing_left(cli, other)
        res = cli("sliver", "create", other, "--image", "bb", "--cpu-pct", "0", check=False)
        assert res.returncode == 2 and "--cpu-pct" in res.stderr
        res = cli("sliver", "create", "Bad/Name", "--image", "bb", check=False)
        assert res.returncode == 1 and "Bad/Name" in res.stderr
        res = cli("sliver", "stop", other, check=False)
        assert res.returncode == 1 and "not running" in res.stderr
        res = cli("sliver", "destroy", other, check=False)
        assert res.returncode == 1 and "no sliver" in res.stderr
        res = cli("enter", other, "--", "true", check=False)
        assert res.returncode == 1 and "no sliver" in res.stderr
    finally:
        cli("sliver", "destroy", a)
    _nothing_left(cli, a)


def test_enter_with_a_terminal(cli: Cli) -> None:
    """`enter` from a terminal gets a pty inside (util-linux `script` plays the
    terminal), with the caller's window size, and returns the shell's exit code."""
    name = f"c{os.getpid()}t"
    cli("sliver", "create", name, "--image", "bb")
    try:
        cmd = (f"stty cols 100 rows 30; {sys.executable} -m agent.cli "
               f"--state-dir {cli.state_dir} enter {name}")
        res = subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=REPO,
                             input="echo hi-$((6*7)); tty; stty size\nexit 3\n",
                             capture_output=True, text=True, timeout=60)
        out = res.stdout.replace("\r", "")
        assert "hi-42" in out and "/dev/pts/0" in out and "30 100" in out, out
        assert res.returncode == 3
    finally:
        cli("sliver", "destroy", name)
    _nothing_left(cli, name)


# The command inside says which of its std fds are terminals, what fd 0 is, reads a
# line, writes to stderr, and exits 4.
_PROBE = ("for i in 0 1 2; do if [ -t $i ]; then echo tty$i; fi; done; "
          "readlink /proc/self/fd/0; read x; echo got-$x; echo to-stderr >&2; exit 4")


def _under_terminal(cmd: str, input: str) -> subprocess.CompletedProcess[str]:
    """Run shell `cmd` with a terminal as its stdin/stdout/stderr (util-linux
    `script` plays the terminal)."""
    return subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=REPO, input=input,
                          capture_output=True, text=True, timeout=60)


def test_enter_without_pty_never_passes_the_terminal(cli: Cli) -> None:
    """F10: `enter -T`, or `enter` with stdout redirected, from a terminal: the
    command gets pipes relayed by the CLI, never the host terminal itself."""
    name = f"c{os.getpid()}n"
    cli("sliver", "create", name, "--image", "bb")
    try:
        enter = f"{sys.executable} -m agent.cli --state-dir {cli.state_dir} enter {name}"
        res = _under_terminal(f"{enter} -T -- sh -c '{_PROBE}'", "hello\n")
        out = res.stdout.replace("\r", "")
        assert "tty0" not in out and "tty1" not in out and "tty2" not in out, out
        assert "pipe:[" in out and "got-hello" in out and "to-stderr" in out, out
        assert res.returncode == 4, out
        # stdout redirected (so no pty by default) while stdin is the terminal.
        dest = cli.state_dir / "enter-out.txt"
        res = _under_terminal(f"{enter} -- sh -c '{_PROBE}' > {dest}", "again\n")
        text = dest.read_text()
        assert "tty" not in text and "pipe:[" in text and "got-again" in text, text
        assert res.returncode == 4
        assert "to-stderr" in res.stdout          # stderr still reaches the terminal
    finally:
        cli("sliver", "destroy", name)
    _nothing_left(cli, name)


def _agent_pool_end() -> int:
    from agent import config

    cfg = config.defaults()
    return int(cfg.uid_pool_start + cfg.uid_pool_ranges * cfg.uid_range_size)


def test_cli_uid_ranges_stay_out_of_the_agents_pool(cli: Cli) -> None:
    """The CLI reserves ranges in the contexts dir's uid index, above the agent's
    pool (which the agent fills from uid_pool_start without asking): neither takes
    a range the other holds. Ranges held in the index by others are skipped."""
    from kernel.context import release_uid_range, reserve_uid_range

    contexts = cli.state_dir / "run/contexts"
    a, b, other = f"c{os.getpid()}u", f"c{os.getpid()}v", f"x{os.getpid()}w"
    pool_end = _agent_pool_end()
    res = cli("sliver", "create", a, "--image", "bb", "--uid-base", "1000000", check=False)
    assert res.returncode == 1 and "agent's pool" in res.stderr
    _nothing_left(cli, a)
    try:
        cli("sliver", "create", a, "--image", "bb")
        ra = cli.names()[a]["uid_base"]
        assert ra >= pool_end
        # Someone else (another tool, a sliver being created) holds the next range.
        taken = reserve_uid_range(contexts, other, 65536, lowest=pool_end)
        cli("sliver", "create", b, "--image", "bb")
        rb = cli.names()[b]["uid_base"]
        assert rb >= pool_end and len({ra, rb, taken}) == 3
        for x, y in ((ra, rb), (ra, taken), (rb, taken)):
            assert abs(x - y) >= 65536
        ranges = (contexts / ".uid-ranges").read_text().split("\n")
        assert f"{ra} 65536 {a}" in ranges and f"{rb} 65536 {b}" in ranges
    finally:
        release_uid_range(contexts, other)
        for n in (a, b):
            cli("sliver", "destroy", n, check=False)
    for n in (a, b):
        _nothing_left(cli, n)
    assert a not in (contexts / ".uid-ranges").read_text()


def test_cli_puts_slivers_under_the_configured_cgroup_parent(cli: Cli) -> None:
    """`sliver create` with an agent.toml uses its `cgroup_parent`, like the agent."""
    parent = f"clitest{os.getpid()}"
    conf = cli.state_dir / "agent.toml"
    conf.write_text(f'state_dir = "{cli.state_dir}"\nrun_dir = "{cli.state_dir / "run"}"\n'
                    f'cgroup_parent = "{parent}"\n')
    name = f"c{os.getpid()}p"
    layout = detect_layout()
    try:
        cli("--config", str(conf), "sliver", "create", name, "--image", "bb")
        assert SliverCgroup(layout, name, parent=parent).exists()
        assert not SliverCgroup(layout, name).exists()
    finally:
        cli("--config", str(conf), "sliver", "destroy", name, check=False)
        conf.unlink()
    assert not SliverCgroup(layout, name, parent=parent).exists()
    _nothing_left(cli, name)
    for mount in {*layout.v1.values(), *([layout.v2] if layout.v2 else [])}:
        with contextlib.suppress(FileNotFoundError):
            (mount / parent).rmdir()


def test_enter_hands_no_host_file_into_the_sliver(cli: Cli) -> None:
    """F37: `enter` with stdout redirected to a host file (no terminal anywhere): the
    command gets pipes, never the file; a process it leaves behind that writes later
    cannot write the file after enter returned, and no process inside holds it."""
    name = f"c{os.getpid()}f"
    cli("sliver", "create", name, "--image", "bb")
    dest = cli.state_dir / f"enter-file-{os.getpid()}.txt"
    try:
        script = ("ls -l /proc/self/fd/1; echo first; "
                  "(sleep 2; echo late-write) & echo started")
        with open(dest, "wb") as out:
            res = subprocess.run(
                [sys.executable, "-m", "agent.cli", "--state-dir", str(cli.state_dir),
                 "enter", name, "--", "sh", "-c", script],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                timeout=30)
        assert res.returncode == 0, res.stderr
        text = dest.read_text()
        assert "first" in text and "started" in text and "pipe:[" in text, text
        holders = processes_with("sleep\x002")
        assert holders, "the left-behind process is not running"
        for pid in holders:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    assert os.readlink(fd) != str(dest), (pid, fd)
        size = dest.stat().st_size
        time.sleep(3)   # the left-behind writer has written (or failed to) by now
        assert dest.stat().st_size == size and "late-write" not in dest.read_text()
    finally:
        cli("sliver", "destroy", name)
    _nothing_left(cli, name)


def test_destroy_of_a_dead_sliver_leaves_nothing(cli: Cli) -> None:
    """`sliver destroy` goes through KernelBackend.destroy, which clears a context whose
    init died (cgroups, directory, uid reservation) as well as a live one."""
    name = f"c{os.getpid()}d"
    cli("sliver", "create", name, "--image", "bb")
    os.kill(cli.names()[name]["init_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cli.names()[name]["state"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli.names()[name]["state"] == "dead"
    assert cli("sliver", "destroy", name).stdout.strip() == f"destroyed {name}"
    _nothing_left(cli, name)
    assert name not in (cli.state_dir / "run/contexts/.uid-ranges").read_text()
