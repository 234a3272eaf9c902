"""`make run NODES=N` (N > 1): N node agents on this machine, each in its own network
namespace joined to the host by a veth pair (10.21x.K.0/30 links, the host routing
between them), its own cgroup subtree, state and run directories, uid pool and node
key: the machinery of the multi-node test (tests/e2e/netnode.py), driven by
scripts/run_demo.py.

PLC listens on node 1's host-side address, which every node reaches. The nodes'
state lives in temporary directories that `close()` removes with everything else
(slivers, mounts, cgroups, namespaces, veths): unlike the single-node demo a second
run starts the nodes afresh, while PLC's database is reused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.netnode import AgentNode, Link, Plc

SENSORS_PORT = 3100


@dataclass
class Nodes:
    count: int
    links: list[Link] = field(default_factory=list)
    nodes: list[AgentNode] = field(default_factory=list)

    @property
    def plc_address(self) -> str:
        return self.links[0].host_addr

    def hostnames(self) -> list[str]:
        return [f"node{i}.planetlab.test" for i in range(1, self.count + 1)]

    def make_links(self) -> None:
        for i in range(1, self.count + 1):
            self.links.append(Link.create(os.getpid(), i))

    def start(self, plc_workdir: Path, plc_port: int, prefix: str, admin: str,
              uid_pool_start: int, serves_sensors: bool) -> None:
        plc = Plc(plc_workdir, self.plc_address, plc_port, prefix, admin)
        for i, (link, hostname) in enumerate(zip(self.links, self.hostnames(), strict=True), 1):
            tables = f'[bandwidth]\ninterfaces = ["{link.node_if}"]\n'
            if serves_sensors:
                tables += f'[sensors]\nlisten = "{link.node_addr}:{SENSORS_PORT}"\n'
            node = AgentNode.create(i, link, plc, hostname, tables)
            self.nodes.append(node)
            text = node.cfg_path.read_text()
            # The demo's uid pool, 4 ranges per node (never a real agent's uids).
            start = uid_pool_start + (i - 1) * 4 * 65536
            node.cfg_path.write_text(re.sub(r"(?m)^uid_pool_start = .*$",
                                            f"uid_pool_start = {start}", text, count=1))
            node.start_agent()

    def close(self) -> list[str]:
        errors = []
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # noqa: BLE001 - clean up the rest, then report
                errors.append(str(exc))
        for link in self.links:
            link.close()
        return errors
