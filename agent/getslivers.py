"""Strict validation of a GetSlivers reply (plcapi spec §7).

A reply's structure is accepted whole or rejected whole: a missing key, a wrong type or
an oversized list raises `InvalidReply` naming the path of the bad value (e.g.
`slivers[3].attributes[0].value`). The caller then keeps its last known state. The
original node manager instead looked for keys one module at a time and carried on with
whatever was there.

What is wrong with one sliver's content only, and could be PLC's legitimate data, stays
with that sliver: a slice name this node cannot use puts the sliver in
`Desired.skipped` (not created, not destroyed, the reason logged), and a key with a
line break is dropped with a problem recorded for the sliver. PLC sends some slices
(nm-controller, delegated) to every node, so one such slice must not stop every
node's updates.
"""

from __future__ import annotations

import hashlib
import re
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Any

from agent.rspec import attributes_to_dict

# A name this node can host: a context, hostname, cgroup and file name (kernel.context
# NAME_RE); PLC's own rule is ^[a-z0-9.]+_[a-zA-Z0-9_.]+$ (plcapi §5.6).
SLICE_NAME = re.compile(r"^[a-z0-9][A-Za-z0-9_.-]{0,62}\Z")
INSTANTIATIONS = ("plc-instantiated", "nm-controller", "delegated", "not-instantiated")
MAX_SLIVERS = 100_000
MAX_ITEMS = 10_000
MAX_STRING = 1 << 20


_TIMESTAMP = re.compile(
    rb"<member>\s*<name>timestamp</name>\s*<value>\s*<(int|i4|i8)>\s*(-?\d{1,19})\s*</\1>"
    rb"\s*</value>\s*</member>")


def raw_digest(raw: bytes) -> tuple[int, str] | None:
    """(timestamp, digest of everything else) of a raw GetSlivers methodResponse, or None
    if the timestamp member is not found exactly once. Two replies with the same digest
    describe the same desired state, so the second needs no decoding (the reply of an
    unchanged node differs only in its timestamp)."""
    found = _TIMESTAMP.findall(raw)
    if len(found) != 1:
        return None
    rest = _TIMESTAMP.sub(b"", raw, count=1)
    return int(found[0][1]), hashlib.sha256(rest).hexdigest()


def future_timestamp(ts: int, now: float, skew: int) -> str | None:
    """Why a reply stamped `ts` is refused, if it is more than `skew` seconds ahead of
    `now` (this node's clock): a forged or broken reply from the future would
    otherwise be recorded as the last applied one and make every genuine reply after
    it look stale (F30). None if it is acceptable."""
    if ts > now + skew:
        return (f"GetSlivers reply timestamp {ts} is {ts - now:.0f} s ahead of this node's "
                f"clock (more than plc_clock_skew = {skew} s); refused, nothing recorded")
    return None


def last_applied(stored: str | None, now: float, skew: int) -> int:
    """The last applied reply's timestamp as recorded, or 0 if none or if it is ahead
    of the clock by more than `skew` (recorded by an agent without the check above:
    it must not hold back genuine replies)."""
    try:
        ts = int(stored or 0)
    except ValueError:
        return 0
    return 0 if future_timestamp(ts, now, skew) else ts


def decode(raw: bytes) -> Any:
    """The value of a raw methodResponse; InvalidReply if it is not well-formed XML-RPC."""
    try:
        (value,), _ = xmlrpc.client.loads(raw, use_builtin_types=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure rejects the reply
        raise InvalidReply(f"GetSlivers reply: not a valid XML-RPC response ({exc})") from None
    return value


class InvalidReply(ValueError):
    """The GetSlivers reply is malformed; the message names the offending path."""


@dataclass(frozen=True)
class SliverSpec:
    """What PLC wants for one slice on this node."""

    name: str
    slice_id: int
    instantiation: str
    expires: int
    keys: tuple[str, ...]
    attributes: dict[str, str] = field(hash=False)
    problems: tuple[str, ...] = ()   # what was dropped from this sliver's data

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name, "slice_id": self.slice_id, "instantiation": self.instantiation,
            "expires": self.expires, "keys": list(self.keys), "attributes": dict(self.attributes),
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SliverSpec:
        return cls(name=d["name"], slice_id=int(d["slice_id"]), instantiation=d["instantiation"],
                   expires=int(d["expires"]), keys=tuple(d["keys"]),
                   attributes=dict(d["attributes"]))


@dataclass(frozen=True)
class Desired:
    """A validated GetSlivers reply, reduced to what the agent uses."""

    timestamp: int
    node_id: int
    hostname: str
    slivers: dict[str, SliverSpec]
    accounts: dict[str, tuple[str, ...]]
    initscripts: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)   # sliver name -> why


def _expect(value: Any, kind: type | tuple[type, ...], path: str) -> Any:
    # bool is an int subclass in Python; XML-RPC distinguishes them, so do we.
    if isinstance(value, bool) and kind is int:
        raise InvalidReply(f"GetSlivers reply: {path} must be int, got boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidReply(f"GetSlivers reply: {path} must be {name}, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise InvalidReply(f"GetSlivers reply: {path} is longer than {MAX_STRING} characters")
    if isinstance(value, list) and len(value) > (MAX_SLIVERS if path == "slivers" else MAX_ITEMS):
        raise InvalidReply(f"GetSlivers reply: {path} has too many items ({len(value)})")
    return value


def _key(d: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    if key not in d:
        raise InvalidReply(f"GetSlivers reply: {path} lacks the key {key!r}")
    return _expect(d[key], kind, f"{path}.{key}" if path else key)


def _tag_value(value: Any, path: str) -> str:
    # Tag values are strings at PLC; ints sneak in from some clients. Anything else is bad.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidReply(f"GetSlivers reply: {path} must be string, got {type(value).__name__}")
    return str(value)


def plc_bwlimit(reply: Any) -> int | None:
    """The node's bandwidth cap PLC gives (bit/s): the `bwlimit` of the primary
    interface in a GetSlivers reply (else of the first interface that has one); None
    when there is none, it is null, or the reply is not a dict."""
    if not isinstance(reply, dict) or not isinstance(reply.get("interfaces"), list):
        return None
    found: list[tuple[bool, int]] = []
    for item in reply["interfaces"]:
        if not isinstance(item, dict):
            continue
        value = item.get("bwlimit")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append((not item.get("is_primary"), value))
    return min(found, key=lambda f: f[0])[1] if found else None


def parse(reply: Any, expected_node_id: int | None = None) -> Desired:
    """Validate a GetSlivers reply; InvalidReply on the first problem."""
    _expect(reply, dict, "reply")
    timestamp = _key(reply, "timestamp", int, "")
    node_id = _key(reply, "node_id", int, "")
    hostname = _key(reply, "hostname", str, "")
    if expected_node_id is not None and node_id != expected_node_id:
        raise InvalidReply(
            f"GetSlivers reply: node_id {node_id} is not this node's id {expected_node_id}")
    for key in ("interfaces", "groups", "conf_files"):
        if key in reply:
            _expect(reply[key], list, key)
    initscripts: dict[str, str] = {}
    for i, item in enumerate(_key(reply, "initscripts", list, "")):
        path = f"initscripts[{i}]"
        _expect(item, dict, path)
        initscripts[_key(item, "name", str, path)] = _key(item, "script", str, path)
    accounts: dict[str, tuple[str, ...]] = {}
    for i, item in enumerate(_key(reply, "accounts", list, "")):
        path = f"accounts[{i}]"
        _expect(item, dict, path)
        name = _key(item, "name", str, path)
        keys = _key(item, "keys", list, path)
        accounts[name] = tuple(_expect(k, str, f"{path}.keys[{j}]") for j, k in enumerate(keys))
    slivers: dict[str, SliverSpec] = {}
    skipped: dict[str, str] = {}
    for i, item in enumerate(_key(reply, "slivers", list, "")):
        spec = _sliver(item, f"slivers[{i}]")
        if spec.name in slivers or spec.name in skipped:
            raise InvalidReply(f"GetSlivers reply: slivers[{i}] repeats the slice {spec.name!r}")
        if not SLICE_NAME.match(spec.name):
            skipped[spec.name] = (f"slivers[{i}].name {spec.name!r} cannot name a sliver on "
                                  "this node (1-63 of A-Z a-z 0-9 _ . -, starting with a "
                                  "lower-case letter or digit)")
            continue
        slivers[spec.name] = spec
    return Desired(timestamp=timestamp, node_id=node_id, hostname=hostname, slivers=slivers,
                   accounts=accounts, initscripts=initscripts, skipped=skipped)


def parse_sliver(item: Any, path: str) -> SliverSpec:
    """One sliver entry (of a reply or a ticket), validated as in `parse`; a name this
    node cannot host is InvalidReply here."""
    spec = _sliver(item, path)
    if not SLICE_NAME.match(spec.name):
        raise InvalidReply(f"{path}.name {spec.name!r} cannot name a sliver on this node")
    return spec


def _sliver(item: Any, path: str) -> SliverSpec:
    _expect(item, dict, path)
    name = _key(item, "name", str, path)
    if len(name) > 256:
        raise InvalidReply(f"GetSlivers reply: {path}.name is {len(name)} characters long")
    slice_id = _key(item, "slice_id", int, path)
    instantiation = _key(item, "instantiation", str, path)
    if instantiation not in INSTANTIATIONS:
        raise InvalidReply(f"GetSlivers reply: {path}.instantiation {instantiation!r} is not one "
                           f"of {', '.join(INSTANTIATIONS)}")
    expires = _key(item, "expires", int, path)
    keys = []
    problems = []
    for j, k in enumerate(_key(item, "keys", list, path)):
        kpath = f"{path}.keys[{j}]"
        _expect(k, dict, kpath)
        _key(k, "key_type", str, kpath)
        key = _key(k, "key", str, kpath)
        if "\n" in key or "\r" in key or "\0" in key:
            # One line per key in authorized_keys: a break would add lines of its own.
            problems.append(f"keys[{j}] contains a line break; that key is not installed")
            continue
        keys.append(key)
    attrs = []
    for j, a in enumerate(_key(item, "attributes", list, path)):
        apath = f"{path}.attributes[{j}]"
        _expect(a, dict, apath)
        tagname = _key(a, "tagname", str, apath)
        if "value" not in a:
            raise InvalidReply(f"GetSlivers reply: {apath} lacks the key 'value'")
        attrs.append({"tagname": tagname, "value": _tag_value(a["value"], f"{apath}.value")})
    if "GetSliceFamily" in item and item["GetSliceFamily"] is not None:
        _expect(item["GetSliceFamily"], str, f"{path}.GetSliceFamily")
    return SliverSpec(name=name, slice_id=slice_id, instantiation=instantiation, expires=expires,
                      keys=tuple(keys), attributes=attributes_to_dict(attrs),
                      problems=tuple(problems))
