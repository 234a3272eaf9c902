"""Destroying a context whose init is not our child (the caller restarted and
adopted it): destroy must not wait for the init's reaper, and must still leave
nothing behind (process, mount, cgroup, namespace pin, run dir, uid index entry)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.context import DEVNULL, Context, _uid_ranges_file
from kernel.ns import SLIVER_NAMESPACES, ns_ids
from tests.kernel.test_context_support import (
    Slivers,
    leftovers,
    processes_with,
    slivers,
    unique_uid_base,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]

# A stand-in for an agent that created a context and then restarted: it is the
# subreaper of the init (the init's launcher is its child and exits), creates the
# context, prints its state, and then never reaps anything (as a slow host PID 1
# would not, for a while). Only when the test kills it is the zombie handed on.
_CREATOR = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import prctl
    from kernel.context import Context
    prctl.set_child_subreaper(1)
    run_dir, name, root, base = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ctx = Context.create(Path(run_dir), name, Path(root), base)
    print(json.dumps(ctx.state), flush=True)
    time.sleep(600)
""")


@pytest.fixture
def sl() -> Iterator[Slivers]:
    with slivers() as s:
        yield s


@contextlib.contextmanager
def foreign_context(sl: Slivers) -> Iterator[tuple[str, dict, subprocess.Popen[str]]]:
    """A context made by another process that stays its init's (non-reaping) parent."""
    name = sl.name("f")
    base = unique_uid_base()
    root = sl.root(name, base)
    creator = subprocess.Popen(
        [sys.executable, "-c", _CREATOR, str(sl.run_dir), name, str(root), str(base)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    state: dict = {}
    try:
        assert creator.stdout is not None
        line = creator.stdout.readline()
        assert line, f"creator failed (rc {creator.poll()})"
        state = json.loads(line)
        yield name, state, creator
    finally:
        creator.kill()
        creator.wait()
        # Its zombie children come to us (the tests' process is a subreaper): reap.
        if state:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state["init_pid"], 0)
        with contextlib.suppress(Exception):
            Context.destroy_stale(sl.run_dir, name)


def test_destroy_after_adopt_does_not_wait_for_the_reaper(sl: Slivers) -> None:
    with foreign_context(sl) as (name, state, creator):
        pid = state["init_pid"]
        ppid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("PPid:")).split()[1])
        assert ppid == creator.pid                     # not ours: we only adopt it
        ctx = Context.adopt(sl.run_dir, name)
        assert ctx.run(["true"], stdin=DEVNULL, stdout=DEVNULL) == 0
        sleeper = ctx.spawn(["sleep", "300"], stdin=DEVNULL, stdout=DEVNULL)          # a second process to kill
        ns = ns_ids(pid)
        inodes = {ns[k] for k in SLIVER_NAMESPACES}
        cgroup_dirs = ctx.cgroup.dirs()
        t0 = time.monotonic()
        ctx.destroy()
        took = time.monotonic() - t0
        # The creator never reaps: before the fix destroy waited its whole timeout
        # (10 s) here; with the host's PID 1 as reaper about 2 s on this VM.
        assert took < 1.0, f"destroy took {took:.2f}s"
        status = Path(f"/proc/{pid}/status").read_text()
        assert "State:\tZ" in status                   # dead, not yet reaped
        assert sleeper.wait(5) == -signal.SIGKILL
        # The zombie init keeps only its credentials, so its user namespace, until
        # its reaper collects it: nothing runs there, no mount, no other namespace.
        # The same for its sockd (killed with the cgroup, a zombie of the same reaper).
        left = leftovers(name, pid, inodes, sl.run_dir, cgroup_dirs)
        assert set(left) <= {f"process {p} is in user namespace"
                             for p in (pid, state["sockd_pid"])}, left
        assert name not in _uid_ranges_file(sl.run_dir).read_text()
        assert processes_with(f"--hostname={name}") == []
        with pytest.raises(FileNotFoundError):
            Context.adopt(sl.run_dir, name)


def test_destroy_frozen_foreign_context(sl: Slivers) -> None:
    """The same for a stopped (frozen) context: it is thawed after the kill."""
    with foreign_context(sl) as (name, state, _creator):
        ctx = Context.adopt(sl.run_dir, name)
        ctx.stop()
        assert ctx.frozen()
        t0 = time.monotonic()
        ctx.destroy()
        assert time.monotonic() - t0 < 1.0
        assert not ctx.cgroup.exists()
        assert not (sl.run_dir / name).exists()

