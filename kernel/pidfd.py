"""pidfd_open(2), pidfd_getfd(2), pidfd_send_signal(2) and process_vm_readv(2).

Thin wrappers: each raises OSError(errno, "call: reason", subject) on failure.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct

from kernel.libc import (
    LIBC,
    NR_PIDFD_GETFD,
    NR_PIDFD_OPEN,
    NR_PIDFD_SEND_SIGNAL,
    check,
    error,
    function,
)

PIDFD_NONBLOCK = os.O_NONBLOCK


# A fixed-arity prototype of syscall(2): converting plain ints is much cheaper than
# wrapping each argument in c_long (this is on the guard's per-notification path).
_syscall3 = function("syscall", ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                     ctypes.c_long)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd for `pid` (close-on-exec). The pid must be a thread-group leader."""
    return check(_syscall3(NR_PIDFD_OPEN, pid, flags, 0), "pidfd_open", pid)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A close-on-exec duplicate, in this process, of fd `targetfd` of the process.

    Needs PTRACE_MODE_ATTACH_REALCREDS over the target (root has it).
    """
    if not 0 <= targetfd < 2**31:
        raise OSError(9, f"pidfd_getfd: bad fd number {targetfd}", targetfd)
    fd: int = _syscall3(NR_PIDFD_GETFD, pidfd, targetfd, 0)
    return fd if fd >= 0 else check(fd, "pidfd_getfd", targetfd)


def pidfd_send_signal(pidfd: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the process of `pidfd` (no pid-reuse race)."""
    check(LIBC.syscall(ctypes.c_long(NR_PIDFD_SEND_SIGNAL), ctypes.c_long(pidfd),
                         ctypes.c_long(sig), None, ctypes.c_long(0)),
           "pidfd_send_signal", pidfd)


# process_vm_readv(2) with plain integer arguments (addresses of preallocated iovecs).
_process_vm_readv = function("process_vm_readv", ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)


def read_memory(pid: int, address: int, length: int) -> bytes:
    """`length` bytes at `address` in process `pid` (process_vm_readv).

    Raises OSError(EFAULT) if the range is not fully readable; never returns a
    short read.
    """
    if length < 0 or address < 0 or address + length > 2**64:
        raise OSError(22, f"process_vm_readv: bad range {address:#x}+{length}", pid)
    buf = ctypes.create_string_buffer(length)
    local = _IOVec(ctypes.addressof(buf), length)
    remote = _IOVec(address, length)
    got = check(_process_vm_readv(pid, ctypes.addressof(local), 1, ctypes.addressof(remote), 1,
                                  0), "process_vm_readv", pid)
    if got != length:
        raise OSError(14, f"process_vm_readv: short read {got}/{length}", pid)
    return buf.raw


_IOVECS = struct.Struct("<QQQQ")  # local iovec, remote iovec


class RemoteReader:
    """process_vm_readv into one preallocated buffer: the guard's fast path.

    The two iovecs live in one preallocated buffer too, filled with one pack_into,
    and the syscall is called through a fixed prototype with plain ints (no ctypes
    objects built per call). Not for concurrent use (one per trio loop is right:
    calls never overlap).
    """

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._iov = bytearray(_IOVECS.size)
        # The exported ctypes views pin both bytearrays (they cannot be resized or
        # moved while these exist).
        self._pins = (ctypes.c_char.from_buffer(self._buf), ctypes.c_char.from_buffer(self._iov))
        self._buf_addr = ctypes.addressof(self._pins[0])
        self._iov_addr = ctypes.addressof(self._pins[1])

    def read(self, pid: int, address: int, length: int) -> bytes:
        """`length` (<= size) bytes at `address` of `pid`; OSError(EFAULT) if short."""
        if not 0 <= length <= self.size or not 0 <= address < 2**64:
            raise OSError(22, f"process_vm_readv: bad range {address:#x}+{length}", pid)
        iov = self._iov_addr
        _IOVECS.pack_into(self._iov, 0, self._buf_addr, length, address, length)
        got = _process_vm_readv(pid, iov, 1, iov + 16, 1, 0)
        if got != length:
            if got < 0:
                raise error("process_vm_readv", pid)
            raise OSError(14, f"process_vm_readv: short read {got}/{length}", pid)
        return bytes(self._view[:length])
