"""Bandwidth bench: 500 sliver classes set up and torn down, the accounting pass at
500 slivers, and shaping accuracy at 1, 10 and 100 Mbit/s against HTB made by hand
with `tc` in the same run. Last line: one JSON object."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from bwnet import Blaster, veth_netns  # noqa: E402

from agent import bandwidth as bw  # noqa: E402
from kernel import tc  # noqa: E402

M = 1_000_000
N = 500


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def class_bytes(dev: str, classid: str) -> int:
    out = subprocess.run(["tc", "-s", "class", "show", "dev", dev, "classid", classid],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split("Sent ", 1)[1].split(" ", 1)[0])


def accuracy(net, rate: int) -> dict[str, float]:
    """Measured/configured for our class and for a hand-made tc class."""
    out = {}
    with tc.Shaper(net.host) as sh:
        sh.ensure_root(1000 * M, 1000 * M)
        sh.ensure_sliver(0x100, tc.ClassSpec(rate // 10, rate), tc.ClassSpec(rate // 10, rate))
        seconds = 1.5
        with Blaster([(net.sink4, tc.handle(1, 0x100), int(rate * 1.3))]):
            time.sleep(0.4)
            b0, t0 = class_bytes(net.host, "1:100"), time.monotonic()
            time.sleep(seconds)
            b1, t1 = class_bytes(net.host, "1:100"), time.monotonic()
        out["ours"] = (b1 - b0) * 8 / (t1 - t0) / rate
        sh.remove_all()
    dev = net.host
    for cmd in (f"qdisc add dev {dev} root handle 1: htb default 3",
                f"class add dev {dev} parent 1: classid 1:1 htb rate 1gbit",
                f"class add dev {dev} parent 1:1 classid 1:100 htb rate {rate // 10}bit "
                f"ceil {rate}bit",
                f"qdisc add dev {dev} parent 1:100 handle 100: bfifo limit {tc.leaf_limit(rate)}"):
        subprocess.run(["tc", *cmd.split()], check=True)
    with Blaster([(net.sink4, tc.handle(1, 0x100), int(rate * 1.3))]):
        time.sleep(0.4)
        b0, t0 = class_bytes(dev, "1:100"), time.monotonic()
        time.sleep(seconds)
        b1, t1 = class_bytes(dev, "1:100"), time.monotonic()
    out["tc"] = (b1 - b0) * 8 / (t1 - t0) / rate
    subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)
    return out


def main() -> None:
    result: dict[str, object] = {}
    with veth_netns("b") as net, tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(os.path.join(tmp, "agent.db"))
        bw.ensure_tables(db)
        cfg = bw.parse_config({"interfaces": [net.host], "node_rate": 500 * M})
        b = bw.Bandwidth(db, cfg, [tc.Shaper(net.host)], cap=500 * M)
        rspecs = {f"pl_s{i}": {"net_min_rate": 10, "net_max_rate": 10_000 + i}
                  for i in range(N)}
        t = time.monotonic()
        b.sync(rspecs, time.time())
        result["setup_500_s"] = round(time.monotonic() - t, 3)
        assert len(b.shapers[0].counters()) == 2 * N
        passes = []
        for _ in range(5):
            c, t = cpu(), time.monotonic()
            b.account(time.time())
            passes.append((cpu() - c, time.monotonic() - t))
        result["account_500_cpu_ms"] = round(1000 * min(p[0] for p in passes), 1)
        result["account_500_wall_ms"] = round(1000 * min(p[1] for p in passes), 1)
        t = time.monotonic()
        b.sync({}, time.time())
        result["teardown_500_s"] = round(time.monotonic() - t, 3)
        assert not b.shapers[0].counters()
        b.shapers[0].remove_all()
        b.shapers[0].close()
        db.close()
        for rate in (1 * M, 10 * M, 100 * M):
            acc = accuracy(net, rate)
            result[f"accuracy_{rate // M}mbit"] = {k: round(v, 4) for k, v in acc.items()}
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
