"""Capability names and the bounding set a sliver's processes get.

The bounding set is applied by the sliver's init (kernel/native/sliver-init.c) before
its first child, so it covers every process of the sliver; this module only turns the
`capabilities` rspec (a list of names such as "net_bind_service" or "CAP_KILL") into
the bit mask the init takes. Numbers come from python-prctl, which mirrors
<linux/capability.h>; the few newer than its table are listed here.
"""

from __future__ import annotations

from collections.abc import Iterable

import prctl

# Capabilities newer than python-prctl's table (linux/capability.h).
_EXTRA = {"checkpoint_restore": 40}

#: Every capability name this module knows, mapped to its number.
CAPS: dict[str, int] = {
    name: getattr(prctl, "CAP_" + name.upper())
    for name in prctl.ALL_CAP_NAMES
    if name != "last_cap" and hasattr(prctl, "CAP_" + name.upper())
}
CAPS.update(_EXTRA)

#: What a sliver's root may keep when the rspec says nothing: enough to run a normal
#: Debian userland as its own root (own files, own users, signals, chroot, privileged
#: ports via the agent's guard), nothing that administers the node. All of these act
#: only inside the sliver's user namespace; the guard decides about the network.
DEFAULT_CAPS: tuple[str, ...] = (
    "chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "net_bind_service", "sys_chroot", "audit_write", "setfcap",
)


def normalize(name: str) -> str:
    """'CAP_NET_RAW' or 'net_raw' -> 'net_raw'; ValueError naming an unknown one."""
    n = name.strip().lower()
    if n.startswith("cap_"):
        n = n[4:]
    if n not in CAPS:
        raise ValueError(
            f"unknown capability {name!r}; known: {', '.join(sorted(CAPS))}"
        )
    return n


def bounding_mask(names: Iterable[str] | None) -> int:
    """Bit mask (bit N = capability N) of the bounding set to keep.

    None means DEFAULT_CAPS. Unknown names raise ValueError naming them.
    """
    chosen = DEFAULT_CAPS if names is None else tuple(names)
    mask = 0
    for name in chosen:
        mask |= 1 << CAPS[normalize(name)]
    return mask


def mask_names(mask: int) -> list[str]:
    """The names of the capabilities set in `mask`, sorted by number."""
    return [n for n, bit in sorted(CAPS.items(), key=lambda kv: kv[1]) if mask >> bit & 1]
