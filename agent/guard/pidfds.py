"""The guard's cache of its callers' thread pidfds (F22).

One cache for the whole guard, keyed by (slice, tid), least recently used first and
capped at PIDFD_CACHE. A pidfd names one task for its whole life: a cached one is
either that task or dead, never a reused tid. Each cached pidfd is also in an epoll
set (`exits_fd`) in which a pidfd turns readable when its thread exits; `reap` then
closes it.
"""

from __future__ import annotations

import errno
import os
import select
from collections import OrderedDict
from collections.abc import Callable

from agent.guard.decide import Denied
from kernel.pidfd import pidfd_getfd, pidfd_open

PIDFD_THREAD = os.O_EXCL  # pidfd of a thread, not only of a thread-group leader (6.9+)
PIDFD_CACHE = 1024  # cached caller pidfds, all slices together (LRU; F22)


class PidfdCache:
    """Caller pidfds by (slice, tid); see the module docstring."""

    def __init__(self, other: Callable[[int], bool] = lambda pidfd: False) -> None:
        """`other(pidfd)`: close a ready pidfd of the epoll set that is not in the
        cache (one the C fast path added); returns whether it knew it."""
        self._other = other
        self.cached: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._exits = select.epoll()
        self._exit_keys: dict[int, tuple[str, int]] = {}  # pidfd -> its cache key

    def exits_fd(self) -> int:
        """The epoll set of exit watches (the C fast path adds its own pidfds to it)."""
        return self._exits.fileno()

    def getfd(self, slice_name: str, tid: int, fdnum: int) -> int:
        """A copy of fd `fdnum` of thread `tid`, through a cached pidfd when possible."""
        key = (slice_name, tid)
        pidfd = self.cached.get(key, -1)
        if pidfd >= 0:
            try:
                fd = pidfd_getfd(pidfd, fdnum)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                self.drop(key)  # that task died (the tid is someone new's)
            else:
                self.cached.move_to_end(key)
                return fd
        self.reap()  # a new thread: close those of threads gone meanwhile
        try:
            pidfd = pidfd_open(tid, PIDFD_THREAD)
        except OSError as exc:
            raise Denied(errno.ESRCH, f"caller {tid} gone") from exc
        try:
            fd = pidfd_getfd(pidfd, fdnum)
        except OSError:
            os.close(pidfd)
            raise
        while len(self.cached) >= PIDFD_CACHE:
            self.drop(next(iter(self.cached)))
        try:
            self._exits.register(pidfd, select.EPOLLIN)
        except OSError:  # not watchable: do not keep it
            os.close(pidfd)
            return fd
        self.cached[key] = pidfd
        self._exit_keys[pidfd] = key
        return fd

    def drop(self, key: tuple[str, int]) -> None:
        """Close the cached pidfd of `key` (closing also removes it from the epoll set)."""
        pidfd = self.cached.pop(key, -1)
        if pidfd >= 0:
            del self._exit_keys[pidfd]
            os.close(pidfd)

    def forget(self, slice_name: str) -> None:
        """Close every cached pidfd of `slice_name`'s threads."""
        for key in [k for k in self.cached if k[0] == slice_name]:
            self.drop(key)

    def reap(self) -> int:
        """Close the cached pidfds whose threads have exited; how many were closed."""
        closed = 0
        while True:
            ready = self._exits.poll(0, 256)
            for pidfd, _ in ready:
                key = self._exit_keys.get(pidfd)
                if key is not None:
                    self.drop(key)
                    closed += 1
                elif self._other(pidfd):
                    closed += 1   # the one a fast path kept (closing unregisters it)
                else:   # nobody's (cannot happen): never leave it readable in the set
                    try:
                        self._exits.unregister(pidfd)
                    except (OSError, ValueError):
                        pass
            if len(ready) < 256:
                return closed
