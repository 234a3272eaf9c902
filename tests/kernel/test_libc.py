"""kernel/libc.py: the syscall numbers match the kernel headers, and the errno check."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

import pytest

from kernel import libc

UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not UNISTD.exists(), reason="linux-libc-dev headers not installed")
def test_syscall_numbers_match_the_headers() -> None:
    header = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()))
    ours = {n[3:].lower(): v for n, v in vars(libc).items() if n.startswith("NR_")}
    assert len(ours) > 20
    for name, nr in ours.items():
        assert int(header[name]) == nr, name


def test_check_raises_errno_and_names_the_call() -> None:
    assert libc.check(5, "x") == 5
    assert libc.LIBC.close(ctypes.c_int(-1)) == -1
    with pytest.raises(OSError) as exc:
        libc.check(-1, "close", "fd -1")
    assert exc.value.errno == errno.EBADF
    assert exc.value.strerror == f"close: {os.strerror(errno.EBADF)}"
    assert exc.value.filename == "fd -1"

    class Special(OSError):
        pass

    with pytest.raises(Special):
        libc.check(-1, "again", exc=Special)


def test_function_is_private_and_typed() -> None:
    getpid = libc.function("getpid", ctypes.c_int)
    assert getpid() == os.getpid()
    assert libc.function("getpid", ctypes.c_int) is not getpid
    assert libc.LIBC.syscall(ctypes.c_long(libc.NR_GETPID)) == os.getpid()
    close = libc.function("close", ctypes.c_int, ctypes.c_int)
    assert close(-1) == -1 and ctypes.get_errno() == errno.EBADF
