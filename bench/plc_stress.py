"""The plcsh-style stress run (tests/plc/stress.py) against a live `plc serve`, at the
large size by default: 200 sites, 1000 persons, 400 nodes, 2000 slices; with --check
every object is read back and compared after each phase. Not part of `make test`.

    .venv/bin/python bench/plc_stress.py [--size large|default] [--check] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "plc"))
from plc_live import remove_workdir, start_server  # noqa: E402

from tests.plc.stress import DEFAULT, LARGE, Stress  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("default", "large"), default="large")
    ap.add_argument("--check", action="store_true", help="read back and compare every phase")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sizes = LARGE if args.size == "large" else DEFAULT
    workdir = Path(tempfile.mkdtemp(prefix=f"plc-stress-{os.getpid()}-"))
    srv = start_server(workdir)
    try:
        run = Stress(srv.proxy(), srv.admin_auth, sizes, seed=args.seed, check=args.check)
        started = time.monotonic()
        run.run()
        total = time.monotonic() - started
    finally:
        srv.stop()
        remove_workdir(workdir)
    print(f"stress {args.size} ({sizes.totals}), check={args.check}: {run.calls} calls "
          f"in {total:.1f} s ({run.calls / total:.0f} calls/s)")
    for name, secs in run.phases:
        print(f"  {name:<24} {secs:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
