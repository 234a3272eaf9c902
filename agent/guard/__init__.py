"""The guard: answers the seccomp user notifications of every sliver.

Each sliver's init installs `kernel.seccomp.guard_filter()` before its first child
and hands the listener fd to the agent. `serve_guard` runs one task per listener in
the agent's trio loop. Only bind(2) is notified; for it the guard

1. takes a copy of the caller's socket (pidfd_getfd) and reads the sockaddr from the
   caller's memory (process_vm_readv) into the agent's own buffer;
2. checks the caller is still waiting (SECCOMP_IOCTL_NOTIF_ID_VALID);
3. decides: IP sockets by the port table (`agent.ports`), others by family;
4. performs the bind itself on its copy with its own buffer, and replies with the
   result. It never answers CONTINUE, so a thread of the caller that rewrites the
   sockaddr (or swaps the fd) after the check cannot change what is bound.

IP binds run as the agent (root), so an owned port below 1024 works for a sliver
whose root is not the node's. Abstract Unix addresses and netlink sockets without
multicast groups are bound by the agent directly (no privilege is involved); every
other bind (Unix socket paths, netlink groups, other families) runs in the helper
`kernel/bin/guard-bindas`, which takes on the caller's namespaces, root, cwd and
credentials first.

Restarts: before handling a notification its id and registers are written to a small
journal file per listener (`<run_dir>/<slice>.inflight`); a new supervisor that picks
the listener up (from the sliver's init, with pidfd_getfd) redoes a journaled request
whose caller still waits. A bind that the dead supervisor had already done is
recognised (the socket is bound to the requested address) and answered 0.

A malformed or hostile request is denied (EPERM if nothing better fits); nothing a
caller sends can stop the loop.

Fast path: the same sequence of syscalls costs more from Python than the decision
does, so once the guard has allowed and performed an IP bind, it hands that exact key
(socket family, type, protocol, sockaddr bytes) to `kernel.guardfast` (a small C
library called in this loop), which answers later binds of the same key itself, doing
the same steps 1-4 with its own copy of the bytes. It holds no policy: every other
request comes back here, and its memo is emptied whenever the port table changes.

Modules (docs/guard.md "Module map"): `supervisor` (the bind path and the loop),
`decide` (the pure decisions), `pidfds`, `journal`, `fast`, `revoke`, `stats`
(its parts), `api` (the slice API calls), `service` (`GuardService`, the wiring).
The port table and its store are in `agent.ports`, the raw sockets in `agent.rawsock`.
"""

from agent.guard.api import GuardAPI
from agent.guard.decide import (
    ABSTRACT_PREFIX,
    SLICE_CPU_BURST,
    SLICE_CPU_SHARE,
    SOCKADDR_MAX,
    CpuBudget,
    Denied,
    IPDecision,
    Outcome,
    abstract_prefix,
    ip_decision,
    parse_ip_sockaddr,
)
from agent.guard.journal import JOURNAL_SIZE, JOURNAL_V1
from agent.guard.pidfds import PIDFD_CACHE, PIDFD_THREAD
from agent.guard.revoke import REVOKE_BUDGET, cgroup_pids
from agent.guard.service import (
    GuardService,
    listener_of,
    recv_guard_fds,
    recv_listener,
    serve_guard,
    sliver_cgroups,
    sockd_of,
    state_uid_range,
)
from agent.guard.stats import GuardStats
from agent.guard.supervisor import BATCH, BINDAS, BINDAS_CHARGE, BINDAS_TIMEOUT, Guard
from agent.ports import PortConflict, PortError, PortService, PortStore, StatePortStore

__all__ = [
    "ABSTRACT_PREFIX", "BATCH", "BINDAS", "BINDAS_CHARGE", "BINDAS_TIMEOUT", "JOURNAL_SIZE",
    "JOURNAL_V1", "PIDFD_CACHE", "PIDFD_THREAD", "REVOKE_BUDGET", "SLICE_CPU_BURST",
    "SLICE_CPU_SHARE", "SOCKADDR_MAX", "CpuBudget", "Denied", "Guard", "GuardAPI",
    "GuardService", "GuardStats", "IPDecision", "Outcome", "PortConflict", "PortError",
    "PortService", "PortStore", "StatePortStore", "abstract_prefix", "cgroup_pids",
    "ip_decision", "listener_of", "parse_ip_sockaddr", "recv_guard_fds", "recv_listener", "serve_guard", "sockd_of",
    "sliver_cgroups", "state_uid_range",
]
