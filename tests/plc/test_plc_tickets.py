"""GetSliceTicket signed with Ed25519, GetTicketKey, and the key `plc init` makes
(docs/tickets.md). Each test runs on every store (PLC_TEST_STORES)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from plc import tickets
from plc.store import Store
from tests.plc.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, start_server

PID = os.getpid()
PLC = [sys.executable, "-c", "import sys; from plc.cli import main; sys.exit(main())"]


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify(ticket: str, public_b64: str) -> dict[str, Any]:
    """The documented format, checked independently of plc.tickets' signing code."""
    prefix, payload, sig = ticket.split(".")
    assert prefix == "PLTICKET1"
    pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
    pub.verify(_unb64(sig), b"planetlab-slice-ticket-v1\0" + _unb64(payload))
    return json.loads(_unb64(payload))


class T:
    """A server with a ticket key, two sites, people of each role, a node per site and
    a slice at site A on node A."""

    def __init__(self, store: Store, key: Path) -> None:
        self.server, self.thread = start_server(store, tickets_key=str(key), tickets_lifetime=600)
        host, port = self.server.server_address[:2]
        self.api: Any = xmlrpc.client.ServerProxy(f"http://{host}:{port}/PLCAPI/",
                                                  allow_none=True)
        a, admin = self.api, {"AuthMethod": "password", "Username": ADMIN_EMAIL,
                              "AuthString": ADMIN_PASSWORD}
        self.auth: dict[str, Any] = {"admin": admin, "anon": {"AuthMethod": "anonymous"}}
        self.site_a = a.AddSite(admin, {"name": "A", "abbreviated_name": "A",
                                        "login_base": f"ta{PID}", "max_slices": 5})
        self.site_b = a.AddSite(admin, {"name": "B", "abbreviated_name": "B",
                                        "login_base": f"tb{PID}", "max_slices": 5})
        for who, site, role in (("pi", self.site_a, "pi"), ("user", self.site_a, "user"),
                                ("other", self.site_a, "user"), ("tech", self.site_a, "tech"),
                                ("pi_b", self.site_b, "pi")):
            email = f"{who}.{PID}@example.org"
            pid = a.AddPerson(admin, {"first_name": who, "last_name": "X", "email": email,
                                      "password": f"{who}-pw"})
            a.UpdatePerson(admin, pid, {"enabled": True})
            a.AddPersonToSite(admin, pid, site)
            a.AddRoleToPerson(admin, role, pid)
            self.auth[who] = {"AuthMethod": "password", "Username": email,
                              "AuthString": f"{who}-pw"}
            if who == "user":
                self.user = pid
        self.node_a = a.AddNode(admin, self.site_a, {"hostname": f"ta-{PID}.example.org"})
        self.node_b = a.AddNode(admin, self.site_b, {"hostname": f"tb-{PID}.example.org"})
        self.slice_name = f"ta{PID}_deleg"
        self.slice = a.AddSlice(admin, {"name": self.slice_name, "url": "http://x.org",
                                        "description": "d", "instantiation": "delegated"})
        a.AddPersonToSlice(admin, self.user, self.slice)
        a.AddSliceToNodes(admin, self.slice, [self.node_a])
        a.AddSliceTag(admin, self.slice, "cpu_share", "11")
        a.AddSliceTag(admin, self.slice, "cpu_share", "99", self.node_a)

    def fault(self, method: str, auth: Any, *args: Any) -> int:
        try:
            getattr(self.api, method)(auth, *args)
        except xmlrpc.client.Fault as f:
            return int(f.faultCode)
        raise AssertionError(f"{method} did not fail")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def t(plc_store: Store, tmp_path: Path) -> Iterator[T]:
    key = tmp_path / f"ticket-{PID}.pem"
    assert tickets.ensure_key(key)
    world = T(plc_store, key)
    try:
        yield world
    finally:
        world.close()


def test_ticket_is_signed_with_the_published_key(t: T) -> None:
    pub = t.api.GetTicketKey(t.auth["anon"])
    assert pub["algorithm"] == "ed25519" and len(base64.b64decode(pub["public_key"])) == 32
    ticket = t.api.GetSliceTicket(t.auth["user"], t.slice_name)
    body = verify(ticket, pub["public_key"])
    assert body["key_id"] == pub["key_id"]
    assert (body["slice"], body["slice_id"]) == (t.slice_name, t.slice)
    assert body["nodes"] == [{"node_id": t.node_a, "hostname": f"ta-{PID}.example.org"}]
    assert body["expiry"] - body["issued"] == 600          # [tickets] lifetime
    assert len(bytes.fromhex(body["nonce"])) == 16
    (sliver,) = body["slivers"]
    assert sliver["instantiation"] == "delegated"
    # Without a node: slice-wide attributes only (spec 8); with the node: GetSlivers's.
    assert {"tagname": "cpu_share", "value": "11"} in sliver["attributes"]
    assert {"tagname": "cpu_share", "value": "99"} not in sliver["attributes"]
    node_ticket = verify(t.api.GetSliceTicket(t.auth["admin"], t.slice, t.node_a),
                         pub["public_key"])
    assert node_ticket["nodes"] == body["nodes"]
    assert node_ticket["slivers"][0]["attributes"][0] == {"tagname": "cpu_share", "value": "99"}
    # Every ticket has its own nonce; a changed byte breaks the signature.
    again = verify(t.api.GetSliceTicket(t.auth["user"], t.slice_name), pub["public_key"])
    assert again["nonce"] != body["nonce"]
    prefix, payload, sig = ticket.split(".")
    forged = _unb64(payload).replace(b'"cpu_share","value":"11"', b'"cpu_share","value":"12"')
    assert forged != _unb64(payload)
    with pytest.raises(InvalidSignature):
        verify(".".join([prefix, base64.urlsafe_b64encode(forged).decode().rstrip("="), sig]),
               pub["public_key"])


def test_expiry_never_passes_the_slices(t: T) -> None:
    import time

    soon = int(time.time()) + 3 * 86400
    t.api.UpdateSlice(t.auth["admin"], t.slice, {"expires": soon})
    t.server.api.config = t.server.api.config.replace(tickets_lifetime=30 * 86400)
    pub = t.api.GetTicketKey(t.auth["admin"])["public_key"]
    body = verify(t.api.GetSliceTicket(t.auth["admin"], t.slice), pub)
    assert body["expiry"] == soon


def test_who_may_have_a_ticket(t: T) -> None:
    assert t.api.GetSliceTicket(t.auth["pi"], t.slice)              # PI of the slice's site
    assert t.api.GetSliceTicket(t.auth["user"], t.slice)            # member
    assert t.fault("GetSliceTicket", t.auth["other"], t.slice) == 108   # user, not member
    assert t.fault("GetSliceTicket", t.auth["pi_b"], t.slice) == 108    # PI elsewhere
    assert t.fault("GetSliceTicket", t.auth["tech"], t.slice) == 103    # role not allowed
    assert t.fault("GetSliceTicket", t.auth["anon"], t.slice) == 103
    assert t.fault("GetSliceTicket", t.auth["admin"], "nosuch_slice") == 102
    assert t.fault("GetSliceTicket", t.auth["admin"], t.slice, t.node_b) == 102  # not its node
    lonely = t.api.AddSlice(t.auth["admin"], {"name": f"ta{PID}_lonely", "url": "http://x.org",
                                              "description": "d"})
    assert t.fault("GetSliceTicket", t.auth["admin"], lonely) == 102   # no node to name


def test_no_key_is_fault_111(plc_store: Store, tmp_path: Path) -> None:
    world = T(plc_store, tmp_path / "missing.pem")
    try:
        assert world.fault("GetSliceTicket", world.auth["admin"], world.slice) == 111
        assert world.fault("GetTicketKey", world.auth["admin"]) == 111
    finally:
        world.close()


def test_plc_init_makes_the_key_once(tmp_path: Path) -> None:
    db = tmp_path / f"plc-{PID}.db"
    out = subprocess.run([*PLC, "init", "--db", str(db), "--admin-email", "a@example.org",
                          "--admin-password", "pw"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = tmp_path / "ticket-ed25519.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    pub = subprocess.run([*PLC, "ticket-key", "--db", str(db), "--create"],
                         capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0, pub.stderr
    assert key.read_bytes() == first                      # never overwritten
    assert pub.stdout.strip() == tickets.public_b64(tickets.load_key(key))
    key.unlink()
    gone = subprocess.run([*PLC, "ticket-key", "--db", str(db)], capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 2 and str(key) in gone.stderr
