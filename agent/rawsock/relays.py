"""The relay from an agent-held packet socket to a slice's receive-only end, and its
bookkeeping (see `agent.rawsock`)."""

from __future__ import annotations

import select
import socket
from dataclasses import dataclass, field

import trio

from agent.ports.table import Key
from agent.tokenbucket import TokenBuckets

RELAY_PPS = 20000    # packets a second forwarded for one slice, all its relays together
RELAY_BURST = 2000
RELAY_BATCH = 64     # packets moved per scheduler turn
RELAY_CHECK = 5.0    # seconds between checks that the slice still holds its end


@dataclass
class RelayStats:
    forwarded: int = 0
    dropped: int = 0     # the slice's end was full
    throttled: int = 0   # times the slice's budget ran out (packets left to the kernel)


async def relay(source: socket.socket, sink: socket.socket, stats: RelayStats,
                pps: float = RELAY_PPS, burst: int = RELAY_BURST,
                budget: TokenBuckets | None = None, key: str = "relay") -> None:
    """Forward each packet read from `source` (the agent's filtered packet socket) as
    one message on `sink` (the agent's end of the slice's socket pair) until the
    slice closes its end.

    Each packet costs a token of `budget[key]` (a bucket shared by all relays of one
    slice; without `budget`, a bucket of `pps`/`burst` of its own). Out of tokens,
    the relay stops reading until the bucket refills: the packets wait in the
    packet socket's small queue and the kernel drops what does not fit, so a slice
    flooding its own port costs the agent at most its budget of copies (F17).
    Packets the slice has no room for are dropped and counted. Closes both sockets
    on return or cancellation.
    """
    bucket = budget if budget is not None else TokenBuckets(pps, burst, trio.current_time)
    pause = min(1.0, RELAY_BATCH / bucket.rate)
    hup = select.poll()
    hup.register(sink, select.POLLHUP)
    try:
        while True:
            with trio.move_on_after(RELAY_CHECK):
                await trio.lowlevel.wait_readable(source)
            if hup.poll(0):
                return  # the slice closed its end
            for _ in range(RELAY_BATCH):
                if not bucket.take(key):
                    stats.throttled += 1
                    await trio.sleep(pause)
                    break
                try:
                    pkt = source.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    bucket.take(key, -1.0)  # nothing read: the token goes back
                    break
                try:
                    sink.send(pkt, socket.MSG_DONTWAIT)
                    stats.forwarded += 1
                except BlockingIOError:
                    stats.dropped += 1
                except (BrokenPipeError, ConnectionResetError):
                    return
            await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(source)
        source.close()
        sink.close()


@dataclass
class Relay:
    """One open sniffer or error socket of a slice, as the agent tracks it."""

    slice_name: str
    kind: str
    keys: frozenset[Key]    # what its locked filter passes
    stats: RelayStats = field(default_factory=RelayStats)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
