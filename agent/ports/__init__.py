"""Port ownership (docs/guard.md "Ports", "Module map"):

- `table`: the port table itself, pure and sans-IO (who owns which port; may this
  bind happen), and the `ports` tag syntax;
- `store`: the table with persistence (`PortService`, `StatePortStore`);
- `host`: the ports the host holds, never granted to a slice (F30).
"""

from agent.ports.host import (
    HOST_SERVICE,
    HostPortError,
    HostPorts,
    fixed_host_ports,
    is_loopback_url,
    local_addresses,
    plc_port,
    state_uid_owner,
)
from agent.ports.store import PortService, PortStore, StatePortStore
from agent.ports.table import (
    FIRST_UNPRIVILEGED,
    LOOPBACK4,
    LOOPBACK6,
    PROTOCOLS,
    BindDecision,
    Key,
    PortConflict,
    PortError,
    PortRange,
    PortTable,
    format_ports_tag,
    normalize_address,
    parse_ports_tag,
    read_ephemeral_range,
)

__all__ = [
    "FIRST_UNPRIVILEGED", "HOST_SERVICE", "LOOPBACK4", "LOOPBACK6", "PROTOCOLS",
    "BindDecision", "HostPortError", "HostPorts", "Key", "PortConflict", "PortError",
    "PortRange", "PortService", "PortStore", "PortTable", "StatePortStore",
    "fixed_host_ports", "format_ports_tag", "is_loopback_url", "local_addresses",
    "normalize_address", "parse_ports_tag", "plc_port", "read_ephemeral_range",
    "state_uid_owner",
]
