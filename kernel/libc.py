"""The C library, loaded once, and the one errno check every kernel/ wrapper uses.

    from kernel.libc import LIBC, NR_BPF, check, function

    fd = check(LIBC.syscall(ctypes.c_long(NR_BPF), ...), "bpf(BPF_PROG_LOAD)", path)

`check(ret, what, subject)` raises OSError(errno, "what: strerror", subject) when
`ret` is negative (the C convention: -1 and errno), else returns `ret`; `error()`
builds that exception for wrappers that must look at errno first.

`LIBC` is shared: never set `argtypes`/`restype` on its attributes (another module
may use the same function differently). `function()` returns a private, typed
function pointer; with argument types it is a fixed-arity prototype that converts
plain ints without building a ctypes object per argument (the guard's hot path
uses those). `LIBC.syscall` alone has a restype set here: c_long, the only right one.

Syscall numbers: x86-64 (arch/x86/entry/syscalls/syscall_64.tbl); numbers from 424
on are the same on every architecture. tests/kernel/test_libc.py checks each one
against <asm/unistd_64.h>.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long

# x86-64 syscall numbers.
NR_GETPID = 39
NR_SOCKET = 41
NR_CONNECT = 42
NR_BIND = 49
NR_SOCKETPAIR = 53
NR_SETSOCKOPT = 54
NR_CLONE = 56
NR_ADD_KEY = 248
NR_REQUEST_KEY = 249
NR_KEYCTL = 250
NR_USTAT = 136
NR_STATFS = 137
NR_FSTATFS = 138
NR_UNSHARE = 272
NR_SECCOMP = 317
NR_BPF = 321
NR_STATX = 332
NR_PIDFD_SEND_SIGNAL = 424
NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
NR_IO_URING_REGISTER = 427
NR_OPEN_TREE = 428
NR_MOVE_MOUNT = 429
NR_FSOPEN = 430
NR_FSCONFIG = 431
NR_FSMOUNT = 432
NR_PIDFD_OPEN = 434
NR_CLONE3 = 435
NR_OPENAT2 = 437
NR_PIDFD_GETFD = 438
NR_MOUNT_SETATTR = 442
NR_LANDLOCK_CREATE_RULESET = 444
NR_LANDLOCK_ADD_RULE = 445
NR_LANDLOCK_RESTRICT_SELF = 446

PR_SET_NO_NEW_PRIVS = 38


def error(what: str, subject: object = None, err: int | None = None,
          exc: type[OSError] = OSError) -> OSError:
    """OSError(errno, "what: strerror", subject) for the calling thread's errno
    (or `err`); `exc` may be an OSError subclass."""
    if err is None:
        err = ctypes.get_errno()
    return exc(err, f"{what}: {os.strerror(err)}", subject)


def check(ret: int, what: str, subject: object = None,
          exc: type[OSError] = OSError) -> int:
    """`ret` if it is not negative, else raise `error(what, subject)`."""
    if ret < 0:
        raise error(what, subject, exc=exc)
    return ret


def function(name: str, restype: Any, *argtypes: Any) -> Any:
    """A private function pointer to libc's `name` (errno saved for `check`).

    With `argtypes`: a fixed prototype (plain ints convert cheaply). Without: the
    arguments are passed as given (ctypes objects or ints), like `LIBC.name`.
    """
    if argtypes:
        return ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)((name, LIBC))
    fn = LIBC[name]
    fn.restype = restype
    return fn
