"""`planetlab-sensors`: the central collector's command line.

    planetlab-sensors init-config [PATH]         write a commented default sensors.toml
    planetlab-sensors collect --config PATH      run the collector (polls, stores, serves)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from sensors.collecthttp import serve
from sensors.collector import DEFAULT_CONFIG, Collector, ConfigError, load_config
from sensors.dashboard import make_handler
from sensors.tsstore import TSStore


async def collect(cfg_path: str, rounds: int | None = None) -> int:
    cfg = load_config(cfg_path)
    Path(cfg.db).parent.mkdir(parents=True, exist_ok=True)
    store = await TSStore.open_path(cfg.db)
    col = Collector(cfg, store)
    server = await serve(make_handler(col), cfg.listen, cfg.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"collector listening on {cfg.listen}:{cfg.port}, {len(col.nodes)} nodes",
          file=sys.stderr, flush=True)
    try:
        await col.run(stop)
    finally:
        server.close()
        await store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="planetlab-sensors")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="run the central collector")
    c.add_argument("--config", required=True)
    i = sub.add_parser("init-config", help="write a commented default sensors.toml")
    i.add_argument("path", nargs="?", default="sensors.toml")
    i.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SENSORS_LOG", "INFO"))
    if args.cmd == "init-config":
        p = Path(args.path)
        if p.exists() and not args.force:
            print(f"{p} exists (use --force to overwrite)", file=sys.stderr)
            return 1
        p.write_text(DEFAULT_CONFIG)
        return 0
    try:
        return asyncio.run(collect(args.config))
    except ConfigError as e:
        print(f"planetlab-sensors: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
