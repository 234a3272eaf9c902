"""Bandwidth shaping wired into a real agent (issue 10): a veth into a netns sink is
the shaped interface, a real `plc serve` gives a slice a `net_max_rate`, and the
sliver's traffic is measured at the sink's end of the wire. Also: RawSend packets,
which the agent sends from its own socket, are billed to the slice's class."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_node import (
    LiveServer,
    Site,
    cleanup_node,
    make_node,
    plc_server,
    wait_for,
    with_bandwidth,
)

from agent.ports import PortRange, PortTable
from agent.rawsock import RawSockets
from agent.sliceapi import client
from kernel import ebpf, netclass, tc

pytestmark = pytest.mark.kernel

PID = os.getpid()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "kernel"))   # tests/kernel/bwnet.py
from bwnet import WIRE_V4, WIRE_V6, veth_netns  # noqa: E402

M = 1_000_000


def peer_of(net: Any) -> str:
    """bwnet.veth_netns' name for the netns end (`tag` is what follows "bw")."""
    return f"bwp{net.ns[2:-len(str(PID))]}{PID}"[:15]


def rx_bytes(net: Any) -> int:
    """Bytes the sink's end of the veth received (the wire, Ethernet header included)."""
    out = subprocess.run(["ip", "-n", net.ns, "-s", "-j", "link", "show", peer_of(net)],
                         capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout)[0]["stats64"]["rx"]["bytes"])


def sliver_classes(ifname: str) -> dict[int, tc.ClassInfo]:
    return {c.minor: c for c in tc.dump_classes(socket.if_nametoindex(ifname))
            if tc.is_sliver_minor(c.minor)}


# --- RawSend: packets the agent sends for a slice ------------------------------------

def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


def _ipv6(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


def test_raw_send_is_billed_to_the_slice_class() -> None:
    with veth_netns("r") as net, tc.Shaper(net.host) as sh:
        host4 = net.sink4.rsplit(".", 1)[0] + ".1"
        host6 = net.sink6.rsplit(":", 1)[0] + ":1"
        sh.ensure_root(node_rate=100 * M, link_rate=1000 * M)
        sh.ensure_sliver(0x70, tc.ClassSpec(100_000, 10 * M), tc.ClassSpec(100_000, 10 * M))
        table = PortTable([host4, host6], (32768, 60999))
        table.grant("a", [PortRange("icmp", 77, 77), PortRange("udp", 5555, 5555)])
        table.grant("b", [PortRange("udp", 5556, 5556)])
        raw = RawSockets(lambda: table)
        raw.priority_of = {"a": tc.handle(tc.MAJOR, 0x70)}.get
        try:
            echo = struct.pack("!BBHHH", 8, 0, 0, 77, 1) + b"ping"
            echo6 = struct.pack("!BBHHH", 128, 0, 0, 77, 1) + b"ping"
            udp = struct.pack("!HHHH", 5555, 9, 8 + 100, 0) + b"u" * 100
            sent = [_ipv4(host4, net.sink4, 1, echo), _ipv6(host6, net.sink6, 58, echo6),
                    _ipv4(host4, net.sink4, 17, udp)]
            for pkt in sent:
                assert raw.raw_send("a", pkt) == len(pkt)
            # A slice without a class goes to the default class, not a's.
            other = _ipv4(host4, net.sink4, 17, struct.pack("!HHHH", 5556, 9, 12, 0) + b"b" * 4)
            raw.raw_send("b", other)
        finally:
            raw.close()
        time.sleep(0.3)
        got = sliver_classes(net.host)[0x70]
        assert got.packets == 3 and got.bytes == sum(len(p) + 14 for p in sent)


# --- the agent -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"agent-bw-plc-{PID}")) as srv:
        yield srv


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"bwprobe{PID}") / "bwprobe"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(HERE / "bwprobe.c")],
                   check=True, timeout=120, capture_output=True)
    return out


def get_bandwidth_inside(ctx: Any) -> dict[str, Any]:
    req = xmlrpc.client.dumps(("someone_else",), "GetBandwidth")
    http = (f"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {len(req)}\r\n"
            f"\r\n{req}")
    code, out, err = ctx.output(["/tmp/bwprobe", "api", "/run/planetlab/agent.sock"],
                                input=http.encode(), timeout=30)
    assert code == 0, (out, err)
    (answer,), _ = xmlrpc.client.loads(out.split(b"\r\n\r\n", 1)[-1])
    return answer


def test_agent_shapes_bills_adopts_and_cleans_up(plc: LiveServer, probe: Path) -> None:
    from kernel.context import Context

    site = Site(plc)
    agents: list[subprocess.Popen[bytes]] = []
    with veth_netns("a") as net:
        node = with_bandwidth(make_node(plc, site.hostname), net.host)
        try:
            name = site.add_slice("bw", net_max_rate="8000")        # kbit/s
            agents.append(node.start_agent())
            wait_for(lambda: f"{name}: create done" in node.log_text(), 60, "the sliver",
                     node.log_text)
            ctx = Context.adopt(node.contexts_dir, name)
            group = ctx.cgroup.v2_dir()
            assert group is not None
            fd = ebpf.cgroup_fd(group)
            try:
                (prog_id,) = ebpf.prog_query(fd, ebpf.CGROUP_INET_EGRESS)
            finally:
                os.close(fd)
            with ebpf.prog_fd_by_id(prog_id) as prog:
                prog_name = ebpf.prog_info(prog).name
            assert prog_name.startswith(netclass.CLASSIFY_PREFIX)
            minor = int(prog_name[len(netclass.CLASSIFY_PREFIX):], 16)
            classes = sliver_classes(net.host)
            assert set(classes) == {minor, minor | tc.EXEMPT_BIT}
            assert classes[minor].ceil == 8 * M
            dest = Path(ctx.root) / "tmp" / "bwprobe"
            dest.write_bytes(probe.read_bytes())
            dest.chmod(0o755)

            # Flat out from inside: the wire sees the ceiling (within 2 %).
            flood = threading.Thread(target=ctx.output, args=(
                ["/tmp/bwprobe", "flood", "4", net.sink4, "3.5"],), kwargs={"timeout": 30})
            flood.start()
            time.sleep(1.0)
            b0, t0 = rx_bytes(net), time.monotonic()
            time.sleep(2.0)
            b1, t1 = rx_bytes(net), time.monotonic()
            flood.join()
            assert (b1 - b0) * 8 / (t1 - t0) == pytest.approx(8 * M, rel=0.02)
            assert sliver_classes(net.host)[minor].drops > 0

            # IPv6 and IPv4 UDP land in its class, packet for packet.
            time.sleep(0.2)
            before = sliver_classes(net.host)[minor]
            for fam, dst in (("6", net.sink6), ("4", net.sink4)):
                code, out, err = ctx.output(["/tmp/bwprobe", "count", fam, dst, "10"], timeout=30)
                assert code == 0, (out, err)
            time.sleep(0.2)
            after = sliver_classes(net.host)[minor]
            assert after.packets - before.packets == 20
            assert after.bytes - before.bytes == 10 * (WIRE_V6 + WIRE_V4)

            # GetBandwidth from inside answers the sliver's own figures (a forged
            # name is ignored); the admin names it; status --json shows it.
            time.sleep(1.5)                          # an accounting pass (sample_s 1)
            mine = get_bandwidth_inside(ctx)
            assert mine["name"] == name and mine["ceil"] == 8 * M
            assert int(mine["bytes"]) >= after.bytes and mine["drops"] > 0
            admin: Any = client(str(node.cfg.socket_path)).GetBandwidth(name)
            assert admin["name"] == name and int(admin["bytes"]) >= int(mine["bytes"])
            st = subprocess.run(node.agent_argv("status", "--json"), capture_output=True,
                                text=True, timeout=60)
            (item,) = [s for s in json.loads(st.stdout)["slivers"] if s["name"] == name]
            assert item["bandwidth"]["ceil"] == 8 * M
            assert item["bandwidth"]["bytes"] == admin["bytes"] or \
                int(item["bandwidth"]["bytes"]) >= int(admin["bytes"])

            # kill -9, restart: the same class (counters not reset), the ledger kept.
            os.killpg(agents[0].pid, signal.SIGKILL)
            agents[0].wait(10)
            held = sliver_classes(net.host)[minor]
            agents.append(node.start_agent())
            wait_for(lambda: node.log_text().count(f"{name}: adopt done") == 1, 30,
                     "the restarted agent", node.log_text)
            node.wait_api()
            time.sleep(2.5)                          # adopted and one pass done
            again = sliver_classes(net.host)[minor]
            assert again.packets >= held.packets and again.ceil == 8 * M
            assert int(get_bandwidth_inside(ctx)["bytes"]) >= int(mine["bytes"])

            # A rate change changes the class in place.
            site.set_tag(name, "net_max_rate", "4000")
            os.killpg(agents[-1].pid, signal.SIGUSR1)
            wait_for(lambda: sliver_classes(net.host)[minor].ceil == 4 * M, 30,
                     "the new ceiling", node.log_text)
            assert sliver_classes(net.host)[minor].packets >= again.packets

            # Destroy: no class, no program, no cgroup.
            site.api.DeleteSliceFromNodes(site.admin, name, [site.node_id])
            os.killpg(agents[-1].pid, signal.SIGUSR1)
            wait_for(lambda: f"{name}: destroy done" in node.log_text(), 60, "the destroy",
                     node.log_text)
            assert sliver_classes(net.host) == {}
            assert not group.exists()
            wait_for(lambda: prog_id not in ebpf.prog_ids(), 10, "the program to be freed")
            assert "accounting pass failed" not in node.log_text()
        finally:
            cleanup_node(node, agents)
