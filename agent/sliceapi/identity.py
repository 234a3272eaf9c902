"""Who calls the slice API: read from the connection (SO_PEERCRED), never from the
arguments. A process whose uid lies in a sliver's uid range is that sliver; host root is
the node admin; a slice's host account (login shell: the agent's vsh) is its slice; a
controller slice's account (login shell: the forwarder) is that controller; any other
host user is "host", which may make only the calls open to anyone."""

from __future__ import annotations

import pwd
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    kind: str          # "sliver" | "admin" | "host"
    name: str          # slice name, "root", or "uid:<n>"
    pid: int
    uid: int


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def identify(pid: int, uid: int, ranges: dict[str, int], pool_start: int,
             range_size: int, account_shell: str | None = None,
             controller_shell: str | None = None,
             controllers: Callable[[], set[str]] = set) -> Caller:
    """A caller from its credentials: a sliver by uid range; a slice's host account
    (a local user named after a sliver whose login shell is the agent's vsh); a
    controller slice's account (named after a controller record, whose login shell is
    the agent's forwarder); root; or any other host user."""
    if uid >= pool_start:
        idx = (uid - pool_start) // range_size
        for name, i in ranges.items():
            if i == idx:
                return Caller("sliver", name, pid, uid)
    if uid == 0:
        return Caller("admin", "root", pid, uid)
    if account_shell:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            pw = None
        if pw is not None and pw.pw_shell == account_shell and pw.pw_name in ranges:
            return Caller("account", pw.pw_name, pid, uid)
        if pw is not None and controller_shell and pw.pw_shell == controller_shell and \
                pw.pw_name in controllers():
            return Caller("controller", pw.pw_name, pid, uid)
    return Caller("host", f"uid:{uid}", pid, uid)
