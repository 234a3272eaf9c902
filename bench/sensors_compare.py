"""Side by side: bench/sensors.py over this tree and over an older commit's tree, in
one run, alternating (old, new) ROUNDS times; prints each figure with old/new ratios.
Last line: one JSON object {"old": {...}, "new": {...}, "gain_new_over_old": {...}}
(gain: old/new for times and sizes, new/old for rates; > 1 means better).

    .venv/bin/python bench/sensors_compare.py [OLD_COMMIT] [--rounds N]

The old tree is `git archive OLD_COMMIT` unpacked in a temporary directory (no
worktree); both runs use this checkout's bench/sensors.py and the same interpreter.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# lower is better for these; the others (throughput) higher is better
LOWER = ("_ms", "_s_max", "_s_median", "bytes_per_sample")


def run(tree: Path) -> dict[str, float]:
    # the node side has its own side-by-side: bench/sensors_node.py --compare
    env = {**os.environ, "BENCH_TREE": str(tree), "BENCH_NODE": "0"}
    out = subprocess.run([sys.executable, str(HERE / "bench" / "sensors.py")], env=env,
                         capture_output=True, text=True, check=True, cwd=tree)
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", nargs="?", default="de6720c")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"bsenscmp{os.getpid()}") as tmp:
        tar = subprocess.run(["git", "archive", args.old, "sensors", "tests", "bench"],
                             cwd=HERE, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(tmp, filter="data")
        old: list[dict[str, float]] = []
        new: list[dict[str, float]] = []
        for _ in range(args.rounds):
            old.append(run(Path(tmp)))
            new.append(run(HERE))

    def best(runs: list[dict[str, float]], key: str) -> float:
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        return (min(vals) if key.endswith(LOWER) else max(vals)) if vals else float("nan")
    keys = [k for k in new[0] if k in old[0]]
    table = {k: (best(old, k), best(new, k)) for k in keys}
    print(f"{'figure':34} {'old':>14} {'new':>14} {'gain':>8}")
    ratios = {}
    for k, (o, n) in table.items():   # gain > 1: new is better (time/size down, rate up)
        lower = k.endswith(LOWER)
        ratio = (o / n if lower else n / o) if (n if lower else o) else float("nan")
        ratios[k] = round(ratio, 2)
        print(f"{k:34} {o:14.3f} {n:14.3f} {ratio:8.2f}")
    print(json.dumps({"old": {k: v[0] for k, v in table.items()},
                      "new": {k: v[1] for k, v in table.items()},
                      "gain_new_over_old": ratios}))


if __name__ == "__main__":
    main()
