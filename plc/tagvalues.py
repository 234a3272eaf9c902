"""Value checks of the tag types whose values PLC can know: the node agent's numeric
resource tags (the same names, units and ranges as agent/rspec.py's RANGES, which a
test keeps equal: plc imports nothing of the agent) and the rlimit tags.

A value outside them is refused when set (fault 102 naming the tag), so garbage never
reaches a node's GetSlivers; a node still checks every value itself (its own rules
may be stricter, and an old PLC or another one may not check at all).
"""

from __future__ import annotations

import re

from plc.faults import PLCInvalidArgument

#: tag -> (lowest, highest) integer value; units as agent/rspec.py reads them.
NUMERIC_TAG_RANGES: dict[str, tuple[int, int]] = {
    "enabled": (0, 1),
    "cpu_pct": (0, 100),
    "cpu_share": (0, 1_000_000),
    "cpu_freezable": (0, 1),
    "net_min_rate": (0, 100_000_000),          # kbit/s
    "net_max_rate": (-1, 100_000_000),         # kbit/s; -1: no cap
    "net_i2_min_rate": (0, 100_000_000),
    "net_i2_max_rate": (-1, 100_000_000),
    "net_share": (0, 1_000_000),
    "net_i2_share": (0, 1_000_000),
    "net_max_kbyte": (0, 2**53),
    "net_thresh_kbyte": (0, 2**53),
    "net_i2_max_kbyte": (0, 2**53),
    "net_i2_thresh_kbyte": (0, 2**53),
    "disk_max": (0, 2**53),                    # KiB
    "mem_max": (0, 2**53),                     # KiB
    "pids_max": (1, 4_194_304),
    "cpu_cap": (0, 100 * 4096),                # percent of one CPU
    "sockets_max": (0, 1_048_576),
}

#: `<name>_{min,soft,hard}` rlimit tags (and vserver's `openfd`).
RLIMIT_TAG_BASES = frozenset({
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
    "nproc", "rss", "rtprio", "sigpending", "stack", "openfd"})
RLIMIT_MAX = 2**63 - 1
RLIMIT_UNSET = ("-1", "KEEP", "")
_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _integer(tagname: str, value: str) -> int:
    text = value.strip()
    if not _INTEGER.fullmatch(text):
        raise PLCInvalidArgument(f"tag {tagname!r}: {_shown(value)} is not an integer",
                                 "value")
    return int(text, 10)


def _shown(value: str) -> str:
    """The value in a fault string: short, whatever was sent."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def check_tag_value(tagname: str, value: str | None) -> None:
    """Raise fault 102 naming the tag when `value` is not one its type allows."""
    if value is None:
        return
    tag = tagname.lower()
    if tag in NUMERIC_TAG_RANGES:
        low, high = NUMERIC_TAG_RANGES[tag]
        number = _integer(tagname, value)
        if not low <= number <= high:
            raise PLCInvalidArgument(f"tag {tagname!r} = {number} is outside [{low}, {high}]",
                                     "value")
        return
    if tag == "cpu_cores":
        text = value[:-1] if value.endswith("b") else value
        if not (text.isascii() and text.isdigit() and len(text) <= 6):
            raise PLCInvalidArgument(f"tag 'cpu_cores': {_shown(value)} must be <n> or <n>b "
                                     "(n cores, b: best effort)", "value")
        return
    base, _, kind = tag.rpartition("_")
    if kind in ("min", "soft", "hard") and base in RLIMIT_TAG_BASES:
        if value.strip().upper() in RLIMIT_UNSET:
            return
        number = _integer(tagname, value)
        if not 0 <= number <= RLIMIT_MAX:
            raise PLCInvalidArgument(f"tag {tagname!r} = {number}: an rlimit is 0 to "
                                     f"{RLIMIT_MAX}, or -1 (unlimited)", "value")
