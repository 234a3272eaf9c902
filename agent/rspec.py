"""Resource specs: PLC tags -> a typed rspec -> kernel limits. Pure, no I/O.

The rspec of a sliver is built as the original node manager built it (nodemanager
spec §3.1, §3.2): start from `DEFAULT_ALLOCATION`, override with the attributes of the
`<prefix>_default` slice, then with the sliver's own attributes. Each value is
coerced to the type of its default. Unlike the original, a value that does not
convert or is out of range is not silently replaced: it falls back to the layer below
and the problem is reported, so `status` can show it.

Units (spec §3.2): rates in kbit/s, byte budgets in KiB per 24 h, `disk_max` in KiB
(1k blocks), `mem_max`/`memlock_*` in KiB, `cpu_share` a weight, `cpu_pct` a reserved
percentage, `cpu_cap` a cap in percent of one CPU.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# bwmin and bwmax of plnode.bwlimit, in bit/s (spec §3.2).
BWMIN = 1000
BWMAX = 1_000_000_000

DEFAULT_ALLOCATION: dict[str, int | str] = {
    "enabled": 1,
    "cpu_pct": 0,
    "cpu_share": 1,
    "cpu_cores": "0b",
    "cpu_freezable": 0,
    "net_min_rate": BWMIN // 1000,
    "net_max_rate": BWMAX // 1000,
    "net_i2_min_rate": BWMIN // 1000,
    "net_i2_max_rate": BWMAX // 1000,
    "net_share": 1,
    "net_i2_share": 1,
    "net_max_kbyte": 10_546_875,
    "net_thresh_kbyte": 9_492_187,
    "net_i2_max_kbyte": 31_640_625,
    "net_i2_thresh_kbyte": 28_476_562,
    "disk_max": 10_000_000,
    "capabilities": "",
    "ip_addresses": "0.0.0.0",
}

# Keys this re-implementation adds (spec §9 "define real tags mem_max/mem_soft"). 0 means
# "no limit" for mem_max and cpu_cap.
EXTRA_ALLOCATION: dict[str, int | str] = {
    "mem_max": 0,      # KiB, memory.max
    "pids_max": 4096,  # processes and threads, pids.max
    "cpu_cap": 0,      # percent of one CPU, cpu.max
    "sockets_max": 1024,   # INET sockets open at once (kernel/sockcap.py); 0: no cap
}

ALLOCATION: dict[str, int | str] = {**DEFAULT_ALLOCATION, **EXTRA_ALLOCATION}

# Allowed ranges; -1 is allowed where the original gives it a meaning (net_max_rate=-1
# on the _default slice turns shaping off).
RANGES: dict[str, tuple[int, int]] = {
    "enabled": (0, 1),
    "cpu_pct": (0, 100),
    "cpu_share": (0, 1_000_000),
    "cpu_freezable": (0, 1),
    "net_min_rate": (0, 100_000_000),
    "net_max_rate": (-1, 100_000_000),
    "net_i2_min_rate": (0, 100_000_000),
    "net_i2_max_rate": (-1, 100_000_000),
    "net_share": (0, 1_000_000),
    "net_i2_share": (0, 1_000_000),
    "net_max_kbyte": (0, 2**53),
    "net_thresh_kbyte": (0, 2**53),
    "net_i2_max_kbyte": (0, 2**53),
    "net_i2_thresh_kbyte": (0, 2**53),
    "disk_max": (0, 2**53),
    "mem_max": (0, 2**53),
    "pids_max": (1, 4_194_304),
    "cpu_cap": (0, 100 * 4096),
    "sockets_max": (0, 1_048_576),
}

# Loanable resources and the minimum a lender keeps (spec §4.1).
MINIMUM_ALLOCATION: dict[str, int] = {
    "cpu_pct": 0,
    "cpu_share": 1,
    "net_min_rate": 0,
    "net_max_rate": 8,
    "net_i2_min_rate": 0,
    "net_i2_max_rate": 8,
    "net_share": 1,
}

# rlimit tags `<name>_{min,soft,hard}` (spec §9.4); `openfd` is vserver's name for nofile.
RLIMIT_NAMES: dict[str, str] = {
    name[len("RLIMIT_"):].lower(): name
    for name in dir(resource) if name.startswith("RLIMIT_")
}
RLIMIT_ALIASES = {"openfd": "nofile"}
# memlock_* is read as the memory limit (the lxc node manager reused it so, spec §3.2).
RLIMIT_SKIP = {"memlock"}

LINUX_CAPABILITIES = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
})


@dataclass
class Resolved:
    """A resolved rspec and the problems found while resolving it."""

    rspec: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def attributes_to_dict(attributes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """GetSlivers `attributes` ([{tagname, value}]) to a dict; the last duplicate wins,
    as in the original node manager."""
    out: dict[str, str] = {}
    for attr in attributes:
        out[str(attr["tagname"])] = str(attr["value"])
    return out


def shown(value: Any, limit: int = 60) -> str:
    """A slice-provided value in a message (problems, logs, status): its repr, cut at
    `limit` characters with the full length said, so a huge tag floods nothing."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def _coerce(name: str, raw: Any, default: int | str) -> int | str:
    """Convert a tag value to the type of its default; ValueError names the tag."""
    if isinstance(default, str):
        return str(raw)
    text = str(raw).strip()
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"tag {name!r} = {shown(raw)} is not an integer") from None
    low, high = RANGES.get(name, (-(2**63), 2**63))
    if not low <= value <= high:
        raise ValueError(f"tag {name!r} = {value} is outside [{low}, {high}]")
    return value


def _valid_cores(value: str) -> bool:
    text = value[:-1] if value.endswith("b") else value
    return text.isdigit()


def resolve(attributes: Mapping[str, str], overrides: Mapping[str, str] | None = None,
            node_defaults: Mapping[str, Any] | None = None) -> Resolved:
    """Defaults < the node's agent.toml (`node_defaults`: `mem_max` in KiB,
    `sockets_max`, and `nofile` for the rlimit) < `_default` slice overrides < the
    sliver's own attributes."""
    problems: list[str] = []
    rspec: dict[str, Any] = dict(ALLOCATION)
    node_defaults = node_defaults or {}
    for layer_name, layer in (("agent.toml", node_defaults),
                              ("_default slice", overrides or {}), ("sliver", attributes)):
        for name, default in ALLOCATION.items():
            if name not in layer:
                continue
            try:
                value = _coerce(name, layer[name], default)
                if name == "cpu_cores" and not _valid_cores(str(value)):
                    raise ValueError(f"tag 'cpu_cores' = {shown(value)} must be <n> or <n>b")
            except ValueError as exc:
                problems.append(f"{layer_name}: {exc}; kept {rspec[name]!r}")
                continue
            rspec[name] = value
    sysctls = {}
    for layer in (overrides or {}, attributes):
        for name, value in layer.items():
            if name.startswith("sysctl.") and len(name) > len("sysctl."):
                sysctls[name] = str(value)
    rspec.update(sysctls)
    rlimits, rl_problems = _rlimits({**(overrides or {}), **attributes})
    problems.extend(rl_problems)
    if "nofile" not in rlimits and node_defaults.get("nofile"):
        rlimits["nofile"] = [int(node_defaults["nofile"])] * 2
    rspec["rlimits"] = rlimits
    # memlock_* in KiB stands for the memory limit when mem_max is not given.
    if not any("mem_max" in layer for layer in (attributes, overrides or {})):
        for layer in (attributes, overrides or {}):
            raw = layer.get("memlock_hard")
            if raw is None:
                continue
            try:
                rspec["mem_max"] = _coerce("mem_max", raw, 0)
            except ValueError as exc:
                problems.append(f"memlock_hard: {exc}")
            break
    caps, cap_problems = parse_capabilities(str(rspec["capabilities"]))
    problems.extend(cap_problems)
    rspec["tags"] = dict(attributes)
    return Resolved(rspec=rspec, problems=problems)


def _rlimits(tags: Mapping[str, str]) -> tuple[dict[str, list[int]], list[str]]:
    """`<rlim>_{soft,hard}` tags to {name: [soft, hard]}; -1 or KEEP means unlimited/unset."""
    problems: list[str] = []
    found: dict[str, dict[str, int]] = {}
    for tag, raw in tags.items():
        base, _, kind = tag.rpartition("_")
        if kind not in ("min", "soft", "hard"):
            continue
        base = RLIMIT_ALIASES.get(base, base)
        if base not in RLIMIT_NAMES or base in RLIMIT_SKIP or kind == "min":
            continue
        text = str(raw).strip()
        if text.upper() in ("KEEP", "-1", ""):
            continue
        try:
            value = int(text)
            if value < 0:
                raise ValueError
        except ValueError:
            problems.append(f"tag {tag!r} = {shown(raw)} is not a non-negative integer; "
                            "ignored")
            continue
        found.setdefault(base, {})[kind] = value
    out: dict[str, list[int]] = {}
    for name, kinds in sorted(found.items()):
        hard = kinds.get("hard", kinds.get("soft"))
        soft = kinds.get("soft", hard)
        assert hard is not None and soft is not None
        if soft > hard:
            problems.append(f"rlimit {name}: soft {soft} above hard {hard}; soft set to hard")
            soft = hard
        out[name] = [soft, hard]
    return out, problems


def parse_capabilities(text: str) -> tuple[tuple[str, ...], list[str]]:
    """Comma-separated capability names (with or without CAP_) to a sorted tuple."""
    problems: list[str] = []
    caps: set[str] = set()
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        name = item if item.startswith("CAP_") else "CAP_" + item
        if name not in LINUX_CAPABILITIES:
            problems.append(f"tag 'capabilities': unknown capability {item!r}; ignored")
            continue
        caps.add(name)
    return tuple(sorted(caps)), problems


def limits_kwargs(rspec: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the backend from a resolved rspec (agent.backend turns
    them into kernel `Limits`; the CPU keys go through agent.cpu.allocate first).

    cpu_share is the weight, cpu_cap the hard cap (percent of one CPU), cpu_pct a
    reservation (percent of the node), cpu_cores whole cores ("N" or "Nb"),
    cpu_freezable 0/1: docs/cpu.md. Memory from KiB to bytes. Rlimits as (soft, hard).
    """
    mem = int(rspec["mem_max"]) * 1024 or None
    rlimits = {name: (int(v[0]), int(v[1])) for name, v in rspec.get("rlimits", {}).items()}
    caps, _ = parse_capabilities(str(rspec.get("capabilities", "")))
    return {
        "cpu_share": max(1, int(rspec["cpu_share"])),
        "cpu_cap": int(rspec["cpu_cap"]) or None,
        "cpu_reserve_pct": int(rspec["cpu_pct"]),
        "cpu_cores": str(rspec.get("cpu_cores", "0b")),
        "cpu_freezable": int(rspec.get("cpu_freezable", 0)),
        "mem_max": mem,
        "pids_max": int(rspec["pids_max"]),
        "inet_sockets_max": int(rspec.get("sockets_max", 0)) or None,
        "rlimits": rlimits,
        "extra_capabilities": caps,
    }


def disk_max_kib(rspec: Mapping[str, Any]) -> int | None:
    value = int(rspec["disk_max"])
    return value or None


def image_of(attributes: Mapping[str, str], default_image: str) -> str:
    """A slice's image: its `vref` tag, else the node's default image."""
    vref = attributes.get("vref", "").strip()
    return vref or default_image


def initscript_of(attributes: Mapping[str, str], initscripts: Mapping[str, str]) -> str:
    """initscript_code wins; else the named global initscript; else empty (spec §2.8)."""
    code = attributes.get("initscript_code")
    if code:
        return code
    name = attributes.get("initscript")
    if name:
        return initscripts.get(name, "")
    return ""
