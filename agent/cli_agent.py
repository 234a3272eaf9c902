"""`planetlab-agent run | init-config | status | list`: the node manager's own commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.backend import KernelBackend
from agent.cpugrants import read_cpu_book
from agent.state import State


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the node agent (poll PLC, reconcile, serve slices)")
    p.add_argument("--once", action="store_true", help="one poll and reconcile, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("init-config", help="write a commented default agent.toml")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--plc-url")
    p.add_argument("--hostname")
    p.add_argument("--key-file")
    p.add_argument("--state-dir", dest="init_state_dir")
    p.add_argument("--node-accounts", metavar="USERS",
                   help="local users whose ssh keys PLC manages (asked if not given on a "
                        "terminal; else none)")
    p.add_argument("--host-accounts", type=int, choices=(0, 1),
                   help="1: ssh SLICE@node enters the slice's sliver (asked if not given "
                        "on a terminal; else 0)")
    p.set_defaults(func=cmd_init_config)

    p = sub.add_parser("status", help="every sliver: state, image, rspec, usage")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", help="sliver names and states")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)


def default_config_path() -> Path:
    """Where the agent's config is looked for without --config."""
    return Path(os.environ.get("PLANETLAB_AGENT_CONFIG", config_mod.DEFAULT_CONFIG))


def load_config(args: argparse.Namespace) -> config_mod.AgentConfig:
    """The config from --config, else the default file if there is one, else the
    defaults; --state-dir overrides state_dir."""
    path = args.config or (str(default_config_path()) if default_config_path().is_file()
                           else None)
    try:
        cfg = config_mod.load(path) if path else config_mod.defaults()
        if getattr(args, "state_dir", None):
            cfg = cfg.replace(state_dir=config_mod._check("--state-dir", "state_dir",
                                                          args.state_dir))
    except config_mod.ConfigError as exc:
        print(f"planetlab-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def require_root(command: str) -> None:
    """One line, not a traceback, for a command that needs root run without it."""
    if os.geteuid() != 0:
        print(f"planetlab-agent {command}: must run as root (it manages kernel contexts, "
              f"cgroups and mounts); running as uid {os.geteuid()}", file=sys.stderr)
        raise SystemExit(1)


def existing_state(cfg: config_mod.AgentConfig, command: str) -> bool:
    """Read-only commands never create state. Without a state database they say where
    they looked; False: there is none, but a config names it (an agent that has not
    run yet: nothing to show); no config either: exit 1."""
    db = Path(cfg.state_dir) / "agent.db"
    if db.is_file():
        return True
    configured = not cfg.source.startswith("<")
    where = (f"config {cfg.source}" if configured else
             f"no --config and no {default_config_path()}, so the defaults")
    print(f"planetlab-agent {command}: no agent state at {db} ({where})"
          + ("; the agent has not run yet" if configured else
             "; pass --config FILE or --state-dir DIR of the node's agent"), file=sys.stderr)
    if not configured:
        raise SystemExit(1)
    return False


EMPTY_STATUS: dict[str, Any] = {"slivers": [], "node": {}}


def cmd_run(args: argparse.Namespace) -> int:
    require_root("run")
    cfg = load_config(args)
    from planetlab.logsetup import setup

    setup(args.verbose)
    # Only `run` needs the agent program (trio, the guard, PLC client: ~0.2 s to
    # import, measured); every command imports this module to build the parser.
    from agent.main import run_agent

    try:
        return run_agent(cfg, once=args.once)
    except config_mod.ConfigError as exc:
        print(f"planetlab-agent run: {exc}", file=sys.stderr)
        return 2


ACCOUNT_QUESTIONS = (
    ("node_accounts",
     "node_accounts: local users (comma list, e.g. root,site_admin) whose "
     "~/.ssh/authorized_keys the agent rewrites from PLC's `accounts` at every poll, "
     "giving PLC's admins and the site's PIs ssh into this machine. Empty: none.", ""),
    ("host_accounts",
     "host_accounts: 1 makes a Linux user per slice on this machine, whose login shell "
     "enters the slice's sliver (ssh SLICE@node); 0: none.", 0),
)


def ask_accounts(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """node_accounts and host_accounts give people ssh into this machine: asked on a
    terminal, off otherwise, never the silent default of the config loader."""
    given = {"node_accounts": args.node_accounts, "host_accounts": args.host_accounts}
    for key, text, off in ACCOUNT_QUESTIONS:
        if given[key] is not None:
            overrides[key] = given[key]
            continue
        if not sys.stdin.isatty():
            overrides[key] = off
            print(f"{text}\n  -> {key} = {off!r} (set it in the file, or pass "
                  f"--{key.replace('_', '-')})")
            continue
        print(text)
        answer = input(f"{key} [{off}]: ").strip()
        overrides[key] = (int(answer) if key == "host_accounts" else answer) if answer else off


def cmd_init_config(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for key, value in (("plc_url", args.plc_url), ("hostname", args.hostname),
                       ("key_file", args.key_file), ("state_dir", args.init_state_dir)):
        if value is not None:
            overrides[key] = value
    try:
        ask_accounts(args, overrides)
    except (ValueError, EOFError):
        print("planetlab-agent init-config: host_accounts is 0 or 1", file=sys.stderr)
        return 2
    try:
        path = config_mod.write_default(args.path, overrides)
    except config_mod.ConfigError as exc:
        print(f"planetlab-agent init-config: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def collect_status(cfg: config_mod.AgentConfig, with_usage: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"slivers": [], "node": {}}
    with State.open(cfg.state_dir) as st:   # callers checked existing_state
        for key in ("last_poll_ok", "last_poll_error", "last_timestamp", "last_reply_at"):
            out["node"][key] = st.get_meta(key)
        ranges = st.uid_ranges()
        ports = st.owned_ports()
        backend = None
        live: set[str] = set()
        if with_usage and (Path(cfg.run_dir) / "contexts").is_dir():
            try:   # (no run dir: nothing runs, and status creates nothing)
                backend = KernelBackend(Path(cfg.state_dir), Path(cfg.run_dir))
                live = backend.live()
            except Exception as exc:  # noqa: BLE001 - status degrades, never fails
                out["node"]["kernel"] = f"unavailable: {exc}"
        bandwidth: dict[str, dict[str, Any]] = {}
        if with_usage and cfg.bandwidth.interfaces:
            try:
                from agent.bwservice import observe
                from agent.getslivers import plc_bwlimit

                bandwidth = observe(cfg.bandwidth, st.path, {
                    n: r.rspec for n, r in st.slivers().items() if r.state != "controller"},
                    plc_bwlimit=plc_bwlimit(st.last_reply()))
            except Exception as exc:  # noqa: BLE001 - status degrades, never fails
                out["node"]["bandwidth"] = f"unavailable: {exc}"
        cpu_grants = read_cpu_book(cfg.run_dir).get("grants", {})
        for name, rec in st.slivers().items():
            item: dict[str, Any] = {
                "name": name, "state": rec.state, "message": rec.message, "image": rec.image,
                "instantiation": rec.instantiation, "expires": rec.expires,
                "live": name in live,
                "uid_base": (cfg.uid_pool_start + ranges[name] * cfg.uid_range_size
                             if name in ranges else None),
                "rspec": {k: v for k, v in rec.rspec.items() if k != "tags"},
                "problems": rec.problems,
                "ports": _port_ranges(ports.get(name, [])),
                "ports_skipped": st.get_meta(f"ports_skipped:{name}") or "",
            }
            if name in bandwidth:
                item["bandwidth"] = bandwidth[name]
            if name in cpu_grants:
                item["cpu"] = cpu_grants[name]
            if backend is not None and name in live:
                try:
                    item["usage"] = backend.usage(name)
                except Exception as exc:  # noqa: BLE001
                    item["usage"] = {"error": str(exc)}
            out["slivers"].append(item)
    return out


def _port_ranges(rows: list[tuple[str, int, str, str]]) -> list[str]:
    """Owned ports as `PROTO:LO[-HI]@ADDRESS (tag|reserve)`, consecutive ports merged."""
    out: list[str] = []
    last: list[Any] | None = None   # [proto, lo, hi, address, source]
    for proto, port, addr, src in rows:
        if last and (last[0], last[3], last[4]) == (proto, addr, src) and port == last[2] + 1:
            last[2] = port
            continue
        if last:
            out.append(_port_text(last))
        last = [proto, port, port, addr, src]
    if last:
        out.append(_port_text(last))
    return out


def _port_text(r: list[Any]) -> str:
    span = str(r[1]) if r[1] == r[2] else f"{r[1]}-{r[2]}"
    source = {"plc": "tag", "runtime": "ReservePort"}.get(r[4], r[4])
    return f"{r[0]}:{span}@{r[3]} ({source})"


def _cpu_text(g: dict[str, Any]) -> str:
    """One line of a sliver's CPU grant (agent/cpu.py)."""
    parts = [f"weight={g['weight']}"]
    if g.get("reserve_pct"):
        parts.append(f"reserved={g['reserve_pct']}%")
    if g.get("cap_pct"):
        parts.append(f"cap={g['cap_pct']}%")
    if g.get("cores"):
        parts.append(f"cores={','.join(map(str, g['cores']))}"
                     + (" (exclusive partition)" if g.get("partition") else " (+ pool)"))
    if g.get("cpus"):
        parts.append(f"cpus={g['cpus']}")
    if g.get("freeze"):
        parts.append("frozen (cpu_freezable, no cores)")
    return " ".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    status = collect_status(cfg) if existing_state(cfg, "status") else EMPTY_STATUS
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True, default=str)
        print()
        return 0
    node = status["node"]
    ok = node.get("last_poll_ok")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ok))) if ok else "never"
    print(f"last good poll: {when}")
    if node.get("last_poll_error"):
        print(f"last poll error: {node['last_poll_error']}")
    for s in status["slivers"]:
        r = s["rspec"]
        usage = s.get("usage", {})
        line = (f"{s['name']:<24} {s['state']:<9} image={s['image']} cpu_share={r['cpu_share']} "
                f"disk_max={r['disk_max']}KiB")
        if usage and "error" not in usage:
            line += " usage=" + ",".join(f"{k}={v}" for k, v in sorted(usage.items()))
        print(line)
        if s["message"]:
            print(f"    {s['message']}")
        for p in s["problems"]:
            print(f"    rspec: {p}")
        if s.get("cpu"):
            print(f"    cpu: {_cpu_text(s['cpu'])}")
            for why in s["cpu"].get("refused", []):
                print(f"    cpu: {why}")
        if s["ports"]:
            print(f"    ports: {', '.join(s['ports'])}")
        if s.get("ports_skipped"):
            print(f"    ports tag items not granted (held by the host): {s['ports_skipped']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    status = (collect_status(cfg, with_usage=False) if existing_state(cfg, "list")
              else EMPTY_STATUS)
    rows = [{"name": s["name"], "state": s["state"], "image": s["image"]}
            for s in status["slivers"]]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        for r in rows:
            print(f"{r['name']}\t{r['state']}\t{r['image']}")
    return 0
