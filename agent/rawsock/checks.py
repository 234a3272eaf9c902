"""The checks of a raw IP packet a slice wants sent (`RawSockets.raw_send`): pure,
on the bytes and the port table."""

from __future__ import annotations

import errno
import socket
import struct

from agent.ports.table import PortTable, normalize_address

ICMP_ECHO_V4 = (0, 8)
ICMP_ECHO_V6 = (128, 129)


class RawSendRefused(Exception):
    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err


def check_raw_packet(table: PortTable, slice_name: str, data: bytes) -> tuple[int, str, str]:
    """Check a whole IP packet a slice wants sent; returns (family, source, destination).

    Raises RawSendRefused naming what is wrong: not an IP packet, a fragment, a
    source address that is not the node's, a source port or ICMP id the slice does
    not own, or a protocol other than TCP, UDP and ICMP echo.
    """
    if not 20 <= len(data) <= 65535:
        raise RawSendRefused(errno.EMSGSIZE, f"packet of {len(data)} bytes")
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) < ihl + 8:
            raise RawSendRefused(errno.EINVAL, "truncated IPv4 packet")
        if ihl != 20:  # options: source routing, record route, router alert...
            raise RawSendRefused(errno.EPERM, "IPv4 options are not sent (IHL must be 5)")
        if struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
            raise RawSendRefused(errno.EPERM, "IPv4 fragments are not sent")
        proto, src, dst = data[9], data[12:16], data[16:20]
        family, l4 = socket.AF_INET, ihl
    elif version == 6:
        if len(data) < 48:
            raise RawSendRefused(errno.EINVAL, "truncated IPv6 packet")
        proto, src, dst = data[6], data[8:24], data[24:40]
        family, l4 = socket.AF_INET6, 40
    else:
        raise RawSendRefused(errno.EINVAL, f"IP version {version}")
    src_text = socket.inet_ntop(family, src)
    dst_text = socket.inet_ntop(family, dst)
    try:
        src_norm = normalize_address(src_text)
    except ValueError:
        raise RawSendRefused(errno.EINVAL, f"bad source {src_text}") from None
    if src_norm not in table.addresses:
        raise RawSendRefused(errno.EADDRNOTAVAIL, f"source {src_text} is not this node's")
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
    name = names.get(proto)
    if name is None or (name == "icmp") != (proto == (1 if version == 4 else 58)):
        raise RawSendRefused(errno.EPERM, f"IP protocol {proto} cannot be sent raw")
    if name == "icmp":
        echo = ICMP_ECHO_V4 if version == 4 else ICMP_ECHO_V6
        if data[l4] not in echo:
            raise RawSendRefused(errno.EPERM, f"ICMP type {data[l4]} cannot be sent raw")
        port = struct.unpack_from("!H", data, l4 + 4)[0]
    else:
        port = struct.unpack_from("!H", data, l4)[0]
    owner = table.owner(name, src_norm, port)
    if owner != slice_name:
        why = f"owned by {owner!r}" if owner else "not owned"
        raise RawSendRefused(errno.EACCES, f"{name} {port} on {src_text}: {why}")
    return family, src_text, dst_text


def flow_of(data: bytes) -> tuple[int, str, str, int, str, int]:
    """(family, proto name, source, source port, destination, destination port) of a
    packet `check_raw_packet` accepted (ICMP: the echo id as both ports)."""
    if data[0] >> 4 == 4:
        family, proto, l4, src, dst = socket.AF_INET, data[9], 20, data[12:16], data[16:20]
    else:
        family, proto, l4, src, dst = socket.AF_INET6, data[6], 40, data[8:24], data[24:40]
    name = {6: "tcp", 17: "udp"}.get(proto, "icmp")
    if name == "icmp":
        sport = dport = struct.unpack_from("!H", data, l4 + 4)[0]
    else:
        sport, dport = struct.unpack_from("!HH", data, l4)
    return (family, name, socket.inet_ntop(family, src), sport,
            socket.inet_ntop(family, dst), dport)
