"""The guard's bind fast path: kernel/bin/libguardfast.so through ctypes.

The library answers, in C, the bind notifications whose exact key (socket family,
type, protocol and sockaddr bytes) the caller has allowed before with `allow` (or
refused, with `deny`: answered with that errno); it hands everything else back (see kernel/native/lib/guardfast.c). It holds no policy: the
caller decides every new key and empties the memo (`forget`) whenever its policy
changes.

Loaded with `ctypes.PyDLL`: calls keep the interpreter lock, which costs less than
dropping and retaking it per call and cannot stall behind a busy Python thread; the
functions never block (the listener is polled with a zero timeout).
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import Any, NamedTuple

LIBRARY = Path(__file__).resolve().parent / "bin" / "libguardfast.so"

IDLE, PYTHON, GONE, YIELD, RECV_ERR, SEND_ERR = range(6)
ADDR_MAX = 128
PIDFDS_KEPT = 8   # GF_PIDFDS: caller thread pidfds the library keeps per listener


class _Lib:
    def __init__(self, path: Path) -> None:
        lib = ctypes.PyDLL(str(path))
        p, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
        self.new = _fn(lib.gf_new, p, [i, p, p, i])
        self.drop_pidfd = _fn(lib.gf_drop_pidfd, i, [p, i])
        self.free = _fn(lib.gf_free, None, [p])
        self.forget = _fn(lib.gf_forget, None, [p])
        self.errno = _fn(lib.gf_errno, i, [p])
        self.remember = _fn(lib.gf_remember, i, [p, i, i, i, ctypes.c_char_p, u, i])
        self.refused = _fn(lib.gf_refused, ctypes.c_long, [p])
        self.run = _fn(lib.gf_run, ctypes.c_long, [p, i])


def _fn(f: Any, restype: object, argtypes: list[object]) -> Any:
    f.restype = restype
    f.argtypes = argtypes
    return f


_lib: _Lib | None = None
_load_error: str | None = None


def load() -> _Lib | None:
    """The library, or None (then `load_error()` says why) if it is not built."""
    global _lib, _load_error
    if _lib is None and _load_error is None:
        try:
            _lib = _Lib(LIBRARY)
        except OSError as exc:
            _load_error = str(exc)
    return _lib


def load_error() -> str | None:
    return _load_error


class RunResult(NamedTuple):
    status: int     # IDLE, PYTHON, GONE, YIELD, RECV_ERR or SEND_ERR
    answered: int   # notifications answered by the library in this call


class FastPath:
    """The fast path of one listener.

    `out` (a bytearray of at least one `struct seccomp_notif`) receives a notification
    the library hands back (status PYTHON); `slot`, if given, is the journal slot each
    notification is copied into before it is handled. Both are pinned (not resizable)
    until `close`. The pidfd the library keeps (of the last caller thread) is added to
    the epoll set `exits` if given, and closed by `drop_pidfd` once it turns readable
    (its thread exited); without `exits` no pidfd is kept. Not for concurrent use.
    """

    def __init__(self, listener: int, out: bytearray, slot: mmap.mmap | None = None,
                 exits: int = -1) -> None:
        lib = load()
        if lib is None:
            raise OSError(f"{LIBRARY}: {_load_error}")
        self._lib = lib
        self._pins: list[ctypes.Array[ctypes.c_char]] = []
        out_pin = (ctypes.c_char * len(out)).from_buffer(out)
        self._pins.append(out_pin)
        slot_addr = None
        if slot is not None:
            slot_pin = (ctypes.c_char * len(slot)).from_buffer(slot)
            self._pins.append(slot_pin)
            slot_addr = ctypes.addressof(slot_pin)
        handle = lib.new(listener, slot_addr, ctypes.addressof(out_pin), exits)
        if not handle:
            self._pins.clear()
            raise MemoryError("gf_new")
        self._handle: int | None = handle
        self._run = lib.run

    def run(self, budget: int) -> RunResult:
        r = self._run(self._handle, budget)
        return RunResult(r & 7, r >> 3)

    def allow(self, family: int, stype: int, proto: int, raw: bytes) -> None:
        """Answer binds of exactly `raw` on sockets of (family, stype, proto) in C."""
        self.remember(family, stype, proto, raw, 0)

    def deny(self, family: int, stype: int, proto: int, raw: bytes, err: int) -> None:
        """Refuse binds of exactly `raw` on sockets of (family, stype, proto) with
        errno `err` in C (the caller refused that key under its current policy)."""
        if err > 0:
            self.remember(family, stype, proto, raw, err)

    def remember(self, family: int, stype: int, proto: int, raw: bytes, answer: int) -> None:
        if 0 < len(raw) <= ADDR_MAX:
            self._lib.remember(self._handle, family, stype, proto, raw, len(raw), answer)

    def refused(self) -> int:
        """How many requests the library has refused from its memo, in all."""
        return int(self._lib.refused(self._handle))

    def drop_pidfd(self, pidfd: int) -> bool:
        """Close the kept pidfd if it is `pidfd`; whether it was."""
        return bool(self._lib.drop_pidfd(self._handle, pidfd))

    def forget(self) -> None:
        """Empty the memo: every key goes back to the caller once more."""
        self._lib.forget(self._handle)

    def errno(self) -> int:
        return int(self._lib.errno(self._handle))

    def close(self) -> None:
        """Free the library's state (and its cached pidfd) and unpin the buffers.
        The listener stays open: it is the caller's."""
        if self._handle is not None:
            self._lib.free(self._handle)
            self._handle = None
        self._pins.clear()
