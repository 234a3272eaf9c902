"""Safe raw sockets: what a slice may see and send below the socket layer.

A slice never opens a raw or packet socket itself (the guard filter refuses it).
Through the slice API it gets instead, by SCM_RIGHTS, the receive-only end of a
relay fed by an agent-held packet socket (cooked, every interface) with a locked
BPF filter:

- a sniffer: only IPv4/IPv6 packets from or to an (address, port) the slice owns,
  or ICMP echo with an ICMP id it owns (`sniffer_filter`);
- an error socket: only ICMP errors whose quoted packet was sent from an (address,
  port) or ICMP id the slice owns (`error_filter`).

And the agent sends a raw IP packet for it (`raw_send`) only after checking the
source address is the node's and the source port (or ICMP echo id) is the slice's.

The filters are compiled from what the slice owns when the socket is opened; open a
new one after reserving more ports. IPv6 extension headers are not followed (such
packets are not shown), and IPv4 fragments after the first are not shown.

Why a relay: a packet socket can also send frames whatever its filter (and
PACKET_QDISC_BYPASS skips every egress hook), so handing one out would let the slice
inject frames. The relay costs the agent a copy per packet; it is bounded per slice:
RELAYS_PER_SLICE open relays and one RELAY_PPS budget shared by them (beyond it the
packets stay in the kernel's small per-relay queue and are dropped there). A relay
whose filter passes a port its slice no longer holds is closed (`ports_lost`).

Modules (docs/guard.md "Module map"): `filters` (the BPF programs), `checks` (a raw
packet to send), `relays` (the relay loop), `service` (`RawSockets`, the agent side).
"""

from agent.rawsock.checks import (
    ICMP_ECHO_V4,
    ICMP_ECHO_V6,
    RawSendRefused,
    check_raw_packet,
    flow_of,
)
from agent.rawsock.filters import SNAPLEN, error_filter, sniffer_filter
from agent.rawsock.relays import (
    RELAY_BATCH,
    RELAY_BURST,
    RELAY_CHECK,
    RELAY_PPS,
    Relay,
    RelayStats,
    relay,
)
from agent.rawsock.service import RELAY_RCVBUF, RELAY_RECHECK, RELAYS_PER_SLICE, RawSockets

__all__ = [
    "ICMP_ECHO_V4", "ICMP_ECHO_V6", "RELAYS_PER_SLICE", "RELAY_BATCH", "RELAY_BURST",
    "RELAY_CHECK", "RELAY_PPS", "RELAY_RCVBUF", "RELAY_RECHECK", "SNAPLEN", "RawSendRefused",
    "RawSockets", "Relay", "RelayStats", "check_raw_packet", "error_filter", "flow_of",
    "relay", "sniffer_filter",
]
