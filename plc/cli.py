"""The ``plc`` command: init, serve, init-config, node-key (and shell, if installed).

Subcommand modules may add themselves: a module ``plc.shell`` (or any ``plc.cli_*``)
defining ``register(subparsers)`` gets called, and sets ``func`` on its parser; the
func receives the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Any

from plc import config as configmod
from plc.config import ConfigError
from plc.version import version_line


def _load_config(args: argparse.Namespace) -> configmod.Config:
    cfg = configmod.load(getattr(args, "config", None))
    overrides: dict[str, Any] = {}
    if getattr(args, "db", None):
        overrides["db_path"] = args.db
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
    from plc.store import open_store

    cfg = _load_config(args)
    prefix = args.slice_prefix or cfg.plc_slice_prefix
    password = args.admin_password
    if password is None and args.admin_password_file:
        with open(args.admin_password_file) as f:
            password = f.read().strip()
    if password is None:
        raise ConfigError("--admin-password (or --admin-password-file) is required")
    initialise(open_store(cfg.db_path), args.admin_email, password, prefix,
               hrn_root=cfg.plc_hrn_root)
    print(f"initialised {cfg.db_path}: system site '{prefix}', admin {args.admin_email}")
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


def cmd_serve(args: argparse.Namespace) -> int:
    from plc.server import serve
    from plc.store import DBError, open_store

    cfg = _load_config(args)
    store = open_store(cfg.db_path)
    if not store.exists():
        raise ConfigError(f"{cfg.db_path}: no PLC database (run `plc init --db "
                          f"{cfg.db_path} ...` first)")
    try:
        store.ensure_indexes()
    except DBError as e:  # e.g. a read-only copy: serve it without the newer indexes
        logging.getLogger("plc").warning("%s: cannot add indexes: %s", cfg.db_path, e)

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
    from plc.store import open_store

    cfg = _load_config(args)
    print(node_key(open_store(cfg.db_path), args.hostname))
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
    s.add_argument("--db", help="database file (overrides [db] path)")
    s.add_argument("--admin-email", required=True)
    s.add_argument("--admin-password")
    s.add_argument("--admin-password-file")
    s.add_argument("--slice-prefix", help="login_base of the system site")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="serve the XML-RPC API")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help="database file (overrides [db] path)")
    s.add_argument("--listen", help="HOST:PORT (overrides [api] listen)")
    s.add_argument("--workers", type=int, help="server processes (overrides [api] workers; "
                                               "0 = one per CPU)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("node-key", help="print a node's key, creating one if needed")
    s.add_argument("--config", help="plc.toml")
    s.add_argument("--db", help="database file (overrides [db] path)")
    s.add_argument("hostname")
    s.set_defaults(func=cmd_node_key)

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
    from plc.logsetup import setup

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
