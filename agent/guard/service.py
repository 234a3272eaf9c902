"""The guard as one service of the agent (`GuardService`, docs/guard.md): the wiring
of the port table, its store and host ports, the supervisor, the raw sockets and
the slice API calls; and how a sliver's seccomp listener reaches the supervisor.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from agent.config import defaults
from agent.guard.api import GuardAPI
from agent.guard.statfs import sliver_disks
from agent.guard.supervisor import Guard
from agent.ports.host import HostPorts, state_uid_owner
from agent.ports.store import PortService, StatePortStore
from agent.ports.table import Key, PortTable, parse_ports_tag, read_ephemeral_range
from agent.rawsock.service import RawSockets
from kernel import seccomp
from kernel.cgroups import PARENT, SliverCgroup, detect_layout
from kernel.libc import NR_BIND, NR_FSTATFS, NR_STATFS
from kernel.pidfd import pidfd_getfd, pidfd_open

log = logging.getLogger("agent.guard")


def listener_of(init_pid: int) -> int:
    """Take a copy of the seccomp listener the sliver's init keeps (after a restart).

    The init's fd table is searched for the one fd that is a seccomp notify file.
    """
    fds = []
    for name in os.listdir(f"/proc/{init_pid}/fd"):
        try:
            if os.readlink(f"/proc/{init_pid}/fd/{name}") == "anon_inode:seccomp notify":
                fds.append(int(name))
        except OSError:
            continue
    if len(fds) != 1:
        raise LookupError(f"init {init_pid} holds {len(fds)} seccomp listeners, expected 1")
    pidfd = pidfd_open(init_pid)
    try:
        return pidfd_getfd(pidfd, fds[0])
    finally:
        os.close(pidfd)


def recv_guard_fds(sock: socket.socket, timeout: float = 10.0) -> tuple[int, int | None]:
    """(listener, sockd request socket or None) a sliver init sent over its
    GuardSpec.listener_sink (SCM_RIGHTS; docs/guard.md, F38).

    The init sends them before it reports ready, so after Context.create this does not
    wait; `timeout` bounds a broken init.
    """
    sock.settimeout(timeout)
    msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
    if len(fds) not in (1, 2):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, f"expected one seccomp listener, got {len(fds)} fds ({msg!r})")
    if os.readlink(f"/proc/self/fd/{fds[0]}") != "anon_inode:seccomp notify" or (
            len(fds) == 2 and not os.readlink(f"/proc/self/fd/{fds[1]}").startswith("socket:")):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, "the fds received are not a seccomp listener (and a socket)")
    return fds[0], (fds[1] if len(fds) == 2 else None)


def recv_listener(sock: socket.socket, timeout: float = 10.0) -> int:
    """The listener alone (`recv_guard_fds`; a sockd request socket is closed)."""
    listener, chan = recv_guard_fds(sock, timeout)
    if chan is not None:
        os.close(chan)
    return listener


#: Where a sliver init keeps the agent's end of its sockd's request socket.
SOCKD_FD = 5


def sockd_of(init_pid: int) -> int | None:
    """A copy of the sockd request socket the sliver's init keeps (after a restart),
    or None for an init without one."""
    try:
        if not os.readlink(f"/proc/{init_pid}/fd/{SOCKD_FD}").startswith("socket:"):
            return None
    except FileNotFoundError:
        return None
    pidfd = pidfd_open(init_pid)
    try:
        return pidfd_getfd(pidfd, SOCKD_FD)
    finally:
        os.close(pidfd)



async def serve_guard(guard: Guard, listeners: trio.MemoryReceiveChannel[tuple[str, int]], *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The agent's guard service: supervise every (slice, listener fd) received.

    Runs until cancelled (or the channel closes and every listener is done).
    """
    async with trio.open_nursery() as outer:
        outer.start_soon(guard.watch_exits, name="guard:pidfd-exits")
        await outer.start(guard.revoker, name="guard:revoker")
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for slice_name, fd in listeners:
                nursery.start_soon(_supervise_logged, guard, slice_name, fd,
                                   name=f"guard:{slice_name}")
        outer.cancel_scope.cancel()


async def _supervise_logged(guard: Guard, slice_name: str, fd: int) -> None:
    """One listener's task: a failure ends that supervision only, never the service."""
    try:
        await guard.supervise(slice_name, fd)
    except Exception:
        log.exception("guard: %s: supervisor failed; the sliver's guarded calls now wait "
                      "until it is adopted again", slice_name)


def sliver_cgroups(parent: str | None = None) -> Callable[[str], list[Path]]:
    """`cgroups` for Guard: a sliver's cgroup directories (one per hierarchy, those
    that exist) under the node-wide `parent` (None: kernel.cgroups' default)."""
    layout = detect_layout()

    def cgroups(name: str) -> list[Path]:
        return [d for d in SliverCgroup(layout, name, parent or PARENT).dirs() if d.is_dir()]
    return cgroups




def state_uid_range(state: Any, pool_start: int | None = None,
                    range_size: int | None = None) -> Callable[[str], tuple[int, int] | None]:
    """A slice's uids from the agent state's uid range index and the agent's
    uid_pool_start and uid_range_size (the config keys' defaults where not given),
    as agent.accounts computes them."""
    if pool_start is None or range_size is None:
        cfg = defaults()
        pool_start = cfg.uid_pool_start if pool_start is None else pool_start
        range_size = cfg.uid_range_size if range_size is None else range_size
    start, size = pool_start, range_size

    def uid_range(name: str) -> tuple[int, int] | None:
        idx = state.uid_range_of(name)
        if idx is None:
            return None
        return start + idx * size, size
    return uid_range


class GuardService:
    """Everything the agent needs from the guard, in one object (docs/guard.md).

    `serve` is the service task; the other methods are called by the reconciler and
    the slice API, from the trio thread.
    """

    def __init__(self, state: Any, addresses: list[str], run_dir: Path,
                 ephemeral: tuple[int, int] | None = None,
                 reserved_ports: str | None = None,
                 uid_range: Callable[[str], tuple[int, int] | None] | None = None,
                 host_ports: Any = None,
                 cgroup_parent: str | None = None,
                 roots_dir: Path | None = None) -> None:
        """`host_ports`: an `agent.ports.HostPorts` (F30; None: none when `state`
        is None, else one from the state's uid ranges). `reserved_ports`: host ports
        no slice may own, in the ports tag syntax (agent config key `reserved_ports`;
        None: that key's default). `uid_range`: a slice's host uids (first, count), see
        `Guard`; None: from the state's uid_ranges table and the config keys' defaults
        (`state_uid_range`). `cgroup_parent`: where the slivers' cgroups are (config
        key; None: the default), to find a sliver's processes (`cgroup_members`).
        `roots_dir`: where the slivers' roots and disk layers are (the backend's
        <state_dir>/roots), for statfs answers with each sliver's disk_max."""
        if reserved_ports is None:
            reserved_ports = defaults().reserved_ports
        if host_ports is None and state is not None:
            host_ports = HostPorts(state_uid_owner(state, defaults().uid_pool_start,
                                                   defaults().uid_range_size))
        fixed = [r for r, _ in host_ports.fixed] if host_ports is not None else []
        table = PortTable(addresses, ephemeral or read_ephemeral_range(),
                          parse_ports_tag(reserved_ports) + fixed)
        self.ports = PortService(table, StatePortStore(state) if state is not None else None)
        self.ports.host = host_ports
        if uid_range is None and state is not None:
            uid_range = state_uid_range(state)
        self.guard = Guard(self.ports, Path(run_dir) / "guard", uid_range,
                           sliver_cgroups(cgroup_parent),
                           sliver_disks(roots_dir) if roots_dir is not None else None)
        self.raw = RawSockets(lambda: self.ports.table, host_ports)
        self.ports.on_lost.append(self.raw.ports_lost)
        self.api = GuardAPI(self.guard, self.raw)
        self._send, self._recv = trio.open_memory_channel[tuple[str, int]](1024)

    @staticmethod
    def filter() -> bytes:
        """The filter bytes for `kernel.context.GuardSpec.filter`: binds, and statfs
        and fstatfs (`agent.guard.statfs`), notified; socket() through sockd."""
        return seccomp.guard_filter(notify=(NR_BIND, NR_STATFS, NR_FSTATFS), sockd=True)

    def sliver_created(self, name: str, agent_end: socket.socket) -> None:
        """After Context.create(..., guard=GuardSpec(filter(), sink)): take the listener
        from the other end of the sink and start supervising it."""
        listener, chan = recv_guard_fds(agent_end)
        if chan is not None:
            self.guard.set_sockd(name, chan)
        self._send.send_nowait((name, listener))

    def sliver_adopted(self, name: str, init_pid: int) -> None:
        """After an agent restart: supervise the listener the sliver's init kept."""
        chan = sockd_of(init_pid)
        if chan is not None:
            self.guard.set_sockd(name, chan)
        self._send.send_nowait((name, listener_of(init_pid)))

    def set_tag_ports(self, name: str, tag_value: str,
                      without: frozenset[Key] | set[Key] = frozenset()) -> None:
        """The slice's `ports` tag less the keys `without` (raises PortError/PortConflict,
        changing nothing)."""
        self.ports.set_tag_ports(name, tag_value, without)

    def sliver_destroyed(self, name: str) -> None:
        self.guard.release_sliver(name)

    def methods(self) -> dict[str, Callable[..., Any]]:
        return self.api.methods()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.raw.run)
            await nursery.start(serve_guard, self.guard, self._recv)
            task_status.started()
