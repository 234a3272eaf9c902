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


PAGE = 4096


def read_cstring(pid: int, address: int, limit: int) -> bytes:
    """The NUL-terminated string at `address` of `pid`, without its NUL, read page by
    page (a string may end just before an unmapped page). OSError(EFAULT) if a byte
    before the NUL is unreadable, OSError(ENAMETOOLONG) if there is no NUL in the
    first `limit` bytes (what the kernel says of a path longer than PATH_MAX)."""
    got = bytearray()
    while len(got) < limit:
        chunk = min(limit - len(got), PAGE - (address + len(got)) % PAGE)
        part = read_memory(pid, address + len(got), chunk)
        end = part.find(b"\0")
        if end >= 0:
            return bytes(got + part[:end])
        got += part
    raise OSError(36, f"no NUL in {limit} bytes", pid)


def open_memory(tid: int) -> int:
    """/proc/TID/mem, open for writing: the fd pins the thread's address space, so a
    write through it never lands in a process that later reuses the number. Check
    the thread is still the one expected after this (seccomp's NOTIF_ID_VALID).
    Writes through it use FOLL_FORCE: see `writable`."""
    return os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)


def writable(maps_fd: int, address: int, length: int, limit: int = 1 << 18) -> bool | None:
    """Is [address, address+length) mapped writable, per /proc/TID/maps open as
    `maps_fd` (at offset 0)? None if the first `limit` bytes of the file do not say
    (a process with thousands of mappings). /proc/TID/mem writes (FOLL_FORCE) also
    reach private read-only mappings, where the thread's own write would fault:
    check this first."""
    end, want, done, tail = address + length, address, 0, b""
    while done < limit:
        chunk = os.read(maps_fd, 65536)   # seq_file: about a page per read
        if not chunk:
            return False   # the whole file read: not mapped
        done += len(chunk)
        *lines, tail = (tail + chunk).split(b"\n")
        for line in lines:
            fields = line.split(b" ", 2)
            lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
            if hi <= want:
                continue
            if lo > want or fields[1][1:2] != b"w":
                return False
            want = hi
            if want >= end:
                return True
    return None
