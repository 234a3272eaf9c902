"""plc.toml: the PLC server's configuration.

Read with tomllib, written with tomli-w. Every key is declared once in ``SCHEMA``
(section, key, type, default, help); a file with an unknown section or key, or a value
of the wrong type, is refused with a message naming the file, the key and what is
allowed. The legacy ``PLC_*`` variables each map to one key here (comment per key).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(Exception):
    """A configuration file or value that cannot be used."""


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None


SCHEMA: tuple[Key, ...] = (
    Key("plc", "name", str, "PlanetLab Test", "PLC_NAME: shown in fault texts and mail"),
    Key("plc", "slice_prefix", str, "pl", "PLC_SLICE_PREFIX: login_base of the system site"),
    Key("plc", "hrn_root", str, "plc", "PLC_HRN_ROOT: root of the hrn tags"),
    Key("db", "path", str, "/var/lib/plc/plc.db", "SQLite database file (WAL mode)"),
    Key("database", "url", str, "",
        "postgresql://USER@HOST/DB (PostgreSQL, shared by several front ends) or "
        "sqlite:///PATH; empty = the SQLite file [db] path"),
    Key("api", "listen", str, "127.0.0.1:8000", "HOST:PORT the XML-RPC server binds"),
    Key("api", "cert", str, "", "PEM certificate; with key, the server speaks HTTPS"),
    Key("api", "key", str, "", "PEM private key of cert"),
    Key("api", "max_body", int, 16 * 1024 * 1024, "largest request body in bytes (413 above)",
        minimum=1024),
    Key("api", "workers", int, 0,
        "server processes sharing the port (0 = one per CPU)", minimum=0),
    Key("api", "max_connections", int, 512,
        "most open client connections per process; a new one beyond closes the one "
        "that has waited longest for its request", minimum=2),
    Key("api", "max_per_source", int, 64,
        "most open connections per client address and process (more are answered 503)",
        minimum=1),
    Key("api", "threads", int, 32,
        "calls answered at once per process (complete requests wait for a thread)",
        minimum=1),
    Key("api", "head_timeout", int, 10,
        "seconds a client has for a request head from its first byte, TLS handshake "
        "included (408 after)", minimum=1),
    Key("api", "body_min_rate", int, 16384,
        "bytes/s a request body must arrive at, after head_timeout seconds of grace",
        minimum=1),
    Key("api", "max_buffered", int, 256 * 1024 * 1024,
        "request body bytes held at once per process (more are answered 503)",
        minimum=1024),
    Key("api", "password_checks", int, 0,
        "password hashes verified at once per process (0 = half the CPUs, at least 1); "
        "a call finding them all busy waits up to 1 s, then fails with fault 103",
        minimum=0),
    Key("api", "password_failures", int, 20,
        "wrong passwords per client address and minute; beyond, its password calls "
        "fail with fault 103 until the minute is over (0 = no limit)", minimum=0),
    Key("api", "debug", bool, False, "PLC_API_DEBUG: record every call, faults too, as an event"),
    Key("api", "maintenance_user", str, "maint@localhost.localdomain",
        "PLC_API_MAINTENANCE_USER (person 1)"),
    Key("api", "maintenance_password", str, "",
        "PLC_API_MAINTENANCE_PASSWORD; empty disables the maintenance account"),
    Key("api", "maintenance_sources", str, "127.0.0.1",
        "PLC_API_MAINTENANCE_SOURCES: space separated client addresses (empty: none)"),
    Key("reservation", "granularity", int, 3600, "PLC_RESERVATION_GRANULARITY in seconds",
        minimum=1),
    Key("slices", "vsys_defaults", str, "", "PLC_VSYS_DEFAULTS: comma list of vsys tags of new slices"),
    Key("flavour", "node_arch", str, "x86_64", "PLC_FLAVOUR_NODE_ARCH"),
    Key("flavour", "node_fcdistro", str, "bookworm", "PLC_FLAVOUR_NODE_FCDISTRO"),
    Key("flavour", "node_pldistro", str, "planetlab", "PLC_FLAVOUR_NODE_PLDISTRO"),
    Key("flavour", "slice_arch", str, "x86_64", "PLC_FLAVOUR_SLICE_ARCH"),
    Key("flavour", "slice_fcdistro", str, "bookworm", "PLC_FLAVOUR_SLICE_FCDISTRO"),
    Key("flavour", "slice_pldistro", str, "planetlab", "PLC_FLAVOUR_SLICE_PLDISTRO"),
    Key("flavour", "virt_map", str, "default:lxc", "PLC_FLAVOUR_VIRT_MAP"),
    Key("omf", "enabled", bool, False, "PLC_OMF_ENABLED"),
    Key("omf", "xmpp_server", str, "", "PLC_OMF_XMPP_SERVER"),
    Key("mail", "enabled", bool, True, "PLC_MAIL_ENABLED: false drops every message"),
    Key("mail", "smtp_host", str, "", "SMTP host[:port]; empty = write mail to spool_dir"),
    Key("mail", "spool_dir", str, "", "where mail goes without smtp_host; empty = mail/ beside the database"),
    Key("mail", "support_address", str, "root@localhost", "PLC_MAIL_SUPPORT_ADDRESS"),
    Key("mail", "boot_address", str, "root@localhost", "PLC_MAIL_BOOT_ADDRESS"),
    Key("www", "host", str, "localhost", "PLC_WWW_HOST (mail templates)"),
    Key("www", "ssl_port", int, 443, "PLC_WWW_SSL_PORT (mail templates)"),
    Key("release", "file", str, "/etc/myplc-release", "file GetPlcRelease parses"),
    Key("tickets", "key", str, "",
        "Ed25519 private key (PEM, 0600) signing slice tickets, made by `plc init` and never "
        "overwritten; empty = ticket-ed25519.pem beside [db] path (docs/tickets.md)"),
    Key("tickets", "lifetime", int, 3600,
        "seconds a slice ticket may be redeemed after it is issued (never past the "
        "slice's expiry)", minimum=60),
)

_BY_NAME = {(k.section, k.name): k for k in SCHEMA}
_SECTIONS = tuple(dict.fromkeys(k.section for k in SCHEMA))


@dataclass
class Config:
    """Validated configuration: ``cfg.get("api", "listen")`` or ``cfg.api_listen``."""

    values: dict[tuple[str, str], Any] = field(default_factory=dict)
    source: str = "<defaults>"

    def get(self, section: str, name: str) -> Any:
        if (section, name) not in _BY_NAME:
            raise KeyError(f"no config key {section}.{name}")
        return self.values.get((section, name), _BY_NAME[(section, name)].default)

    def __getattr__(self, attr: str) -> Any:
        section, _, name = attr.partition("_")
        if (section, name) in _BY_NAME:
            value = self.get(section, name)
            # read on every call (api_debug, flavour_*): later reads find it in the
            # instance dict; a Config is never changed in place (replace() copies)
            self.__dict__[attr] = value
            return value
        raise AttributeError(attr)

    def replace(self, **overrides: Any) -> Config:
        """A copy with ``section_key=value`` overrides (checked like file values)."""
        values = dict(self.values)
        for attr, value in overrides.items():
            section, _, name = attr.partition("_")
            key = _BY_NAME.get((section, name))
            if key is None:
                raise ConfigError(f"unknown setting {attr}")
            values[(section, name)] = _check(key, value, "<command line>")
        return Config(values, self.source)


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false"}[t]


def _check(key: Key, value: Any, source: str) -> Any:
    where = f"{source}: [{key.section}] {key.name}"
    if key.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} = {value!r}: must be {_type_name(int)}")
    if key.type is not int and not isinstance(value, key.type):
        raise ConfigError(f"{where} = {value!r}: must be {_type_name(key.type)}")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{where} = {value!r}: must be at least {key.minimum}")
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"{where} = {value!r}: allowed: {', '.join(map(str, key.choices))}")
    if key.name == "listen":
        parse_listen(value, where)
    return value


def parse_listen(value: str, where: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"{where} = {value!r}: must be HOST:PORT with PORT 0-65535")
    return host.strip("[]"), int(port)


def load(path: str | Path | None) -> Config:
    """Read and validate ``path``; None gives the defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file (create one with `plc init-config {source}`)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    values: dict[tuple[str, str], Any] = {}
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed: {', '.join(_SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section} must be a [{section}] table")
        for name, value in table.items():
            key = _BY_NAME.get((section, name))
            if key is None:
                allowed = ", ".join(k.name for k in SCHEMA if k.section == section)
                raise ConfigError(
                    f"{source}: unknown key [{section}] {name}; allowed: {allowed}")
            values[(section, name)] = _check(key, value, source)
    cfg = Config(values, source)
    if bool(cfg.api_cert) != bool(cfg.api_key):
        raise ConfigError(f"{source}: [api] cert and key must be given together")
    return cfg


def default_text() -> str:
    """The commented default plc.toml."""
    out = ["# plc.toml: configuration of the PLC server (`plc serve --config FILE`).",
           "# Every key is shown with its default; delete a line to keep the default.", ""]
    for section in _SECTIONS:
        out.append(f"[{section}]")
        for key in SCHEMA:
            if key.section != section:
                continue
            out.append(f"# {key.help}")
            out.append(tomli_w.dumps({key.name: key.default}).rstrip("\n"))
        out.append("")
    return "\n".join(out)


def write_default(path: str | Path) -> None:
    p = Path(path)
    if p.exists():
        raise ConfigError(f"{p}: already exists; not overwritten")
    p.parent.mkdir(parents=True, exist_ok=True)
    # 0600 whatever the umask: the file may come to hold the maintenance password
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(default_text())


def database_url(cfg: Config) -> str:
    """Where the PLC database is: [database] url, else the SQLite file [db] path."""
    return cfg.database_url or cfg.db_path
