"""Readers: the node through psutil, each sliver from its cgroup files and HTB classes.

Blocking (file reads, one netlink dump per shaped interface): callers run them in a
worker thread (sensors/snapshot.py). Keys and units are the contract of
docs/sensors.md. A figure the node cannot give is left out, never invented.

Cost matters: a collection at 1000 slivers must stay under 20 ms of CPU. Opening a
cgroup file (the path walk) costs ~7 us, a pread of an open one ~1-2 us, so the
sliver reader keeps its files open (up to `fd_max` fds, then it opens and closes)
and re-reads them with pread at offset 0 (kernfs regenerates a file read from 0).
A held fd does not keep a group from being removed: reads of a removed group fail
with ENODEV, and the fd is closed then, or when the sliver leaves the source.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from kernel import cgroups, tc

PRESSURE_RESOURCES = ("cpu", "memory", "io")
_READ_MAX = 4096


# --- node -----------------------------------------------------------------------------

def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole > 0 else 0.0


def _cpu_mhz() -> float | None:
    """The CPU's nominal speed in MHz (the highest cpufreq offers, else the current
    one), read once: CoMon's `cpuspeed`. None where the kernel tells none."""
    try:
        f = psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError):
        return None
    if f is None:
        return None
    mhz = f.max or f.current
    return round(mhz, 1) if mhz and mhz > 0 else None


class NodeReader:
    """The node's figures as the sensors `load`, `cpu`, ... of docs/sensors.md.

    Keeps the previous CPU times, for `busy_percent` since the previous collection."""

    SENSORS = ("load", "cpu", "memory", "swap", "disk", "network", "uptime", "kernel",
               "processes")

    def __init__(self, disk_path: str = "/") -> None:
        self.disk_path = disk_path
        self._last_cpu: Any = None
        self._mhz = _cpu_mhz()

    def read(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, "_" + name)() for name in self.SENSORS}

    def _load(self) -> dict[str, Any]:
        one, five, fifteen = os.getloadavg()
        return {"load1": one, "load5": five, "load15": fifteen}

    def _cpu(self) -> dict[str, Any]:
        t = psutil.cpu_times()
        out: dict[str, Any] = {"count": psutil.cpu_count() or 1}
        if self._mhz is not None:
            out["mhz"] = self._mhz
        for field in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"):
            if hasattr(t, field):
                out[f"{field}_seconds_total"] = round(getattr(t, field), 2)
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(t)
        # guest time is already counted in user time (/proc/stat): do not count twice
        total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        if self._last_cpu is not None:
            d_total, d_idle = total - self._last_cpu[0], idle - self._last_cpu[1]
            out["busy_percent"] = _pct(max(d_total - d_idle, 0.0), d_total)
        self._last_cpu = (total, idle)
        return out

    def _memory(self) -> dict[str, Any]:
        m = psutil.virtual_memory()
        return {"total_bytes": m.total, "available_bytes": m.available,
                "used_bytes": m.used, "free_bytes": m.free,
                "buffers_bytes": getattr(m, "buffers", 0), "cached_bytes": getattr(m, "cached", 0),
                "used_percent": round(m.percent, 2)}

    def _swap(self) -> dict[str, Any]:
        s = psutil.swap_memory()
        return {"total_bytes": s.total, "used_bytes": s.used, "free_bytes": s.free,
                "used_percent": round(s.percent, 2), "in_bytes_total": s.sin,
                "out_bytes_total": s.sout}

    def _disk(self) -> dict[str, Any]:
        u = psutil.disk_usage(self.disk_path)
        out: dict[str, Any] = {"path": self.disk_path, "total_bytes": u.total,
                               "used_bytes": u.used, "free_bytes": u.free,
                               "used_percent": round(u.percent, 2)}
        io = psutil.disk_io_counters()
        if io is not None:
            out.update(read_bytes_total=io.read_bytes, written_bytes_total=io.write_bytes,
                       reads_total=io.read_count, writes_total=io.write_count)
        return out

    def _network(self) -> dict[str, Any]:
        keys = (("sent_bytes_total", "bytes_sent"), ("received_bytes_total", "bytes_recv"),
                ("sent_packets_total", "packets_sent"),
                ("received_packets_total", "packets_recv"),
                ("in_errors_total", "errin"), ("out_errors_total", "errout"),
                ("in_drops_total", "dropin"), ("out_drops_total", "dropout"))
        out: dict[str, Any] = {"interfaces": 0, **{k: 0 for k, _ in keys}}
        for ifname, c in psutil.net_io_counters(pernic=True).items():
            if ifname == "lo":
                continue
            out["interfaces"] += 1
            for key, attr in keys:
                out[key] += getattr(c, attr)
        return out

    def _uptime(self) -> dict[str, Any]:
        boot = psutil.boot_time()
        return {"boot_time_seconds": int(boot), "uptime_seconds": round(time.time() - boot, 1)}

    def _kernel(self) -> dict[str, Any]:
        u = os.uname()
        return {"sysname": u.sysname, "release": u.release, "version": u.version,
                "machine": u.machine, "hostname": u.nodename}

    def _processes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total": len(psutil.pids())}
        # /proc/loadavg field 4: "running/total" scheduling entities (threads)
        fields = Path("/proc/loadavg").read_text().split()
        out["threads"] = int(fields[3].split("/")[1])
        for line in Path("/proc/stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "procs_running":
                out["running"] = int(value)
            elif key == "procs_blocked":
                out["blocked"] = int(value)
            elif key == "processes":
                out["forks_total"] = int(value)
        return out


# --- slivers --------------------------------------------------------------------------

def _read(path: bytes) -> bytes | None:
    """A cgroup file's content, None if it (or its group) is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
            return None
        raise
    try:
        return os.read(fd, _READ_MAX)
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):   # the group was removed
            return None
        raise
    finally:
        os.close(fd)


_PSI_FIELDS = ("avg10", "avg60", "avg300", "seconds_total")
PSI_KEYS = {r: tuple(f"pressure_{r}_{k}_{f}" for k in ("some", "full") for f in _PSI_FIELDS)
            for r in PRESSURE_RESOURCES}
PRESSURE_SPREAD = 4        # a sliver's pressure files are read every 4th collection ...
PRESSURE_MAX_AGE_S = 10.0  # ... and whenever the values kept are older than this


def parse_pressure(data: bytes, resource: str, out: dict[str, Any]) -> None:
    """PSI lines (Documentation/accounting/psi.rst):
    `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and the same with `full`;
    total is in microseconds."""
    out.update(_pressure_pairs(data, resource))


def _pressure_pairs(data: bytes, resource: str) -> tuple[tuple[str, float], ...]:
    """(key, value) pairs of one pressure file: one split, fixed offsets, no str."""
    t = data.split()
    keys = PSI_KEYS[resource]
    pairs: list[tuple[str, float]] = []
    for i in range(0, len(t) - 4, 5):
        k = 0 if t[i] == b"some" else 4 if t[i] == b"full" else -1
        if k < 0 or not t[i + 4].startswith(b"total="):
            continue
        pairs += ((keys[k], float(t[i + 1][6:])), (keys[k + 1], float(t[i + 2][6:])),
                  (keys[k + 2], float(t[i + 3][7:])),
                  (keys[k + 3], int(t[i + 4][6:]) / 1e6))
    return tuple(pairs)


@dataclass(frozen=True)
class _Paths:
    cpu: bytes           # v1 cpuacct.usage (ns) or v2 cpu.stat (usage_usec first)
    memory: bytes
    pids: bytes
    pressure: tuple[tuple[str, bytes], ...]
    v2_cpu: bool


class SliverReader:
    """Every sliver's cgroup figures, and its HTB class counters.

    `layout` and `parent` are those of kernel/cgroups.py (the agent's
    `cgroup_parent`); `interfaces` are the shaped interfaces whose HTB classes are
    read (kernel/tc.py), none while shaping is off.

    Pressure (PSI) files cost twice a counter file to read and are averages over
    10 s / 60 s / 300 s (the kernel recomputes them every 2 s), so a sliver's are
    re-read only on its turn (every `pressure_spread`-th collection, round robin) or
    when the values kept for it are older than `pressure_max_age` seconds; between
    reads its last values are given again. A file whose bytes did not change is not
    parsed again (an idle sliver's never change)."""

    def __init__(self, layout: cgroups.Layout | None = None,
                 parent: str = cgroups.PARENT, interfaces: Sequence[str] = (),
                 fd_max: int = 6144, pressure_spread: int = PRESSURE_SPREAD,
                 pressure_max_age: float = PRESSURE_MAX_AGE_S) -> None:
        self.layout = layout or cgroups.detect_layout()
        self.fd_max = fd_max
        self._fds: dict[bytes, int] = {}
        self.parent = parent
        self.interfaces = tuple(interfaces)
        self.pressure_spread = max(1, pressure_spread)
        self.pressure_max_age = pressure_max_age
        self._paths: dict[str, _Paths] = {}
        self._shapers: dict[str, tc.Shaper] = {}
        self._psi = self._have_psi()
        # name -> (monotonic time of the read, pressure keys); path -> (bytes, pairs)
        self._psi_kept: dict[str, tuple[float, dict[str, float]]] = {}
        self._psi_raw: dict[bytes, tuple[bytes, tuple[tuple[str, float], ...]]] = {}
        self._round = 0
        self._held: dict[str, tuple[int, int, int]] = {}   # cpu, memory, pids fds

    def _have_psi(self) -> bool:
        v2 = self.layout.v2
        return v2 is not None and (v2 / "cpu.pressure").exists()

    def _paths_of(self, name: str) -> _Paths:
        p = self._paths.get(name)
        if p is None:
            g = cgroups.SliverCgroup(self.layout, name, self.parent)
            v2 = self.layout.mode == "v2"
            v2_dir = g.v2_dir()
            pressure: tuple[tuple[str, bytes], ...] = ()
            if self._psi and v2_dir is not None:
                pressure = tuple((r, os.fsencode(v2_dir / f"{r}.pressure"))
                                 for r in PRESSURE_RESOURCES)
            if v2:
                d = g.path("cpu")
                p = _Paths(os.fsencode(d / "cpu.stat"), os.fsencode(d / "memory.current"),
                           os.fsencode(d / "pids.current"), pressure, True)
            else:
                p = _Paths(os.fsencode(g.path("cpuacct") / "cpuacct.usage"),
                           os.fsencode(g.path("memory") / "memory.usage_in_bytes"),
                           os.fsencode(g.path("pids") / "pids.current"), pressure, False)
            self._paths[name] = p
        return p

    def _get(self, path: bytes) -> bytes | None:
        fd = self._fds.get(path)
        if fd is not None:
            try:
                return os.pread(fd, _READ_MAX, 0)
            except OSError as exc:
                if exc.errno not in (errno.ENODEV, errno.ENOENT):
                    raise
                os.close(self._fds.pop(path))   # the group is gone (maybe made again)
        if len(self._fds) >= self.fd_max:
            return _read(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
                return None
            raise
        self._fds[path] = fd
        try:
            return os.pread(fd, _READ_MAX, 0)
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                os.close(self._fds.pop(path))
                return None
            raise

    def _forget(self, name: str) -> None:
        self._psi_kept.pop(name, None)
        self._held.pop(name, None)
        p = self._paths.pop(name, None)
        if p is None:
            return
        for _, path in p.pressure:
            self._psi_raw.pop(path, None)
        for path in (p.cpu, p.memory, p.pids, *(x for _, x in p.pressure)):
            fd = self._fds.pop(path, None)
            if fd is not None:
                os.close(fd)

    def read_one(self, name: str, pressure: bool = True,
                 now: float | None = None) -> dict[str, Any]:
        """The cgroup keys of one sliver; {} when it has no group (not running).
        `pressure` False gives the pressure values kept from its last read."""
        p = self._paths_of(name)
        raw = self._get(p.cpu)
        if raw is None:
            self._psi_kept.pop(name, None)
            return {}
        out: dict[str, Any] = {}
        if p.v2_cpu:   # first line: usage_usec N
            out["cpu_seconds_total"] = int(raw.split(None, 2)[1]) / 1e6
        else:
            out["cpu_seconds_total"] = int(raw) / 1e9
        mem = self._get(p.memory)
        if mem is not None:
            out["memory_bytes"] = int(mem)
        pids = self._get(p.pids)
        if pids is not None:
            out["processes"] = int(pids)
        if not p.pressure:
            return out
        kept = self._psi_kept.get(name)
        if kept is None or pressure:
            pairs: tuple[tuple[str, float], ...] = ()
            for resource, path in p.pressure:
                data = self._get(path)
                if data is None:
                    continue
                last = self._psi_raw.get(path)
                if last is None or last[0] != data:
                    last = self._psi_raw[path] = (data, _pressure_pairs(data, resource))
                pairs += last[1]
            kept = self._psi_kept[name] = (time.monotonic() if now is None else now,
                                           dict(pairs))
        out.update(kept[1])
        fds = (self._fds.get(p.cpu, -1), self._fds.get(p.memory, -1),
               self._fds.get(p.pids, -1))
        if -1 not in fds and "memory_bytes" in out and "processes" in out:
            self._held[name] = fds    # read() may read these three directly
        return out

    def read(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        spread, turn = self.pressure_spread, self._round % self.pressure_spread
        self._round += 1
        stale = now - self.pressure_max_age
        kept = self._psi_kept
        held, pread, v2_cpu = self._held, os.pread, self.layout.mode == "v2"
        out: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(names):
            k = kept.get(name)
            due = k is None or i % spread == turn or k[0] <= stale
            fds = held.get(name)
            if fds is None or k is None or due:
                out[name] = self.read_one(name, due, now)
                continue
            # the common case, inlined: three counters from held fds, pressure kept
            try:
                cpu, mem, pids = pread(fds[0], 64, 0), pread(fds[1], 64, 0), pread(fds[2], 64, 0)
            except OSError:
                del held[name]
                out[name] = self.read_one(name, due, now)
                continue
            out[name] = {"cpu_seconds_total": (int(cpu.split(None, 2)[1]) / 1e6 if v2_cpu
                                               else int(cpu) / 1e9),
                         "memory_bytes": int(mem), "processes": int(pids), **k[1]}
        for gone in set(self._paths) - set(out):
            self._forget(gone)
        return out

    def htb_bytes(self, minors: Mapping[str, int]) -> dict[str, int]:
        """Bytes counted by each sliver's HTB classes (capped + exempt), summed over
        the shaped interfaces; slivers without classes are left out."""
        owner = {m: name for name, m in minors.items()}
        out: dict[str, int] = {}
        for ifname in self.interfaces:
            shaper = self._shapers.get(ifname)
            if shaper is None:
                try:
                    shaper = self._shapers[ifname] = tc.Shaper(ifname)
                except OSError:
                    continue   # the interface is gone; nothing to count there
            for minor, info in shaper.counters().items():
                name = owner.get(minor & ~tc.EXEMPT_BIT)
                if name is not None:
                    out[name] = out.get(name, 0) + info.bytes
        return out

    def close(self) -> None:
        for name in list(self._paths):
            self._forget(name)
        for shaper in self._shapers.values():
            shaper.close()
        self._shapers.clear()
