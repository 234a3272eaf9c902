"""agent.toml: the node agent's configuration, read with tomllib, written with tomli-w.

Every key is declared once in `FIELDS` (type, default, allowed range, help text); the
same table drives validation, the defaults and the commented file `init-config` writes.
A bad key or value stops the agent with a `ConfigError` naming the file, the key and
what is allowed, before anything privileged happens.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from agent.bandwidth import BandwidthConfig, BandwidthConfigError
from agent.bandwidth import parse_config as parse_bandwidth
from agent.ports import PortError, is_loopback_url, parse_ports_tag
from agent.sensorsource import SensorConfigError, parse_listen

DEFAULT_CONFIG = "/etc/planetlab/agent.toml"
# Where the agent installs the slice login shells (never a checkout: an account's
# shell must outlive a moved or deleted source tree, and be writable by root only).
SYSTEM_SHELL_DIR = "/usr/local/lib/planetlab"
MIN_STORE_KIB = 256 * 1024   # kernel.disk.MIN_STORE_KIB: mkfs.btrfs needs ~114 MiB
DEFAULT_STATE_DIR = "/var/lib/planetlab"
DEFAULT_RUN_DIR = "/run/planetlab"
DEFAULT_SOCKET = "/run/planetlab/agent.sock"
# One directory name in every cgroup hierarchy; no dot, so never a cgroupfs control file.
CGROUP_PARENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\Z")
# [sensors] listen: the node sensor server (docs/sensors.md); 3100 is slicestat's port.
DEFAULT_SENSORS_LISTEN = "0.0.0.0:3100"
#: the keys of the `[sensors]` table
SENSORS_KEYS = ("listen",)
SENSORS_LISTEN_HELP = ("the node sensor server (slicestat, /metrics; docs/sensors.md) "
                       "listens on \"ADDR:PORT\" (\"[v6addr]:PORT\"); its port is the "
                       "host's: no slice may own it")


class ConfigError(ValueError):
    """A configuration file or value is unusable; the message says where and why."""


@dataclass(frozen=True)
class Field:
    name: str
    type: type
    default: Any
    help: str
    minimum: int | float | None = None
    maximum: int | float | None = None
    optional: bool = False  # may be absent from the file and None in the config


FIELDS: tuple[Field, ...] = (
    Field("plc_url", str, "https://localhost/PLCAPI/",
          "PLC's XML-RPC endpoint (https://; http:// only to loopback, or with "
          "insecure_plc = 1)"),
    Field("insecure_plc", int, 0, "1: allow a plain http:// plc_url to a host that is not "
          "loopback (the node session and every slice's keys and initscripts then cross "
          "the network in clear; warned at every start)", minimum=0, maximum=1),
    Field("plc_clock_skew", int, 300, "seconds a GetSlivers reply's timestamp may be ahead "
          "of this node's clock; a reply further ahead is refused", minimum=0,
          maximum=86400),
    Field("hostname", str, "", "this node's hostname as PLC knows it (empty: the machine's FQDN)"),
    Field("key_file", str, "",
          "file with the node key: the bare key `plc node-key` prints, or NODE_ID= and "
          "NODE_KEY= lines (plnode.txt); empty to use node_id and node_key below"),
    Field("node_id", int, 0, "node id at PLC (0: looked up by hostname)", minimum=0),
    Field("node_key", str, "", "node key (used when key_file is empty)"),
    Field("ca_file", str, "", "CA bundle that PLC's TLS certificate must verify against "
          "(empty: the system's CAs)"),
    Field("state_dir", str, DEFAULT_STATE_DIR, "persistent state: agent.db, session, images, roots"),
    Field("run_dir", str, DEFAULT_RUN_DIR, "runtime state of running contexts"),
    Field("socket_path", str, DEFAULT_SOCKET, "the slice API Unix socket"),
    Field("poll_interval", int, 600, "seconds between two GetSlivers polls", minimum=1,
          maximum=86400),
    Field("poll_jitter", int, 300, "random extra seconds [0, poll_jitter) added to each wait",
          minimum=0, maximum=86400),
    Field("reconcile_interval", int, 60, "seconds between two local reconciles (a sliver "
          "that died is brought back without waiting for PLC)", minimum=1, maximum=86400),
    Field("plc_timeout", int, 60, "seconds before a call to PLC is given up", minimum=1,
          maximum=3600),
    Field("backoff_max", int, 600, "longest wait between retries while PLC is failing",
          minimum=1, maximum=86400),
    Field("default_image", str, "default", "image of a slice that has no vref tag"),
    Field("slice_prefix", str, "pl", "PLC_SLICE_PREFIX: <prefix>_default holds node-wide "
          "resource overrides"),
    Field("uid_pool_start", int, 1_000_000, "first host uid of the pool sliver uid ranges "
          "come from", minimum=65536, maximum=2**31),
    Field("uid_range_size", int, 65536, "uids per sliver", minimum=1, maximum=2**24),
    Field("uid_pool_ranges", int, 30000, "number of sliver uid ranges in the pool", minimum=1,
          maximum=2**20),
    Field("concurrency", int, 8, "slivers created or changed at the same time", minimum=1,
          maximum=256),
    Field("api_rate", float, 20.0, "slice API calls per second allowed to one slice (refill)",
          minimum=0.001, maximum=1e6),
    Field("api_burst", int, 40, "slice API calls one slice may make in a burst", minimum=1,
          maximum=1_000_000),
    Field("api_max_request", int, 1 << 20, "largest slice API request in bytes", minimum=1024,
          maximum=64 << 20),
    Field("sliver_socket_dir", str, "/run/planetlab",
          "where the API socket's directory appears inside every sliver"),
    Field("node_accounts", str, "root,site_admin",
          "local users whose authorized_keys follow GetSlivers `accounts` (comma list; "
          "empty: none)"),
    Field("ssh_shell", str, "", "login shell of slice host accounts (empty: the agent's "
          f"own vsh, which it installs at every start as {SYSTEM_SHELL_DIR}/vsh beside "
          "forward_api_calls)"),
    Field("guard", int, 1, "1: every sliver runs under the seccomp guard, and the agent "
          "decides its binds from the port table; 0: no guard", minimum=0, maximum=1),
    Field("addresses", str, "", "the node's addresses for the port table, comma separated "
          "(loopback is always there); an address as `ip addr` prints it, 192.0.2.7/24, "
          "counts as 192.0.2.7"),
    Field("disk_store_kib", int, 0, "KiB of the node's layer store: one sparse btrfs image "
          "under state_dir/roots holding every sliver's files (each sliver limited by its "
          "disk_max). 0: 32 GiB, or half the free space when that is less. A larger value "
          "grows the store at the next sliver creation; shrinking is refused",
          minimum=0, maximum=1 << 40),
    Field("reserved_ports", str,
          "tcp:22,tcp:25,tcp:53,udp:53,udp:67-68,tcp:111,udp:111,udp:123,udp:161-162,"
          "tcp:179,udp:323,udp:514",
          "host ports no slice may own, neither by PLC `ports` tag nor by ReservePort "
          "(the ports tag syntax PROTO:PORT[-PORT][@ADDRESS], comma separated)"),
    Field("host_accounts", int, 1, "1: every slice gets a host account whose login shell "
          "enters its sliver (`ssh SLICE@node`); 0: none", minimum=0, maximum=1),
    Field("account_home_base", str, "/home", "where slice host accounts' homes are made"),
    Field("sockets_max", int, 1024,
          "INET sockets (TCP, UDP, v4 and v6) one sliver may hold open at once, counted "
          "in the kernel (kernel/sockcap.py), unless its slice or the <prefix>_default "
          "slice has a sockets_max tag; 0: no cap. Keep (slivers x cap) well below the "
          "node's ephemeral port range (28,232 ports by default)",
          minimum=0, maximum=1_048_576),
    Field("cgroup_parent", str, "planetlab",
          "the node-wide cgroup every sliver's groups go under, in each hierarchy (one "
          "name: letters, digits, _ or -); two agents on one kernel need different ones"),
    # Defaults every sliver gets unless its tags say otherwise (F34, issue 8 item 3).
    Field("sliver_mem_max", int, 1024, "MiB of memory a sliver may use unless its mem_max "
          "tag says otherwise (its /dev/shm is half of it)", minimum=16, maximum=2**32),
    Field("sliver_nofile", int, 4096, "open files per process in a sliver (soft and hard) "
          "unless its nofile_*/openfd_* tags say otherwise", minimum=64, maximum=1 << 20),
    # What the node keeps for itself above all slivers together (F41).
    Field("node_pids_headroom", int, 4096, "tasks below the kernel's pid_max that slivers "
          "together may never take", minimum=256, maximum=1 << 22),
    Field("node_mem_headroom", int, 1024, "MiB of RAM that slivers together may never "
          "take", minimum=64, maximum=2**32),
    Field("cpu_headroom_pct", int, 10, "percent of the node's CPU (of the cores not "
          "reserved whole by cpu_cores) that cpu_pct reservations together may never take: "
          "the host's own share; a reservation beyond it is refused and the sliver runs "
          "best-effort (docs/cpu.md)", minimum=0, maximum=99),
    Field("plc_ticket_key", str, "", "PLC's slice ticket public key: base64 of its 32 bytes "
          "(`plc ticket-key` prints it) or the absolute path of a file holding that; empty: "
          "fetched from PLC (GetTicketKey) on first use and pinned (docs/tickets.md)"),
)

_BY_NAME = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class AgentConfig:
    plc_url: str
    insecure_plc: int
    plc_clock_skew: int
    hostname: str
    key_file: str
    node_id: int
    node_key: str
    ca_file: str
    state_dir: str
    run_dir: str
    socket_path: str
    poll_interval: int
    poll_jitter: int
    reconcile_interval: int
    plc_timeout: int
    backoff_max: int
    default_image: str
    slice_prefix: str
    uid_pool_start: int
    uid_range_size: int
    uid_pool_ranges: int
    concurrency: int
    api_rate: float
    api_burst: int
    api_max_request: int
    sliver_socket_dir: str
    node_accounts: str
    ssh_shell: str
    guard: int
    addresses: str
    reserved_ports: str
    host_accounts: int
    account_home_base: str
    cgroup_parent: str
    sliver_mem_max: int
    sliver_nofile: int
    node_pids_headroom: int
    node_mem_headroom: int
    sockets_max: int = 1024
    plc_ticket_key: str = ""
    # [bandwidth] table (agent/bandwidth.py): HTB shaping is off while it names no
    # interface.
    bandwidth: BandwidthConfig = BandwidthConfig()
    disk_store_kib: int = 0
    cpu_headroom_pct: int = 10
    # [sensors] table: listen = "ADDR:PORT" of the node sensor server.
    sensors_listen: str = DEFAULT_SENSORS_LISTEN
    source: str = "<defaults>"

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def effective_hostname(self) -> str:
        return self.hostname or socket.getfqdn()

    @property
    def sensors_at(self) -> tuple[str, int]:
        """(host, port) the node sensor server listens on."""
        return parse_listen(self.sensors_listen, self.source)

    @property
    def shell_path(self) -> str:
        """The login shell of slice host accounts."""
        return self.ssh_shell or f"{SYSTEM_SHELL_DIR}/vsh"

    @property
    def controller_shell_path(self) -> str:
        """The login shell of controller slices' host accounts (nm-controller): it
        forwards one XML-RPC request from ssh to the agent socket."""
        return str(Path(self.shell_path).parent / "forward_api_calls")

    @property
    def sliver_defaults(self) -> dict[str, int]:
        """The rspec layer below every tag (agent.rspec.resolve `node_defaults`)."""
        return {"mem_max": self.sliver_mem_max * 1024, "nofile": self.sliver_nofile,
                "sockets_max": self.sockets_max}

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)


def _check(source: str, name: str, value: Any) -> Any:
    """Check one key's value against its declaration; returns the value normalised."""
    field = _BY_NAME.get(name)
    if field is None:
        allowed = ", ".join(sorted(_BY_NAME))
        raise ConfigError(f"{source}: unknown key {name!r}; allowed keys: {allowed}")
    expected = field.type
    ok = isinstance(value, expected) and not isinstance(value, bool)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(
            f"{source}: key {name!r} must be {expected.__name__}, got "
            f"{type(value).__name__} {value!r}"
        )
    if field.minimum is not None and value < field.minimum:
        raise ConfigError(f"{source}: key {name!r} = {value!r} is below the minimum {field.minimum}")
    if field.maximum is not None and value > field.maximum:
        raise ConfigError(f"{source}: key {name!r} = {value!r} is above the maximum {field.maximum}")
    if name == "plc_url" and not value.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: key 'plc_url' = {value!r} must start with http:// or https://")
    if name in ("state_dir", "run_dir", "socket_path", "sliver_socket_dir",
                "account_home_base") and not value.startswith("/"):
        raise ConfigError(f"{source}: key {name!r} = {value!r} must be an absolute path")
    if name == "reserved_ports":
        try:
            parse_ports_tag(value)
        except PortError as exc:
            raise ConfigError(f"{source}: key 'reserved_ports' = {value!r}: {exc}") from None
    if name == "slice_prefix" and (not value or not value.replace("_", "").isalnum()):
        raise ConfigError(f"{source}: key 'slice_prefix' = {value!r} must be letters, digits or _")
    if name == "addresses":
        value = check_addresses(source, value)
    if name == "plc_ticket_key" and value and not value.startswith("/"):
        from agent.tickets import TicketError, parse_public_key

        try:
            parse_public_key(value)
        except TicketError as exc:
            raise ConfigError(f"{source}: key 'plc_ticket_key' = {value!r}: {exc}; give the "
                              "base64 `plc ticket-key` prints, or an absolute path") from None
    if name == "disk_store_kib" and 0 < value < MIN_STORE_KIB:
        raise ConfigError(f"{source}: key 'disk_store_kib' = {value}: a layer store needs "
                          f"at least {MIN_STORE_KIB} KiB (or 0 for the default size)")
    if name == "cgroup_parent" and not CGROUP_PARENT_RE.match(value):
        raise ConfigError(f"{source}: key 'cgroup_parent' = {value!r} must be one cgroup name: "
                          "1 to 64 letters, digits, _ or - (not starting with -)")
    return value


def check_addresses(source: str, value: str) -> str:
    """The `addresses` key normalised: each item an IP address, or one as `ip addr`
    prints it (ADDRESS/PREFIX, whose prefix is dropped); anything else is refused
    naming the item."""
    out: list[str] = []
    for item in (a.strip() for a in value.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_interface(item).ip))
        except ValueError:
            raise ConfigError(
                f"{source}: key 'addresses': {item!r} is not an IP address of this node "
                "(give addresses like 192.0.2.7 or 2001:db8::7, comma separated; "
                "192.0.2.7/24 as `ip addr` prints it is taken as 192.0.2.7)") from None
    return ",".join(dict.fromkeys(out))


def _sensors_table(source: str, table: Any) -> str:
    """The `[sensors]` table's `listen`, checked (the default when absent)."""
    if table is None:
        return DEFAULT_SENSORS_LISTEN
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'sensors' must be a table ([sensors])")
    for key in table:
        if key not in SENSORS_KEYS:
            raise ConfigError(f"{source}: [sensors] has no key {key!r} (known: "
                              f"{', '.join(SENSORS_KEYS)})")
    listen = table.get("listen", DEFAULT_SENSORS_LISTEN)
    try:
        parse_listen(listen, source)
    except SensorConfigError as exc:
        raise ConfigError(str(exc)) from None
    return str(listen).strip()


def from_mapping(data: dict[str, Any], source: str = "<mapping>") -> AgentConfig:
    values: dict[str, Any] = {f.name: f.default for f in FIELDS}
    data = dict(data)
    table = data.pop("bandwidth", None)
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{source}: 'bandwidth' must be a table ([bandwidth])")
    try:
        values["bandwidth"] = parse_bandwidth(table, source)
    except BandwidthConfigError as exc:
        raise ConfigError(str(exc)) from None
    values["sensors_listen"] = _sensors_table(source, data.pop("sensors", None))
    for name, value in data.items():
        values[name] = _check(source, name, value)
    if values["plc_url"].startswith("http://") and not values["insecure_plc"] \
            and not is_loopback_url(values["plc_url"]):
        raise ConfigError(f"{source}: key 'plc_url' = {values['plc_url']!r}: plain http:// "
                          "to a host that is not loopback would send the node session and "
                          "every slice's keys and initscripts in clear; use https://, or "
                          "set insecure_plc = 1 to accept that (F19, F30)")
    return AgentConfig(**values, source=source)


def load(path: str | Path) -> AgentConfig:
    """Read and validate agent.toml; ConfigError names the file and key on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data, str(path))


def defaults() -> AgentConfig:
    return from_mapping({}, "<defaults>")


def render(overrides: dict[str, Any] | None = None) -> str:
    """A commented agent.toml with every key at its default or the given override."""
    overrides = dict(overrides or {})
    sensors_listen = _sensors_table("<init-config>", overrides.pop("sensors", None))
    for name, value in overrides.items():
        _check("<init-config>", name, value)
    lines = ["# planetlab-agent configuration (agent.toml).",
             "# Every key is optional; the value shown is the default unless set by init-config.",
             ""]
    for field in FIELDS:
        value = overrides.get(field.name, field.default)
        bounds = ""
        if field.minimum is not None and field.maximum is not None:
            bounds = f" [{field.minimum} .. {field.maximum}]"
        elif field.minimum is not None:
            bounds = f" [at least {field.minimum}]"
        lines.append(f"# {field.help}{bounds}")
        lines.append(tomli_w.dumps({field.name: value}).rstrip("\n"))
        lines.append("")
    lines.extend(_render_bandwidth())
    lines += ["[sensors]", f"# {SENSORS_LISTEN_HELP}",
              tomli_w.dumps({"listen": sensors_listen}).rstrip("\n"), ""]
    return "\n".join(lines)


def _render_bandwidth() -> list[str]:
    """The [bandwidth] table (agent/bandwidth.py) at its defaults, commented."""
    bw = BandwidthConfig()
    return [
        "[bandwidth]",
        "# egress interfaces shaped by HTB (docs/bandwidth.md); empty: no shaping",
        f"interfaces = {list(bw.interfaces)!r}",
        "# the node's cap in bit/s; 0: PLC's interface bwlimit, else link_rate",
        f"node_rate = {bw.node_rate}",
        "# bit/s of the link: the exempt tree's and the link class's rate",
        f"link_rate = {bw.link_rate}",
        "# destinations (IPv4/IPv6 CIDRs) shaped by the net_i2_* tags instead",
        f"exempt = {list(bw.exempt)!r}",
        "# seconds between accounting passes",
        f"sample_s = {bw.sample_s!r}",
        "# seconds of a daily-budget period",
        f"period_s = {bw.period_s}",
        "",
    ]


def write_default(path: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    text = render(overrides)
    if path.exists():
        raise ConfigError(f"{path}: already exists; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_node_key(cfg: AgentConfig) -> tuple[int, str]:
    """(node_id, node_key) from key_file or the config.

    key_file is either plnode.txt style (NODE_ID="7" and NODE_KEY="..." lines) or the
    bare key `plc node-key` prints; with a bare key the node id is the config's
    node_id, and 0 means "ask PLC for the id of `hostname`" (the caller does that).
    """
    if not cfg.key_file:
        if not cfg.node_key:
            raise ConfigError(f"{cfg.source}: set key_file, or node_key (and node_id)")
        return cfg.node_id, cfg.node_key
    path = Path(cfg.key_file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{cfg.source}: key 'key_file' = {cfg.key_file!r}: {exc.strerror}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) == 1 and "=" not in lines[0].rstrip("="):
        return cfg.node_id, lines[0]
    found: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition("=")
        found[key.strip().upper()] = value.strip().strip("'\"")
    try:
        node_id = int(found["NODE_ID"])
        node_key = found["NODE_KEY"]
    except (KeyError, ValueError):
        raise ConfigError(
            f"{path}: needs lines NODE_ID=<int> and NODE_KEY=<key>, or only the key "
            f"(key_file of {cfg.source})"
        ) from None
    if not node_key:
        raise ConfigError(f"{path}: NODE_KEY is empty")
    return node_id, node_key
