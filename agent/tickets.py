"""PLC-signed slice tickets on the node (docs/tickets.md): checking one, the key it is
checked with, and the nonces of redeemed tickets.

Wire form (PLC's plc/tickets.py makes it): ``PLTICKET1.<b64url payload>.<b64url sig>``,
the signature Ed25519 over ``DOMAIN + payload`` with PLC's ticket key; the payload is
JSON, parsed only after its signature verified. What the original node manager took
as a ticket (a GPG-signed GetSlivers reply, replayable, for any node, never expiring:
nodemanager spec §4.3) is refused.

`check` is pure. `TicketKeys` decides which key is trusted: agent.toml
`plc_ticket_key`, else the key PLC gave over the node's authenticated session once,
pinned in the state (`meta` ticket_key); a different key from PLC later is refused,
loudly. `Nonces` keeps every redeemed nonce until its ticket's expiry (table
`ticket_nonces`), in the same transaction as the sliver record the ticket admits, so
a replay is refused across agent restarts and kill -9.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger("agent.tickets")

PREFIX = "PLTICKET1"
DOMAIN = b"planetlab-slice-ticket-v1\0"
MAX_TICKET = 256 * 1024
PIN_KEY = "ticket_key"
REFETCH_AFTER = 600.0     # at most one GetTicketKey per this many seconds


class TicketError(Exception):
    """A ticket refused; `reason` is one word (forged, replayed, expired, other-node,
    malformed, untrusted), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Ticket:
    nonce: str
    issued: int
    expiry: int
    slice: str
    nodes: tuple[tuple[int, str], ...]
    body: dict[str, Any]          # the whole payload (GetSlivers-shaped: slivers, initscripts)


def parse_public_key(text: str) -> bytes:
    """32 raw bytes from base64 text (what `plc ticket-key` prints)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise TicketError("untrusted", "not base64") from None
    if len(raw) != 32:
        raise TicketError("untrusted", f"{len(raw)} bytes, an Ed25519 public key has 32")
    return raw


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def _unb64(part: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TicketError("malformed", f"ticket {what} is not base64url") from None


def split(ticket: Any) -> tuple[bytes, bytes]:
    """(payload, signature) of a ticket string; TicketError("malformed") otherwise."""
    if not isinstance(ticket, str):
        raise TicketError("malformed", f"a ticket is a string, got {type(ticket).__name__}")
    if len(ticket) > MAX_TICKET:
        raise TicketError("malformed", f"ticket longer than {MAX_TICKET} characters")
    parts = ticket.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        hint = " (a GPG ticket of the old PLC: not accepted)" if "PGP" in ticket[:64] else ""
        raise TicketError("malformed", f"not a {PREFIX} ticket{hint}")
    return _unb64(parts[1], "payload"), _unb64(parts[2], "signature")


def claimed_key_id(payload: bytes) -> str:
    """The key id a payload names (unverified: only to tell "other key" from forged)."""
    try:
        value = json.loads(payload).get("key_id", "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def check(ticket: Any, public: bytes, node_id: int | None, hostname: str, now: float,
          skew: int) -> Ticket:
    """The ticket if PLC's key signed it, it names this node, and it has not expired;
    TicketError naming which of these failed. Replay is the caller's (Nonces)."""
    payload, sig = split(ticket)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, DOMAIN + payload)
    except InvalidSignature:
        other = claimed_key_id(payload)
        if other and other != key_id(public):
            raise TicketError("forged", f"ticket signed by key {other}, not by PLC's ticket "
                              f"key {key_id(public)} that this node trusts") from None
        raise TicketError("forged", "ticket signature does not verify with PLC's ticket key "
                          f"{key_id(public)} (forged or altered)") from None
    try:
        body = json.loads(payload)
        nonce, issued, expiry = body["nonce"], body["issued"], body["expiry"]
        name = body["slice"]
        nodes = tuple((n["node_id"], n["hostname"]) for n in body["nodes"])
        if not (isinstance(nonce, str) and 16 <= len(nonce) <= 128 and isinstance(name, str)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in (issued, expiry))
                and isinstance(body["slivers"], list) and isinstance(body["initscripts"], list)
                and all(isinstance(i, int) and isinstance(h, str) for i, h in nodes)):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TicketError("malformed", "signed ticket lacks or mistypes nonce, issued, "
                          "expiry, slice, nodes, slivers or initscripts") from None
    if now > expiry:
        raise TicketError("expired", f"ticket for {name} expired at {_when(expiry)} "
                          f"({now - expiry:.0f} s ago)")
    if issued > now + skew:
        raise TicketError("expired", f"ticket for {name} issued at {_when(issued)}, "
                          f"{issued - now:.0f} s ahead of this node's clock")
    mine = [n for n in nodes if (n[0] == node_id if node_id else n[1] == hostname.lower())]
    if not mine:
        named = ", ".join(f"{h} ({i})" for i, h in nodes) or "none"
        raise TicketError("other-node", f"ticket for {name} is for other nodes ({named}), not "
                          f"this node {hostname} ({node_id or 'id unknown'})")
    return Ticket(nonce=nonce, issued=issued, expiry=expiry, slice=name, nodes=nodes, body=body)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


class TicketKeys:
    """The public key tickets are checked with (see the module docstring)."""

    def __init__(self, configured: str, state: Any,
                 fetch: Callable[[], Awaitable[Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`configured`: agent.toml plc_ticket_key (base64, a path, or empty);
        `fetch`: PLC's GetTicketKey over the node's session (None: never asked)."""
        self.configured = configured
        self.state = state
        self.fetch = fetch
        self.clock = clock
        self._last_fetch: float | None = None

    def _configured_key(self) -> bytes | None:
        text = self.configured
        if not text:
            return None
        where = "agent.toml plc_ticket_key"
        if text.startswith("/"):
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise TicketError("untrusted", f"{where} file {self.configured}: "
                                  f"{exc.strerror}") from None
            where = f"{where} file {self.configured}"
        try:
            return parse_public_key(text)
        except TicketError as exc:
            raise TicketError("untrusted", f"{where}: {exc}") from None

    def pinned(self) -> bytes | None:
        text = self.state.get_meta(PIN_KEY)
        return base64.b64decode(text) if text else None

    async def trusted(self, wanted_id: str = "") -> bytes:
        """The trusted key. Without a configured one, PLC's key is fetched once and
        pinned; a ticket naming another key id makes one more fetch (rate limited) so
        that a changed key at PLC is reported, and refused."""
        key = self._configured_key()
        if key is not None:
            return key
        pinned = self.pinned()
        if pinned is not None and (not wanted_id or wanted_id == key_id(pinned)):
            return pinned
        if self.fetch is None:
            if pinned is not None:
                return pinned
            raise TicketError("untrusted", "this node has no PLC ticket key (set "
                              "plc_ticket_key in agent.toml)")
        now = self.clock()
        if self._last_fetch is not None and now - self._last_fetch < REFETCH_AFTER:
            if pinned is not None:
                return pinned
            raise TicketError("untrusted", "PLC's ticket key could not be fetched lately; "
                              "try again later, or set plc_ticket_key in agent.toml")
        self._last_fetch = now
        try:
            reply = await self.fetch()
            got = parse_public_key(reply["public_key"])
        except TicketError:
            raise
        except Exception as exc:  # noqa: BLE001 - PLC's failure, reported to the caller
            if pinned is not None:
                return pinned
            raise TicketError("untrusted", f"PLC's ticket key could not be fetched: "
                              f"{exc}") from None
        if pinned is None:
            self.state.set_meta(PIN_KEY, base64.b64encode(got).decode())
            log.info("PLC ticket key %s fetched over the node session and pinned", key_id(got))
            return got
        if got != pinned:
            log.error("PLC's ticket key CHANGED: pinned %s, PLC now offers %s; REFUSED. If "
                      "PLC's key really changed, put the new one in agent.toml "
                      "plc_ticket_key (`plc ticket-key` on PLC prints it)",
                      key_id(pinned), key_id(got))
            raise TicketError("untrusted", f"PLC now offers ticket key {key_id(got)}, not the "
                              f"key {key_id(pinned)} this node pinned: refused until the node's "
                              "admin sets plc_ticket_key")
        return pinned


NONCES_SCHEMA = """
CREATE TABLE IF NOT EXISTS ticket_nonces (
    nonce TEXT PRIMARY KEY,
    slice TEXT NOT NULL,
    expiry INTEGER NOT NULL,
    redeemed_at REAL NOT NULL
)"""


class Nonces:
    """Redeemed ticket nonces, kept until their ticket's expiry in the agent's state."""

    def __init__(self, state: Any) -> None:
        self.state = state
        with state.transaction() as db:
            db.execute(NONCES_SCHEMA)

    def redeemed_at(self, nonce: str) -> float | None:
        with self.state.transaction() as db:
            row = db.execute("SELECT redeemed_at FROM ticket_nonces WHERE nonce=?",
                             (nonce,)).fetchone()
        return float(row[0]) if row else None

    def record(self, db: Any, ticket: Ticket, now: float) -> None:
        """Within the caller's transaction: the nonce is spent (IntegrityError if it
        was already)."""
        db.execute("INSERT INTO ticket_nonces VALUES (?, ?, ?, ?)",
                   (ticket.nonce, ticket.slice, ticket.expiry, now))

    def collect(self, now: float, margin: int = 3600) -> int:
        """Forget the nonces of tickets expired more than `margin` seconds ago (refused
        as expired anyway; the margin covers a clock stepped back)."""
        with self.state.transaction() as db:
            return db.execute("DELETE FROM ticket_nonces WHERE expiry < ?",
                              (int(now) - margin,)).rowcount
