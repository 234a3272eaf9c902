"""Landlock (landlock_create_ruleset/add_rule/restrict_self) for sliver scoping.

A sliver init calls `restrict_sliver()` (or the same three syscalls in C, see
docs/guard.md) before its first child. Every process of the sliver is then in one
Landlock domain, and with the scopes of ABI 6+:

- LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: it cannot connect or send to an abstract
  Unix socket created outside its domain (another sliver's, the host's);
- LANDLOCK_SCOPE_SIGNAL: it cannot signal a process outside its domain.

As defence in depth the ruleset can also handle LANDLOCK_ACCESS_NET_BIND_TCP with
no rule: no process of the sliver can bind a TCP port itself. The guard binds on
the sliver's behalf from the agent (not in the domain), so nothing legitimate
breaks; MPTCP sockets are not covered by Landlock (the guard still is).

Structures mirror <linux/landlock.h>:
    struct landlock_ruleset_attr { __u64 handled_access_fs, handled_access_net, scoped; }
    struct landlock_net_port_attr { __u64 allowed_access; __u64 port; }
"""

from __future__ import annotations

import ctypes
import os
import struct

from kernel.libc import (
    LIBC,
    NR_LANDLOCK_ADD_RULE,
    NR_LANDLOCK_CREATE_RULESET,
    NR_LANDLOCK_RESTRICT_SELF,
    PR_SET_NO_NEW_PRIVS,
    check,
)

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_ACCESS_NET_BIND_TCP = 1 << 0
LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 1
LANDLOCK_RULE_NET_PORT = 2
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
LANDLOCK_SCOPE_SIGNAL = 1 << 1

RULESET_ATTR = struct.Struct("<QQQ")
NET_PORT_ATTR = struct.Struct("<QQ")
MIN_ABI_SCOPE = 6
MIN_ABI_NET = 4


def abi_version() -> int:
    """The kernel's Landlock ABI (0 if Landlock is off or not built)."""
    ret = LIBC.syscall(ctypes.c_long(NR_LANDLOCK_CREATE_RULESET), None, ctypes.c_long(0),
                        ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(ret), 0)


def ruleset_attr(scoped: int, handled_access_net: int = 0) -> bytes:
    """The raw `struct landlock_ruleset_attr` (what a C init passes, 24 bytes)."""
    return RULESET_ATTR.pack(0, handled_access_net, scoped)


def create_ruleset(scoped: int, handled_access_net: int = 0) -> int:
    """landlock_create_ruleset(2); returns the ruleset fd (close it after use)."""
    abi = abi_version()
    if scoped and abi < MIN_ABI_SCOPE:
        raise OSError(95, f"Landlock ABI {abi} has no scoping (needs {MIN_ABI_SCOPE}, "
                          "Linux 6.12): enable CONFIG_SECURITY_LANDLOCK and lsm=landlock")
    if handled_access_net and abi < MIN_ABI_NET:
        raise OSError(95, f"Landlock ABI {abi} has no network rules (needs {MIN_ABI_NET})")
    attr = ctypes.create_string_buffer(ruleset_attr(scoped, handled_access_net), RULESET_ATTR.size)
    return check(LIBC.syscall(ctypes.c_long(NR_LANDLOCK_CREATE_RULESET), attr,
                                ctypes.c_long(RULESET_ATTR.size), ctypes.c_long(0)),
                  "landlock_create_ruleset")


def allow_tcp_port(ruleset: int, port: int, access: int = LANDLOCK_ACCESS_NET_BIND_TCP) -> None:
    """landlock_add_rule(2) for one TCP port (only useful with handled_access_net)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"bad TCP port {port}")
    attr = ctypes.create_string_buffer(NET_PORT_ATTR.pack(access, port), NET_PORT_ATTR.size)
    check(LIBC.syscall(ctypes.c_long(NR_LANDLOCK_ADD_RULE), ctypes.c_long(ruleset),
                         ctypes.c_long(LANDLOCK_RULE_NET_PORT), attr, ctypes.c_long(0)),
           "landlock_add_rule")


def restrict_self(ruleset: int) -> None:
    """Set no_new_privs and enforce `ruleset` on the calling thread (and its children)."""
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(LIBC.syscall(ctypes.c_long(NR_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset),
                         ctypes.c_long(0)), "landlock_restrict_self")


def restrict_sliver(deny_tcp_bind: bool = True) -> None:
    """What a sliver init applies before its first child: scoped abstract Unix
    sockets and signals, and (by default) no direct TCP bind."""
    fd = create_ruleset(LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL,
                        LANDLOCK_ACCESS_NET_BIND_TCP if deny_tcp_bind else 0)
    try:
        restrict_self(fd)
    finally:
        os.close(fd)
