"""`planetlab-agent poll | api | decommission`: an operator's handles on a running node."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from agent.lockfile import AlreadyRunning, running_agent


def register(sub: Any) -> None:
    p = sub.add_parser("poll", help="make the running agent poll PLC now")
    p.add_argument("--wait", type=float, metavar="SECONDS", default=None,
                   help="wait (at most SECONDS) for that poll to finish and print its result")
    p.set_defaults(func=cmd_poll)

    p = sub.add_parser("api", help="call the running agent's slice API as the node admin "
                                   "(root): e.g. AcquireRcap '{\"ports\": \"tcp:9000\"}'")
    p.add_argument("method", help="the method, e.g. GetSlivers, AcquireRcap, BindRcap, Help")
    p.add_argument("params", nargs="*", metavar="ARG",
                   help="each a JSON value (number, struct, list, true/false, quoted "
                        "string), else taken as a string")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("decommission",
                       help="stop every sliver; remove the store mount, loop device, "
                            "cgroups, tc state and run directory (the agent must be stopped)")
    p.add_argument("--interface", action="append", default=[], metavar="IF",
                   help="also remove the traffic shaping of IF (besides the config's "
                        "[bandwidth] interfaces); repeatable")
    p.set_defaults(func=cmd_decommission)


def _poll_meta(state_dir: str) -> dict[str, str | None]:
    from agent.state import State

    with State.open(state_dir) as st:
        return {k: st.get_meta(k) for k in ("last_poll_at", "last_poll_ok", "last_poll_error")}


def cmd_poll(args: argparse.Namespace) -> int:
    from agent.cli_agent import load_config

    cfg = load_config(args)
    pid = running_agent(cfg.run_dir)
    if pid is None:
        print(f"planetlab-agent poll: no agent runs over {cfg.run_dir} (nobody holds "
              f"{Path(cfg.run_dir) / 'agent.pid'}; config {cfg.source})", file=sys.stderr)
        return 1
    before = _poll_meta(cfg.state_dir) if args.wait else {}
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        print(f"planetlab-agent poll: not allowed to signal the agent (pid {pid}): "
              "run as root", file=sys.stderr)
        return 1
    print(f"asked the agent (pid {pid}) to poll PLC now")
    if args.wait is None:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.2)
        after = _poll_meta(cfg.state_dir)
        if after["last_poll_at"] != before["last_poll_at"]:
            if after["last_poll_error"]:
                print(f"poll failed: {after['last_poll_error']}")
                return 1
            print("poll ok")
            return 0
    print(f"planetlab-agent poll: no poll finished within {args.wait:g} s", file=sys.stderr)
    return 1


def api_arg(text: str) -> Any:
    """A command-line argument as an XML-RPC value: JSON where it parses (null is
    refused: XML-RPC has no nil for the agent), else the text itself."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return text if value is None else value


def cmd_api(args: argparse.Namespace) -> int:
    import xmlrpc.client

    from agent.cli_agent import load_config
    from agent.sliceapi import UnixTransport

    cfg = load_config(args)
    api = xmlrpc.client.ServerProxy("http://agent/", allow_none=True,
                                    transport=UnixTransport(cfg.socket_path, args.timeout))
    try:
        result = getattr(api, args.method)(*(api_arg(a) for a in args.params))
    except xmlrpc.client.Fault as fault:
        print(f"planetlab-agent api: fault {fault.faultCode}: {fault.faultString}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"planetlab-agent api: cannot reach the agent at {cfg.socket_path}: {exc} "
              f"(config {cfg.source})", file=sys.stderr)
        return 1
    print(result if isinstance(result, str) else json.dumps(result, indent=1, default=str))
    return 0


def cmd_decommission(args: argparse.Namespace) -> int:
    from agent.cli_agent import load_config, require_root
    from agent.decommission import decommission

    require_root("decommission")
    cfg = load_config(args)
    try:
        problems = decommission(cfg, interfaces=tuple(args.interface))
    except AlreadyRunning as exc:
        print(f"planetlab-agent decommission: {exc} (systemctl stop planetlab-agent)",
              file=sys.stderr)
        return 1
    for p in problems:
        print(f"planetlab-agent decommission: {p}", file=sys.stderr)
    if not problems:
        print(f"decommissioned; the state directory {cfg.state_dir} is kept (remove it "
              "to forget the slivers and their files)")
    return 1 if problems else 0
