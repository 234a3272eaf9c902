"""kernel/landlock.py on the real kernel: abstract Unix sockets and signals do not
cross slivers, and the optional TCP bind ban holds for the sliver but not for the
agent binding on its behalf."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import landlock

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]

# A "sliver": restricts itself, optionally listens on an abstract name, then runs the
# probes it is given and prints one JSON line per request read from stdin.
SLIVER = r"""
import json, os, signal, socket, sys
sys.path.insert(0, sys.argv[1])
from kernel import landlock
landlock.restrict_sliver()
own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
own.bind("\0" + sys.argv[2]); own.listen(8)
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    out = {}
    for name in req.get("connect", []):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("\0" + name); out[name] = 0
        except OSError as e:
            out[name] = e.errno
        s.close()
    for pid in req.get("kill", []):
        try:
            os.kill(pid, 0); out[str(pid)] = 0
        except OSError as e:
            out[str(pid)] = e.errno
    if req.get("tcp_bind"):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 0)); out["tcp_bind"] = 0
        except OSError as e:
            out["tcp_bind"] = e.errno
        out["tcp_fd"] = s.fileno()
        socks = globals().setdefault("keep", []); socks.append(s)
    print(json.dumps(out), flush=True)
"""


class Proc:
    def __init__(self, name: str) -> None:
        self.name = name
        self.p = subprocess.Popen([sys.executable, "-c", SLIVER, str(ROOT), name],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        self.pid = json.loads(self.p.stdout.readline())["ready"]

    def ask(self, **req: object) -> dict:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    try:
        yield made
    finally:
        for p in made:
            p.stop()


def test_abi_has_scoping() -> None:
    assert landlock.abi_version() >= landlock.MIN_ABI_SCOPE


def test_abstract_sockets_and_signals_scoped(procs: list[Proc]) -> None:
    tag = f"ll-{os.getpid()}"
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind(f"\0{tag}-host")
    host.listen(8)
    try:
        a = Proc(f"{tag}-a")
        procs.append(a)
        b = Proc(f"{tag}-b")
        procs.append(b)
        got = a.ask(connect=[f"{tag}-a", f"{tag}-b", f"{tag}-host"],
                    kill=[a.pid, b.pid, os.getpid()])
        assert got[f"{tag}-a"] == 0                     # its own abstract socket
        assert got[f"{tag}-b"] == errno.EPERM           # another sliver's
        assert got[f"{tag}-host"] == errno.EPERM        # the host's
        assert got[str(a.pid)] == 0
        assert got[str(b.pid)] == errno.EPERM
        assert got[str(os.getpid())] == errno.EPERM
        # the host (not in a domain) still reaches the sliver: scoping is one way
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(f"\0{tag}-b")
        os.kill(b.pid, 0)
    finally:
        host.close()


def test_tcp_bind_denied_to_sliver_but_agent_binds_its_socket(procs: list[Proc]) -> None:
    from kernel.pidfd import pidfd_getfd, pidfd_open
    a = Proc(f"llb-{os.getpid()}")
    procs.append(a)
    got = a.ask(tcp_bind=True)
    assert got["tcp_bind"] == errno.EACCES
    pidfd = pidfd_open(a.pid)
    try:
        fd = pidfd_getfd(pidfd, got["tcp_fd"])
    finally:
        os.close(pidfd)
    with socket.socket(fileno=fd) as s:
        s.bind(("127.0.0.1", 0))  # the agent is outside the domain
        assert s.getsockname()[1] > 0


def test_ruleset_attr_layout() -> None:
    raw = landlock.ruleset_attr(landlock.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
                                | landlock.LANDLOCK_SCOPE_SIGNAL)
    assert raw == bytes(16) + (3).to_bytes(8, "little")
    with pytest.raises(ValueError, match="port"):
        landlock.allow_tcp_port(-1, 70000)
