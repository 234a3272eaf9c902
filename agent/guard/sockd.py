"""Forwarding socket() notifications to each sliver's sockd (F38, kernel/native/sockd.h).

The guard filter notifies socket() of AF_INET, AF_INET6 and AF_NETLINK; the agent
sends the notification as received over the sliver's sockd request socket, and
sockd (which holds a copy of the listener) makes the socket in the node's network
namespace and answers the kernel itself.

If sockd dies (the OOM killer of the sliver's memory cgroup may take it: it is
charged to the slice), the notifications it had received or had still queued are
never answered and their callers would wait in socket() forever: the agent holds
the listener, so the kernel does not fail them. `watch` sees the request socket
hang up and answers every forwarded id with EAFNOSUPPORT (an id sockd did answer
is gone from the kernel: ENOENT, ignored); later socket() calls are refused at once.
"""
from __future__ import annotations

import errno
import socket

import trio

from agent.guard.decide import Denied, Outcome
from kernel import seccomp

#: The answer to a socket() notification handed to the sliver's sockd: no reply.
FORWARDED = Outcome(0, "made by sockd")
#: Forwarded ids kept per sliver before the answered ones are dropped.
PRUNE_AT = 256


class SockdLinks:
    """Each sliver's sockd request socket and the ids forwarded on it."""

    def __init__(self) -> None:
        self.chans: dict[str, socket.socket] = {}
        self._sent: dict[str, set[int]] = {}
        self.failed = 0   # callers answered for a sockd that died

    def set(self, slice_name: str, fd: int) -> None:
        """The sliver's sockd request socket; takes `fd`."""
        self.release(slice_name)
        self.chans[slice_name] = socket.socket(fileno=fd)
        self._sent[slice_name] = set()

    def forward(self, slice_name: str, listener: int, n: seccomp.Notification) -> Outcome:
        """Hand `n` to the sliver's sockd. A full queue (sockd frozen or slow) is
        ENOBUFS, which socket(2) may say; no sockd is EAFNOSUPPORT."""
        chan = self.chans.get(slice_name)
        if chan is None:
            raise Denied(errno.EAFNOSUPPORT, "no sockd for this sliver")
        sent = self._sent[slice_name]
        if len(sent) >= PRUNE_AT:   # answered ids are not valid any more
            sent.intersection_update([i for i in sent if seccomp.notif_id_valid(listener, i)])
        raw = seccomp.NOTIF.pack(n.id, n.pid, n.flags, n.nr, n.arch,
                                 n.instruction_pointer, *n.args)
        sent.add(n.id)   # before the send: sockd may die as soon as it has it
        try:
            chan.send(raw, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent.discard(n.id)
            raise Denied(errno.ENOBUFS, "sockd's queue is full") from None
        except OSError as exc:
            sent.discard(n.id)
            raise Denied(errno.EAFNOSUPPORT, f"sockd gone: {exc.strerror}") from None
        return FORWARDED

    async def watch(self, slice_name: str, listener: int) -> None:
        """Until cancelled: when the sliver's sockd goes, answer what it left."""
        chan = self.chans.get(slice_name)
        if chan is None:
            return
        try:
            await trio.lowlevel.wait_readable(chan)   # sockd never writes: a hangup
        except trio.ClosedResourceError:
            return   # released meanwhile
        if self.chans.get(slice_name) is not chan:
            return
        for nid in self._sent.get(slice_name, ()):
            try:
                seccomp.notif_send(listener, nid, 0, errno.EAFNOSUPPORT)
                self.failed += 1
            except OSError:
                pass   # ENOENT: answered by sockd, or the caller left
        self.release(slice_name)

    def release(self, slice_name: str) -> None:
        """Forget the sliver's request socket (closing it)."""
        self._sent.pop(slice_name, None)
        chan = self.chans.pop(slice_name, None)
        if chan is None:
            return
        try:
            trio.lowlevel.notify_closing(chan)
        except RuntimeError:
            pass   # outside trio: nobody waits on it
        chan.close()
