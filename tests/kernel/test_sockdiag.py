"""kernel.sockdiag on the real kernel: dump by local port, destroy by cookie."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from kernel import sockdiag

pytestmark = pytest.mark.kernel


def test_find_by_port_and_destroy_tcp_and_udp_both_families() -> None:
    lst = socket.socket()
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    other = socket.socket()
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        port = lst.getsockname()[1]
        u6.bind(("::1", port))
        other.bind(("127.0.0.1", 0))
        tcp, udp = sockdiag.find("tcp", port), sockdiag.find("udp", port)
        assert [(s.family, s.local, s.port, s.uid) for s in tcp] == \
            [(socket.AF_INET, "127.0.0.1", port, 0)]
        assert [(s.family, s.local, s.port) for s in udp] == [(socket.AF_INET6, "::1", port)]
        assert tcp[0].inode == os.fstat(lst.fileno()).st_ino
        assert sockdiag.destroy(tcp[0]) and sockdiag.destroy(udp[0])
        lst.settimeout(2)
        with pytest.raises(OSError) as got:
            lst.accept()
        assert got.value.errno == errno.EINVAL
        u6.settimeout(2)
        with pytest.raises(OSError) as got:
            u6.recv(16)
        assert got.value.errno == errno.ECONNABORTED
        assert sockdiag.find("tcp", port) == []
        assert sockdiag.destroy(tcp[0]) is False  # gone already
        assert other.getsockname()[1] != 0  # untouched: another port
    finally:
        lst.close()
        u6.close()
        other.close()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="sctp"):
        sockdiag.find("sctp", 80)
    with pytest.raises(ValueError, match="70000"):
        sockdiag.find("tcp", 70000)


def test_find_a_port_range_in_one_dump() -> None:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        lo, mid, hi = sorted(s.getsockname()[1] for s in socks)
        got = {s.port for s in sockdiag.find("udp", lo, hi)}
        assert {lo, mid, hi} <= got and all(lo <= p <= hi for p in got)
        assert {s.port for s in sockdiag.find("udp", lo, mid)} >= {lo, mid}
        assert hi not in {s.port for s in sockdiag.find("udp", lo, mid)}
        assert lo not in {s.port for s in sockdiag.find("udp", mid, hi)}
        if mid > lo + 1:
            assert lo not in {s.port for s in sockdiag.find("udp", lo + 1, hi)}
    finally:
        for s in socks:
            s.close()


def test_deafen_is_locked_and_holders_found_by_uid() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        s.bind(("127.0.0.1", 0))
        inode = os.fstat(s.fileno()).st_ino
        got = sockdiag.holders({inode}, os.geteuid(), 1)
        pid, fd = got[inode]
        assert pid == os.getpid() and os.fstat(fd).st_ino == inode
        assert sockdiag.holders({inode}, os.geteuid() + 1, 10) == {}
        sender.sendto(b"before", s.getsockname())
        s.settimeout(2)
        assert s.recv(16) == b"before"
        sockdiag.deafen(s.fileno())
        sender.sendto(b"after", s.getsockname())
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(16)
        with pytest.raises(OSError) as err:  # its holder cannot take the filter off
            s.setsockopt(socket.SOL_SOCKET, 27, 0)  # SO_DETACH_FILTER
        assert err.value.errno == errno.EPERM
