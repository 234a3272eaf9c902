"""PACKET_QDISC_BYPASS would send a packet socket's frames around the shaper's qdisc
(docs/bandwidth.md): a sliver can open no packet socket (the guard filter), and
should one reach it anyway, setsockopt at level SOL_PACKET is refused too."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]

# A packet socket made before the filter (as if handed in), then the guard filter.
CODE = r"""
import ctypes, json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from kernel import seccomp
pkt = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
os.close(seccomp.install(seccomp.guard_filter()))
libc = ctypes.CDLL(None, use_errno=True)
one = ctypes.c_int(1)
def opt(fd, level, name):
    r = libc.setsockopt(fd, level, name, ctypes.byref(one), 4)
    return 0 if r == 0 else ctypes.get_errno()
print(json.dumps({
    "bypass": opt(pkt.fileno(), 263, 20),          # SOL_PACKET, PACKET_QDISC_BYPASS
    "fanout": opt(pkt.fileno(), 263, 18),          # any SOL_PACKET option
    "priority": opt(udp.fileno(), 1, 12),          # SOL_SOCKET, SO_PRIORITY: allowed
    "reuse": opt(udp.fileno(), 1, 2),              # SO_REUSEADDR: allowed
}))
"""


def test_setsockopt_sol_packet_is_refused_under_the_guard_filter() -> None:
    done = subprocess.run([sys.executable, "-c", CODE, str(ROOT)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got == {"bypass": errno.EPERM, "fanout": errno.EPERM, "priority": 0, "reuse": 0}
