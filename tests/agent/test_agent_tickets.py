"""Delegated instantiation end to end (docs/tickets.md): a real `plc serve` signs
tickets, a real agent redeems them, real kernel slivers are made and removed, and the
calls come from inside a management slice's sliver over its socket."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_node import LiveServer, Node, Site, cleanup_node, make_node, plc_server, wait_for
from test_agent_e2e import UCLIENT_C, context_state, nothing_left, sliver

from plc import tickets as plc_tickets

pytestmark = pytest.mark.kernel

PID = os.getpid()


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"agent-tickets-{PID}")) as srv:
        yield srv


@pytest.fixture
def node(plc: LiveServer) -> Iterator[tuple[Site, Node]]:
    site = Site(plc)
    n = make_node(plc, site.hostname)
    agents: list[subprocess.Popen[bytes]] = []
    n.agents = agents  # type: ignore[attr-defined]
    try:
        yield site, n
    finally:
        cleanup_node(n, agents)


def call_in(node: Node, name: str, method: str, *args: Any) -> Any:
    """`method(*args)` on the agent socket from inside sliver `name`: the result, or
    the xmlrpc.client.Fault."""
    from kernel.context import Context

    dest = Path(context_state(node, name)["root"]) / "tmp" / "uclient"
    if not dest.exists():
        tool = node.base / "uclient"
        if not tool.exists():
            src = node.base / "uclient.c"
            src.write_text(UCLIENT_C)
            subprocess.run(["gcc", "-static", "-O2", "-o", str(tool), str(src)], check=True,
                           timeout=120)
        dest.write_bytes(tool.read_bytes())
        dest.chmod(0o755)
    req = xmlrpc.client.dumps(args, method)
    http = (f"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {len(req)}\r\n"
            f"\r\n{req}")
    code, out, err = Context.adopt(node.contexts_dir, name).output(
        ["/tmp/uclient", "/run/planetlab/agent.sock"], input=http.encode(), timeout=120)
    assert code == 0, (out, err)
    try:
        (value,), _ = xmlrpc.client.loads(out.split(b"\r\n\r\n", 1)[-1])
    except xmlrpc.client.Fault as fault:
        return fault
    return value


def resign(plc: LiveServer, ticket: str, **changes: Any) -> str:
    """The ticket's content with `changes`, signed with PLC's own key (what PLC would
    sign, e.g. an expired ticket, or one for another node)."""
    payload = ticket.split(".")[1]
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(changes, nonce=os.urandom(16).hex())
    key = plc_tickets.load_key(Path(plc.db).parent / plc_tickets.KEY_FILE)
    return plc_tickets.sign(key, body)


def fault_of(value: Any) -> tuple[int, str]:
    assert isinstance(value, xmlrpc.client.Fault), value
    return value.faultCode, value.faultString


def test_management_slice_creates_and_destroys_a_delegated_sliver(
        plc: LiveServer, node: tuple[Site, Node]) -> None:
    site, n = node
    mgmt = site.add_slice("mgmt")
    other = site.add_slice("nodeleg")
    deleg = f"{site.login_base}_deleg"
    site.api.AddSlice(site.admin, {"name": deleg, "url": "http://agent.test/",
                                   "description": "delegated", "instantiation": "delegated"})
    site.api.AddPersonToSlice(site.admin, site.person_id, deleg)
    site.api.AddSliceTag(site.admin, deleg, "delegations", f"someone_else, {mgmt}")
    site.api.AddSliceTag(site.admin, deleg, "cpu_share", "5")
    site.api.AddSliceToNodes(site.admin, deleg, [site.node_id])
    agent = n.start_agent()
    n.agents.append(agent)  # type: ignore[attr-defined]
    wait_for(lambda: all(f"{s}: create done" in n.log_text() for s in (mgmt, other)), 90,
             "the plc-instantiated slivers", n.log_text)
    time.sleep(3)   # more polls: a delegated slice is never made by a poll alone
    assert sliver(n, deleg) is None

    # A slice that its delegations tag does not name may not Create it.
    code, text = fault_of(call_in(n, other, "Create", deleg))
    assert code == 108 and "no delegation rights" in text and other in text
    assert sliver(n, deleg) is None

    ticket = site.api.GetSliceTicket(site.admin, deleg)
    # Refused, each with its reason, and none of them spends anything.
    payload = ticket.split(".")[1]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    forged_raw = raw.replace(b'"cpu_share","value":"5"', b'"cpu_share","value":"500"')
    assert forged_raw != raw
    forged = ".".join([ticket.split(".")[0],
                       base64.urlsafe_b64encode(forged_raw).decode().rstrip("="),
                       ticket.split(".")[2]])
    code, text = fault_of(call_in(n, mgmt, "Ticket", forged))
    assert code == 102 and "forged" in text
    now = int(time.time())
    expired = resign(plc, ticket, issued=now - 7200, expiry=now - 3600)
    code, text = fault_of(call_in(n, mgmt, "Ticket", expired))
    assert code == 102 and "expired" in text
    elsewhere = resign(plc, ticket, nodes=[{"node_id": site.node_id + 1000,
                                            "hostname": "elsewhere.agent.test"}])
    code, text = fault_of(call_in(n, mgmt, "Ticket", elsewhere))
    assert code == 102 and "other-node" in text and "elsewhere.agent.test" in text
    assert sliver(n, deleg) is None

    # The valid ticket: the delegated sliver is made, by the reconciler, at once.
    assert call_in(n, mgmt, "Ticket", ticket) == 1
    s = sliver(n, deleg)
    assert s is not None and s["state"] == "running" and s["live"], s
    assert context_state(n, deleg)["limits"]["cpu_share"] == 5
    code, text = fault_of(call_in(n, mgmt, "Ticket", ticket))
    assert code == 102 and "replayed" in text

    # kill -9: the redeemed nonce survives; the sliver is adopted, not re-made.
    init_pid = context_state(n, deleg)["init_pid"]
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(10)
    again = n.start_agent()
    n.agents.append(again)  # type: ignore[attr-defined]
    wait_for(lambda: Path(n.cfg.socket_path).exists(), 30, "the restarted agent", n.log_text)
    time.sleep(3)   # a poll or two: PLC lists the delegated slice; the sliver stays
    assert context_state(n, deleg)["init_pid"] == init_pid
    code, text = fault_of(call_in(n, mgmt, "Ticket", ticket))
    assert code == 102 and "replayed" in text

    # Not the management slice's to destroy: a plc-instantiated sliver.
    code, text = fault_of(call_in(n, mgmt, "Destroy", other))
    assert code == 102 and "plc-instantiated" in text
    code, text = fault_of(call_in(n, other, "Destroy", deleg))
    assert code == 108
    # The management slice stops, starts and destroys it.
    assert call_in(n, mgmt, "Stop", deleg) == 1
    assert sliver(n, deleg)["state"] == "stopped"  # type: ignore[index]
    assert call_in(n, mgmt, "Start", deleg) == 1
    assert call_in(n, mgmt, "Destroy", deleg) == 1
    assert sliver(n, deleg) is None
    nothing_left(n, deleg)
    time.sleep(3)   # polls do not bring it back
    assert sliver(n, deleg) is None
    # A delegate may also Create it again from PLC's data, without a ticket.
    assert call_in(n, mgmt, "Create", deleg) == 1
    s = sliver(n, deleg)
    assert s is not None and s["state"] == "running", s
