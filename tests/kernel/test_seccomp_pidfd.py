"""kernel/pidfd.py on the real kernel: pidfds, fd copies, signals, remote reads."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys

import pytest

from kernel.pidfd import RemoteReader, pidfd_getfd, pidfd_open, pidfd_send_signal, read_memory

pytestmark = pytest.mark.kernel


def test_getfd_copies_the_targets_file() -> None:
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             pass_fds=(w,))
    os.close(w)
    try:
        pidfd = pidfd_open(child.pid)
        try:
            copy = pidfd_getfd(pidfd, w)        # the child's write end
            os.write(copy, b"via the child's fd")
            os.close(copy)
            assert os.read(r, 100) == b"via the child's fd"
            with pytest.raises(OSError) as exc:
                pidfd_getfd(pidfd, 999)
            assert exc.value.errno == errno.EBADF
            with pytest.raises(OSError) as exc:
                pidfd_getfd(pidfd, -1)
            assert exc.value.errno == errno.EBADF
            pidfd_send_signal(pidfd, signal.SIGKILL)
            assert child.wait(10) == -signal.SIGKILL
            with pytest.raises(OSError) as exc:
                pidfd_getfd(pidfd, 0)           # the process is gone
            assert exc.value.errno == errno.ESRCH
        finally:
            os.close(pidfd)
    finally:
        child.kill()
        child.wait()
        os.close(r)


def test_remote_reads() -> None:
    buf = ctypes.create_string_buffer(b"sockaddr bytes", 14)
    addr = ctypes.addressof(buf)
    assert read_memory(os.getpid(), addr, 14) == b"sockaddr bytes"
    reader = RemoteReader(16)
    assert reader.read(os.getpid(), addr, 8) == b"sockaddr"
    for bad_addr, length, err in [(0, 8, errno.EFAULT), (addr, 17, errno.EINVAL),
                                  (-1, 8, errno.EINVAL)]:
        with pytest.raises(OSError) as exc:
            reader.read(os.getpid(), bad_addr, length)
        assert exc.value.errno == err
    with pytest.raises(OSError) as exc:
        pidfd_open(2**22 + 12345)  # above pid_max: no such process
    assert exc.value.errno in (errno.ESRCH, errno.EINVAL)
