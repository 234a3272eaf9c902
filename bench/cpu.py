"""CPU bench: cpu_share 1:3, a 30 % reservation against four weight-1 hogs, a 20 %
cap, and a 40 % reservation against three hogs of share 1, 2 and 3, all at once with
hogs on every core. Prints achieved against target side by side; shares and
reservations are fractions of what each scenario's groups got together (a busy host
does not skew them), the cap a fraction of one CPU. Last line: one JSON object.

    .venv/bin/python bench/cpu.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

import test_cpu as t  # noqa: E402  (tests/kernel/test_cpu.py: Scenario, parent_weight)

from agent.cpu import CpuRequest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    t.WINDOW_S, t.WINDOWS = args.seconds, 1
    sc = {k: t.Scenario(f"bcpu{k}{t.PID}") for k in ("share", "res30", "res40", "cap")}
    result: dict[str, dict[str, float]] = {}
    try:
        sc["share"].add("a")
        sc["share"].add("b")
        sc["share"].grant({"a": CpuRequest(share=1), "b": CpuRequest(share=3)})
        for i in range(4):
            sc["res30"].add(f"be{i}")
        sc["res30"].add("r")
        sc["res30"].grant({**{f"be{i}": CpuRequest() for i in range(4)},
                           "r": CpuRequest(reserve_pct=30)})
        for i in range(3):
            sc["res40"].add(f"s{i + 1}")
        sc["res40"].add("r")
        sc["res40"].grant({**{f"s{i + 1}": CpuRequest(share=i + 1) for i in range(3)},
                           "r": CpuRequest(reserve_pct=40)})
        sc["cap"].add("c")
        sc["cap"].grant({"c": CpuRequest(cap_pct=20)})
        for s in sc.values():
            t.parent_weight(s.parent, 10000)
        threads = [threading.Thread(target=s.measure) for s in sc.values()]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        w = sc["share"].windows[0]
        result["share_1_to_3"] = {"target_a": 0.25, "achieved_a": w["a"] / (w["a"] + w["b"])}
        w = sc["res30"].windows[0]
        result["reserve_30_vs_4"] = {"target": 0.30, "achieved": w["r"] / sum(w.values())}
        w = sc["res40"].windows[0]
        tot = sum(w.values())
        result["reserve_40_vs_shares_1_2_3"] = {
            "target": 0.40, "achieved": w["r"] / tot,
            # the rest by weight: s1:s2:s3 = 1:2:3 of the remaining 60 %
            **{f"s{i}_target": 0.6 * i / 6 for i in (1, 2, 3)},
            **{f"s{i}_achieved": w[f"s{i}"] / tot for i in (1, 2, 3)}}
        result["cap_20"] = {"target": 0.20, "achieved": sc["cap"].windows[0]["c"] / sc["cap"].walls[0]}
    finally:
        for s in sc.values():
            s.close()
    for key, val in result.items():
        rounded = {k: round(v, 4) for k, v in val.items()}
        result[key] = rounded
        print(f"{key:<28} " + "  ".join(f"{k}={v}" for k, v in rounded.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
