"""A slice's own CPU time, read from its cgroup, for the guard's CPU budget (F36)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path


def slice_cpu_reader(dirs: Iterable[Path]) -> Callable[[], float | None] | None:
    """The slice's CPU seconds so far, read from its cgroup (cpuacct.usage on v1,
    cpu.stat usage_usec on v2) at most every 5 ms; None without such a file."""
    dirs = list(dirs)
    src = next(((d / "cpuacct.usage", 1e-9) for d in dirs
                if (d / "cpuacct.usage").exists()), None) or \
        next(((d / "cpu.stat", 1e-6) for d in dirs if (d / "cpu.stat").exists()), None)
    if src is None:
        return None
    path, unit = src
    last: list[float] = [0.0, -1.0]   # read at, value

    def read() -> float | None:
        now = time.monotonic()
        if now - last[0] < 0.005 and last[1] >= 0:
            return last[1]
        try:
            text = path.read_text()
        except OSError:
            return None
        if path.name == "cpu.stat":
            text = next((ln.split()[1] for ln in text.splitlines()
                         if ln.startswith("usage_usec ")), "0")
        last[0], last[1] = now, int(text.strip() or 0) * unit
        return last[1]
    return read
