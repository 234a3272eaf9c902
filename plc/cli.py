"""The ``plc`` command: init, serve, init-config, node-key (and shell, if installed).

Subcommand modules may add themselves: a module ``plc.shell`` (or any ``plc.cli_*``)
defining ``register(subparsers)`` gets called, and sets ``func`` on its parser; the
func receives the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any

from planetlab.version import version_line
from plc import config as configmod
from plc.config import ConfigError


def _load_config(args: argparse.Namespace) -> configmod.Config:
    cfg = configmod.load(getattr(args, "config", None))
    overrides: dict[str, Any] = {}
    if getattr(args, "db", None):
        if "://" in args.db:
            overrides["database_url"] = args.db
        else:
            overrides["db_path"] = args.db
            overrides["database_url"] = ""
    if getattr(args, "listen", None):
        overrides["api_listen"] = args.listen
    if getattr(args, "workers", None) is not None:
        overrides["api_workers"] = args.workers
    return cfg.replace(**overrides) if overrides else cfg


def cmd_init_config(args: argparse.Namespace) -> int:
    configmod.write_default(args.path)
    print(f"wrote {args.path}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from plc.initdb import initialise

    cfg = _load_config(args)
    prefix = args.slice_prefix or cfg.plc_slice_prefix
    password = args.admin_password
    if password is None and args.admin_password_file:
        with open(args.admin_password_file) as f:
            password = f.read().strip()
    if password is None:
        raise ConfigError("--admin-password (or --admin-password-file) is required")
    store = _store(cfg)
    initialise(store, args.admin_email, password, prefix, hrn_root=cfg.plc_hrn_root)
    print(f"initialised {store.url}: system site '{prefix}', admin {args.admin_email}")
    _ticket_key(cfg)
    return 0


def _ticket_key(cfg: configmod.Config) -> Any:
    """PLC's ticket key pair, made if missing (an existing key is never overwritten)."""
    from plc import tickets

    path = tickets.key_path(cfg)
    if tickets.ensure_key(path):
        print(f"made the slice ticket key {path} (0600)")
    try:
        return tickets.load_key(path)
    except tickets.TicketKeyError as exc:
        raise ConfigError(str(exc)) from None


def cmd_ticket_key(args: argparse.Namespace) -> int:
    """Print the public key nodes verify slice tickets with (agent.toml plc_ticket_key)."""
    from plc import tickets

    cfg = _load_config(args)
    if args.create:
        key = _ticket_key(cfg)
    else:
        try:
            key = tickets.load_key(tickets.key_path(cfg))
        except tickets.TicketKeyError as exc:
            raise ConfigError(str(exc)) from None
    print(tickets.public_b64(key))
    return 0


#: PLC's oom_score_adj on a machine it shares with slivers (500): they go first (F34).
PLC_OOM_SCORE_ADJ = -500


def protect_from_oom(value: int = PLC_OOM_SCORE_ADJ) -> bool:
    """Lower this process's oom_score_adj (its workers inherit it); False, logged,
    where lowering is refused (it needs CAP_SYS_RESOURCE)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError as exc:
        logging.getLogger("plc").warning("oom_score_adj %d not set: %s", value, exc.strerror)
        return False


def _store(cfg: configmod.Config, pool_size: int = 8) -> Any:
    from plc.store import open_store

    try:
        return open_store(configmod.database_url(cfg), pool_size=pool_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_connection_budget(store: Any, cfg: configmod.Config) -> int:
    """Each of the ``workers`` processes needs a pool of [api] threads + 1 connections;
    refuse a start that PostgreSQL's max_connections cannot hold. The total needed."""
    workers = cfg.api_workers or os.cpu_count() or 1
    per_process = cfg.api_threads + 1
    needed = workers * per_process
    if store.dialect != "postgres":
        return needed
    limit, used = store.connection_limit()
    if needed > limit - used:
        raise ConfigError(
            f"{store.url}: --workers {workers} x ([api] threads {cfg.api_threads} + 1) = "
            f"{needed} database connections, but the server's connection limit leaves "
            f"{limit - used} (max_connections less reserved: {limit}, in use: {used}); "
            "lower --workers or [api] threads, or raise max_connections")
    return needed


def cmd_serve(args: argparse.Namespace) -> int:
    from plc.server import serve
    from plc.store import DBError
    from plc.store.migrations import SchemaError

    cfg = _load_config(args)
    store = _store(cfg, pool_size=cfg.api_threads + 1)
    if not store.exists():
        raise ConfigError(f"{store.url}: no PLC database (run `plc init --db "
                          f"{store.url} ...` first)")
    try:
        store.ensure_indexes()
    except SchemaError:
        raise
    except DBError as e:  # e.g. a read-only copy: serve it without the newer indexes
        logging.getLogger("plc").warning("%s: cannot add indexes: %s", store.url, e)
    check_connection_budget(store, cfg)
    store.close()  # no pool (nor its threads) across serve's forks: each process makes its own

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    protect_from_oom()
    try:
        serve(store, cfg)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    from plc.initdb import node_key

    cfg = _load_config(args)
    print(node_key(_store(cfg), args.hostname))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from plc.store.migrations import latest, migrate

    store = _store(_load_config(args))
    if not store.exists():
        raise ConfigError(f"{store.url}: no PLC database (run `plc init` first)")
    done = migrate(store)
    print(f"{store.url}: applied migrations {done}" if done else
          f"{store.url}: already at schema version {latest()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from plc.store.transfer import export

    store = _store(_load_config(args))
    if not store.exists():
        raise ConfigError(f"{store.url}: no PLC database")
    with open(args.file, "w") as out:
        counts = export(store, out)
    print(f"exported {sum(counts.values())} rows of {len(counts)} tables to {args.file}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from plc.store.transfer import ImportError_, import_

    store = _store(_load_config(args))
    try:
        with open(args.file) as src:
            counts = import_(store, src)
    except ImportError_ as e:
        raise ConfigError(str(e)) from None
    print(f"imported {sum(counts.values())} rows of {len(counts)} tables into {store.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plc", description="PlanetLab Central (PLCAPI server)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p.add_argument("--version", action="version", version=version_line("plc"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init-config", help="write a commented default plc.toml")
    s.add_argument("path")
    s.set_defaults(func=cmd_init_config)

    s = sub.add_parser("init", help="create the database with roles, tag types, admin")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help="database file or postgresql://USER@HOST/DB")
    s.add_argument("--admin-email", required=True)
    s.add_argument("--admin-password")
    s.add_argument("--admin-password-file")
    s.add_argument("--slice-prefix", help="login_base of the system site")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="serve the XML-RPC API")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help="database file or postgresql://USER@HOST/DB")
    s.add_argument("--listen", help="HOST:PORT (overrides [api] listen)")
    s.add_argument("--workers", type=int, help="server processes (overrides [api] workers; "
                                               "0 = one per CPU)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("node-key", help="print a node's key, creating one if needed")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help="database file or postgresql://USER@HOST/DB")
    s.add_argument("hostname")
    s.set_defaults(func=cmd_node_key)

    s = sub.add_parser("ticket-key", help="print the public key of slice tickets (base64), "
                       "for agent.toml plc_ticket_key")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help="database file (the key defaults to ticket-ed25519.pem beside it)")
    s.add_argument("--create", action="store_true", help="make the key pair if it is missing")
    s.set_defaults(func=cmd_ticket_key)

    db_help = "database file or URL: postgresql://USER@HOST/DB (overrides [database] url)"
    s = sub.add_parser("migrate", help="apply the schema migrations the database lacks")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help=db_help)
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("export", help="write the whole database to a JSON file")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help=db_help)
    s.add_argument("file")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="load an export into a new, empty database")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help=db_help)
    s.add_argument("file")
    s.set_defaults(func=cmd_import)

    for modname in ("plc.shell",):
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            if e.name != modname:
                raise
            continue
        if hasattr(mod, "register"):
            mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from planetlab.logsetup import setup

    setup(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"plc: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from plc.initdb import InitError
        from plc.store.base import DBError

        if isinstance(e, InitError | DBError | OSError):
            print(f"plc {args.command}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
