"""The node sensor server as a task of the real agent (issue 11, docs/sensors.md):
`[sensors] listen` in agent.toml, the server's port held by the host (never granted
to a slice), and a running `planetlab-agent run` answering GETs with its slivers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from agent_node import (
    LiveServer,
    Site,
    cleanup_node,
    free_tcp_port,
    make_node,
    plc_server,
    wait_for,
)

from agent import config
from agent.faults import APIFault
from agent.main import make_guard
from agent.ports import HOST_SERVICE
from agent.state import State

pytestmark = pytest.mark.kernel

PID = os.getpid()


class Caller(NamedTuple):
    kind: str
    name: str
    pid: int = 1
    uid: int = 1


def test_sensors_listen_default_render_and_errors(tmp_path: Path) -> None:
    assert config.defaults().sensors_at == ("0.0.0.0", 3100)
    path = config.write_default(tmp_path / "agent.toml",
                                {"sensors": {"listen": "[::1]:3999"}})
    assert "[sensors]" in path.read_text()
    assert config.load(path).sensors_at == ("::1", 3999)
    assert config.load(config.write_default(tmp_path / "b.toml")).sensors_at == \
        ("0.0.0.0", 3100)
    for table, words in (({"listen": "nowhere:80"}, ["[sensors] listen", "IP address"]),
                         ({"listen": "127.0.0.1:70000"}, ["[sensors] listen", "range"]),
                         ({"listen": 3100}, ["[sensors] listen"]),
                         ({"port": 3100}, ["[sensors]", "'port'", "known: listen"]),
                         ("0.0.0.0:3100", ["'sensors' must be a table"])):
        with pytest.raises(config.ConfigError) as info:
            config.from_mapping({"sensors": table}, "x.toml")
        assert all(w in str(info.value) for w in ["x.toml", *words]), info.value


def test_sensor_port_is_never_granted_to_a_slice(tmp_path: Path) -> None:
    """The agent's own guard (make_guard over agent.toml) refuses ReservePort of the
    sensor port on every address, even while nothing listens there."""
    port = free_tcp_port()
    cfg = config.from_mapping({
        "plc_url": "http://127.0.0.1:9/PLCAPI/", "state_dir": str(tmp_path / "state"),
        "run_dir": str(tmp_path / "run"), "sensors": {"listen": f"127.0.0.1:{port}"}})
    state = State.open(cfg.state_dir)
    guard = make_guard(cfg, state)
    try:
        for spec in (f"tcp:{port}", f"tcp:{port}@127.0.0.1", f"tcp:{port - 1}-{port + 1}"):
            with pytest.raises(APIFault) as exc:
                guard.api.ReservePort(Caller("sliver", "a"), spec)
            assert exc.value.code == 102, exc.value
            assert HOST_SERVICE in exc.value.message and "sensor" in exc.value.message
    finally:
        guard.raw.close()
        state.close()


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"agent-sensors-plc-{PID}")) as srv:
        yield srv


def get(port: int, path: str) -> tuple[int, bytes, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read(), r.headers


async def collect(port: int, hostname: str, db: Path) -> dict[str, Any]:
    """Two rounds of the central collector polling the agent's sensor server: what it
    stored for the node and the sliver, and the /query slices table."""
    from sensors import query
    from sensors.collecthttp import Request
    from sensors.collector import Collector, Config, NodeEntry
    from sensors.tsstore import TSStore

    store = await TSStore.open_path(str(db))
    try:
        col = Collector(Config(db=str(db), timeout=10.0,
                               nodes=[NodeEntry(hostname, "127.0.0.1", port, "s")]), store)
        for _ in range(2):
            await col.poll_round()
            await asyncio.sleep(1.2)    # a new snapshot (ttl 1 s) for the second round
        st = col.nodes[hostname]
        (sliver,) = st.slices
        r = await query.handle_query(col, Request("GET", "/query", {"table": "slices",
                                                                  "select": "name"}))
        return {"node": {**store.latest_values("node")[hostname], **st.info},
                "sliver": store.latest_values("slice")[f"{sliver['name']}@{hostname}"],
                "slices": [row["name"] for row in json.loads(r.body)]}
    finally:
        await store.close()


def test_running_agent_serves_its_slivers(plc: LiveServer) -> None:
    site = Site(plc)
    name = site.add_slice("sens")
    slice_id = site.api.GetSlices(site.admin, [name], ["slice_id"])[0]["slice_id"]
    node = make_node(plc, site.hostname)
    port = node.cfg.sensors_at[1]
    agents: list[subprocess.Popen[bytes]] = []
    try:
        agents.append(node.start_agent())

        def listed() -> dict[str, Any] | None:
            try:
                _, body, _ = get(port, "/slices?format=json")
            except OSError:
                return None
            rec = json.loads(body)["slices"].get(name)
            return rec if rec and rec.get("state") == "running" else None
        rec = wait_for(listed, 120, f"{name} running on the sensor server", node.log_text)
        assert rec["slice_id"] == slice_id
        assert rec["processes"] >= 1 and rec["cpu_seconds_total"] >= 0
        assert rec["memory_bytes"] > 0
        status, body, headers = get(port, "/slicestat")
        assert status == 200 and float(headers["X-Snapshot-Time"]) > 0
        line = next(ln for ln in body.decode().splitlines() if ln.startswith(name + ","))
        assert line.split(",")[1] == str(slice_id)
        _, body, _ = get(port, "/metrics")
        assert f'planetlab_sliver_info{{slice="{name}",state="running"}} 1' in body.decode()
        _, body, _ = get(port, "/sensors/node?format=json")
        assert json.loads(body)["load.load1"] >= 0
        stored = asyncio.run(collect(port, site.hostname, node.base / "collector.db"))
        assert stored["node"]["up"] == 1.0 and stored["node"]["mem_total"] > 0
        assert stored["node"]["kernel"] == os.uname().release
        sliver_row = stored["sliver"]
        assert sliver_row["procs"] >= 1 and sliver_row["mem_bytes"] > 0
        assert "cpu_pct" in sliver_row and sliver_row["cpu_s"] >= 0, sliver_row
        assert stored["slices"] == [name]
        assert agents[0].poll() is None
    finally:
        cleanup_node(node, agents)
