"""cgroup groups for slivers: layout detection, limits, freeze, usage, removal.

Two layouts are supported, detected from /proc/mounts (never assumed):
- "v1" (hybrid): one v1 hierarchy per controller (cpu, cpuacct, cpuset, memory, pids,
  freezer, net_cls), usually with a controller-less cgroup2 beside it
  (/sys/fs/cgroup/unified). A sliver gets a group in every one of them, the cgroup2
  one included (so nftables `socket cgroupv2` can match it). The net_cls hierarchy is
  mounted at <cgroup root>/net_cls when the kernel has it and nobody mounted it.
- "v2": a single cgroup2 hierarchy with cpu, memory, pids, cpuset enabled down to the
  node-wide parent. There is no net_cls in v2; the class id is kept in the sliver's
  record and the bandwidth shaper classifies by the cgroup2 path instead
  (`SliverCgroup.v2_path`, for nftables `socket cgroupv2` or a cgroup BPF program).

Every sliver's group lives under one node-wide parent, `planetlab/` by default.
Writes raise OSError naming the file and the value; nothing here holds policy.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kernel import netclass as _netclass
from kernel import sockcap as _sockcap

PARENT = "planetlab"

# Controllers a sliver's group uses, per layout.
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "net_cls")
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")

CFS_PERIOD_US = 100_000
V1_SHARES_PER_UNIT = 1024     # cpu_share 1 = the kernel's default weight
V2_WEIGHT_PER_UNIT = 100


@dataclass(frozen=True)
class Layout:
    """Where the cgroup hierarchies are mounted."""

    mode: str                                   # "v1" (hybrid) or "v2"
    v1: dict[str, Path] = field(default_factory=dict)   # controller -> mount point
    v2: Path | None = None                      # cgroup2 mount point, if any

    def describe(self) -> str:
        if self.mode == "v2":
            return f"cgroup v2 only at {self.v2}"
        ctl = ", ".join(f"{c}={p}" for c, p in sorted(self.v1.items()))
        return f"cgroup v1 ({ctl}) with cgroup2 at {self.v2}"


def _parse_mounts(text: str) -> tuple[dict[str, Path], Path | None]:
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        where, fstype, opts = parts[1], parts[2], parts[3].split(",")
        where = where.replace("\\040", " ")
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(where)
        elif fstype == "cgroup":
            for opt in opts:
                if opt in V1_CONTROLLERS and opt not in v1:
                    v1[opt] = Path(where)
    return v1, v2


_detected: list[Layout] = []   # this process's cached answer (see detect_layout)


def detect_layout(mounts: str | None = None) -> Layout:
    """Read the layout from /proc/mounts (or the given text, for tests).

    "v1" when the memory controller lives in a v1 hierarchy, "v2" when a cgroup2
    mount has the controllers; anything else is an error naming what was found.
    The answer from /proc/mounts is kept for the life of the process (hierarchies
    are mounted at boot; ensure_net_cls refreshes it when it mounts one).
    """
    if mounts is None:
        if _detected:
            return _detected[0]
        layout = detect_layout(Path("/proc/mounts").read_text())
        _detected[:] = [layout]
        return layout
    v1, v2 = _parse_mounts(mounts)
    if "memory" in v1:
        return Layout("v1", v1, v2)
    if v2 is not None:
        ctrl = (v2 / "cgroup.controllers")
        have = set(ctrl.read_text().split()) if ctrl.exists() else set(V2_CONTROLLERS)
        missing = [c for c in ("cpu", "memory", "pids") if c not in have]
        if missing:
            raise OSError(errno.ENOTSUP,
                          f"cgroup2 at {v2} lacks controllers {missing}; "
                          "enable them or mount the v1 hierarchies", str(v2))
        return Layout("v2", {}, v2)
    raise OSError(errno.ENOTSUP, "no usable cgroup hierarchy: mount cgroup2 or v1 "
                  "cpu/memory/pids hierarchies", "/proc/mounts")


def _kernel_has(controller: str) -> bool:
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == controller:
            return parts[-1] == "1"
    return False


def ensure_net_cls(layout: Layout) -> Layout:
    """On a v1 layout, mount the net_cls hierarchy if the kernel has it and it is not
    mounted yet (at <dir of the memory hierarchy>/net_cls). Returns the new layout."""
    if layout.mode != "v1" or "net_cls" in layout.v1 or not _kernel_has("net_cls"):
        return layout
    from kernel.mount import mount  # thin mount(2) wrapper of the images people

    where = layout.v1["memory"].parent / "net_cls"
    where.mkdir(exist_ok=True)
    try:
        mount("cgroup", str(where), "cgroup", 0, "net_cls")
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    _detected.clear()
    return detect_layout()


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise OSError(exc.errno, f"cgroup write {value.strip()!r}: {exc.strerror}",
                      str(path)) from None


def _read(path: Path) -> str:
    return path.read_text().strip()


def _rmdir_when_empty(path: Path, deadline: float,
                      thaw: Callable[[], None] | None = None) -> None:
    """rmdir a group; while it is busy, SIGKILL its tasks (and thaw them, since a
    frozen task dies only once thawed) until `deadline`."""
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise OSError(exc.errno, f"remove cgroup: {exc.strerror}", str(path)) from None
        for pid in _pids_in(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if thaw is not None:
            thaw()
        time.sleep(0.005)


def _pids_in(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


_parents_ready: set[tuple[str, ...]] = set()


class SliverCgroup:
    """The groups of one sliver, one per hierarchy, under the node-wide parent."""

    def __init__(self, layout: Layout, name: str, parent: str = PARENT) -> None:
        for what, value in (("name", name), ("parent", parent)):
            if not value or "/" in value or value in (".", "..") or "\0" in value:
                raise ValueError(f"bad cgroup {what} {value!r}")
        self.layout = layout
        self.name = name
        self.parent = parent
        self._dirs: list[Path] | None = None

    # -- where things are --
    def path(self, controller: str) -> Path:
        """The sliver's group directory that holds `controller`'s files."""
        if self.layout.mode == "v2":
            assert self.layout.v2 is not None
            return self.layout.v2 / self.parent / self.name
        if controller == "unified":
            assert self.layout.v2 is not None
            return self.layout.v2 / self.parent / self.name
        return self.layout.v1[controller] / self.parent / self.name

    def v2_dir(self) -> Path | None:
        """The sliver's cgroup2 directory (cgroup BPF programs attach there), if any."""
        if self.layout.v2 is None:
            return None
        return self.path("cpu" if self.layout.mode == "v2" else "unified")

    @property
    def v2_path(self) -> str | None:
        """The group's path inside the cgroup2 hierarchy (for `socket cgroupv2`)."""
        return f"/{self.parent}/{self.name}" if self.layout.v2 else None

    def dirs(self) -> list[Path]:
        """Every group directory of this sliver (distinct, parents' order irrelevant)."""
        if self._dirs is None:
            self._dirs = self._compute_dirs()
        return list(self._dirs)

    def _compute_dirs(self) -> list[Path]:
        out: list[Path] = []
        if self.layout.mode == "v2":
            out.append(self.path("cpu"))
        else:
            for c in V1_CONTROLLERS:
                if c in self.layout.v1:
                    p = self.path(c)
                    if p not in out:
                        out.append(p)
            if self.layout.v2 is not None:
                out.append(self.path("unified"))
        return out

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs())

    # -- lifecycle --
    def _ensure_parent(self) -> None:
        key = tuple(str(d.parent) for d in self.dirs())
        if key in _parents_ready:      # made (or checked) once by this process
            return
        self._make_parent()
        _parents_ready.add(key)

    def _make_parent(self) -> None:
        if self.layout.mode == "v2":
            assert self.layout.v2 is not None
            top = self.layout.v2
            par = top / self.parent
            par.mkdir(exist_ok=True)
            want = " ".join("+" + c for c in V2_CONTROLLERS
                            if c in _read(top / "cgroup.controllers").split())
            for d in (top, par):
                have = set(_read(d / "cgroup.subtree_control").split())
                if not set(w[1:] for w in want.split()) <= have:
                    _write(d / "cgroup.subtree_control", want)
            return
        for c, mnt in self.layout.v1.items():
            par = mnt / self.parent
            try:
                par.mkdir()
            except FileExistsError:
                continue
            if c == "cpuset":      # a new v1 cpuset group starts with no cpus or mems
                for f in ("cpuset.cpus", "cpuset.mems"):
                    _write(par / f, _read(mnt / f))
        if self.layout.v2 is not None:
            (self.layout.v2 / self.parent).mkdir(exist_ok=True)

    def create(self, limits: LimitsLike) -> None:
        """Create every group and apply `limits`; on failure remove what was made."""
        self._ensure_parent()
        made: list[Path] = []
        try:
            for d in self.dirs():
                try:
                    d.mkdir()    # FileExistsError: the name is taken
                except FileNotFoundError:
                    # The parent went away since this process made it: again.
                    _parents_ready.clear()
                    self._ensure_parent()
                    d.mkdir()
                made.append(d)
            if self.layout.mode == "v1" and "cpuset" in self.layout.v1:
                par = self.path("cpuset").parent
                cpus = getattr(limits, "cpus", None) or _read(par / "cpuset.cpus")
                _write(self.path("cpuset") / "cpuset.cpus", cpus)
                _write(self.path("cpuset") / "cpuset.mems", _read(par / "cpuset.mems"))
            self.apply(limits, fresh=True)
        except BaseException:
            for d in reversed(made):
                _rmdir_when_empty(d, time.monotonic() + 2)
            raise

    def apply(self, limits: LimitsLike, fresh: bool = False,
              prev: LimitsLike | None = None) -> None:
        """Write the limits into the groups (also used to update them in place).

        `fresh`: the groups were just made, so values equal to the kernel's
        defaults (no cap, no limit, weight 1) need not be written. `prev`: the limits
        applied before (an update in place): only files whose value differs from the
        kernel's are written, and the socket cap and classifier only if they moved."""
        share = max(1, int(limits.cpu_share))
        pct = limits.cpu_pct
        if pct is not None and not 1 <= pct <= 100 * os.cpu_count():  # type: ignore[operator]
            raise ValueError(f"cpu_pct {pct} out of range 1..{100 * (os.cpu_count() or 1)}")
        weight = getattr(limits, "cpu_weight", None) or min(10000, share * V2_WEIGHT_PER_UNIT)

        def put(path: Path, value: str, default: str) -> None:
            if fresh:
                if value != default:
                    _write(path, value)
            elif prev is None or _read(path) != value:
                _write(path, value)

        self.set_cpu(weight, pct, getattr(limits, "cpus", None),
                     bool(getattr(limits, "cpu_partition", False)), fresh=fresh)
        if self.layout.mode == "v1":
            put(self.path("memory") / "memory.limit_in_bytes",
                "-1" if limits.mem_max is None else str(int(limits.mem_max)), "-1")
            put(self.path("pids") / "pids.max",
                "max" if limits.pids_max is None else str(int(limits.pids_max)), "max")
            if "net_cls" in self.layout.v1:
                put(self.path("net_cls") / "net_cls.classid",
                    str(int(limits.net_cls_classid or 0)), "0")
        else:
            g = self.path("cpu")
            put(g / "memory.max",
                "max" if limits.mem_max is None else str(int(limits.mem_max)), "max")
            put(g / "pids.max",
                "max" if limits.pids_max is None else str(int(limits.pids_max)), "max")
        # INET socket cap, in the kernel (kernel/sockcap.py); on create before any
        # process is in the group.
        socks = getattr(limits, "inet_sockets_max", None)
        if prev is None or getattr(prev, "inet_sockets_max", None) != socks:
            _sockcap.apply(self.v2_dir(), socks)
        # Egress classification into the sliver's HTB class (kernel/netclass.py): in
        # the step that makes the group, so its first socket is already billed to it
        # (a re-created group has a new id and gets the program here again).
        minor = getattr(limits, "net_class_minor", None)
        if minor is not None and (prev is None
                                  or getattr(prev, "net_class_minor", None) != minor):
            v2 = self.v2_dir()
            if v2 is None:
                raise OSError(errno.ENOTSUP, "net_class_minor needs a cgroup v2 hierarchy")
            _netclass.classify_cgroup(v2, minor)

    def set_cpu(self, weight: int, cap_pct: int | None, cpus: str | None,
                partition: bool = False, fresh: bool = False) -> None:
        """CPU files only, in place: weight on cgroup v2's scale (1..10000; v1 gets
        cpu.shares = weight x 1024 / 100), the cap in percent of one CPU (None: none),
        the cpuset (None: the parent's CPUs) and, on v2, whether those CPUs are an
        exclusive cpuset partition (the parent's `cpuset.cpus.exclusive` must already
        hold them: `set_parent_exclusive`). Writes only what differs from the kernel's
        value, so a rebalance of many slivers touches only the changed ones."""
        if not 1 <= weight <= 10000:
            raise ValueError(f"cpu weight {weight} out of range 1..10000")
        cap = None if cap_pct is None else max(1000, cap_pct * CFS_PERIOD_US // 100)

        def put(path: Path, value: str, default: str) -> None:
            if fresh:
                if value != default:
                    _write(path, value)
            elif _read(path) != value:
                _write(path, value)

        if self.layout.mode == "v1":
            cpu = self.path("cpu")
            put(cpu / "cpu.shares", str(max(2, min(262144, weight * V1_SHARES_PER_UNIT
                                                   // V2_WEIGHT_PER_UNIT))), "1024")
            put(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US), str(CFS_PERIOD_US))
            put(cpu / "cpu.cfs_quota_us", "-1" if cap is None else str(cap), "-1")
            if "cpuset" in self.layout.v1 and not fresh:   # (create wrote it)
                cs = self.path("cpuset")
                put(cs / "cpuset.cpus", cpus if cpus else _read(cs.parent / "cpuset.cpus"), "")
            return
        g = self.path("cpu")
        put(g / "cpu.weight", str(weight), "100")
        put(g / "cpu.max", f"{'max' if cap is None else cap} {CFS_PERIOD_US}",
            f"max {CFS_PERIOD_US}")
        if not (g / "cpuset.cpus").exists():
            if cpus:
                raise OSError(errno.ENOTSUP, "cpuset controller not enabled for slivers",
                              str(g))
            return
        part = g / "cpuset.cpus.partition"
        if not partition and part.exists() and _read(part).split()[0] != "member":
            _write(part, "member")              # leave the partition before anything
            _write(g / "cpuset.cpus.exclusive", "")
        put(g / "cpuset.cpus", cpus or "", "")
        if partition:
            put(g / "cpuset.cpus.exclusive", cpus or "", "")
            if _read(part).split()[0] != "root":
                _write(part, "root")
            state = _read(part)
            if state != "root":
                raise OSError(errno.EINVAL, f"cpuset partition of {cpus} is {state!r}",
                              str(part))

    def cpus_effective(self) -> str:
        """The CPUs the sliver's tasks may run on now, as the kernel says."""
        if self.layout.mode == "v1":
            return _read(self.path("cpuset") / "cpuset.effective_cpus")
        return _read(self.path("cpu") / "cpuset.cpus.effective")

    def attach(self, pid: int) -> None:
        """Move process `pid` into every group of the sliver."""
        for d in self.dirs():
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        """Host pids of every process in any of the sliver's groups."""
        out: set[int] = set()
        for d in self.dirs():
            out.update(_pids_in(d))
        return out

    # -- freeze --
    def _freezer(self) -> tuple[Path, str, str]:
        if self.layout.mode == "v1" and "freezer" in self.layout.v1:
            return self.path("freezer") / "freezer.state", "FROZEN", "THAWED"
        d = self.path("cpu") if self.layout.mode == "v2" else self.path("unified")
        return d / "cgroup.freeze", "1", "0"

    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze every process of the sliver and wait until the kernel says FROZEN."""
        f, on, _ = self._freezer()
        _write(f, on)
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                raise TimeoutError(f"freeze {self.name}: still not frozen after {timeout}s")
            time.sleep(0.002)

    def thaw(self) -> None:
        f, _, off = self._freezer()
        _write(f, off)

    def frozen(self) -> bool:
        f, on, _ = self._freezer()
        if f.name == "cgroup.freeze":
            events = (f.parent / "cgroup.events").read_text()
            return "frozen 1" in events
        return _read(f) == on

    # -- usage --
    def usage(self) -> dict[str, int]:
        """cpu_usec (CPU time used), mem_bytes (memory charged), pids (tasks now)."""
        if self.layout.mode == "v1":
            cpu_usec = int(_read(self.path("cpuacct") / "cpuacct.usage")) // 1000
            mem = int(_read(self.path("memory") / "memory.usage_in_bytes"))
            pids = int(_read(self.path("pids") / "pids.current"))
        else:
            g = self.path("cpu")
            stat = dict(line.split() for line in (g / "cpu.stat").read_text().splitlines())
            cpu_usec = int(stat["usage_usec"])
            mem = int(_read(g / "memory.current"))
            pids = int(_read(g / "pids.current"))
        return {"cpu_usec": cpu_usec, "mem_bytes": mem, "pids": pids}

    def destroy(self, timeout: float = 10.0) -> None:
        """Remove every group; kill (and thaw) what is still in them. Idempotent."""
        deadline = time.monotonic() + timeout
        for d in self.dirs():
            _rmdir_when_empty(d, deadline, self._thaw_quietly)

    def _thaw_quietly(self) -> None:
        try:
            self.thaw()
        except FileNotFoundError:
            pass


class LimitsLike(Protocol):
    """What apply() reads; kernel.context.Limits fits it."""

    @property
    def cpu_share(self) -> int: ...
    @property
    def cpu_pct(self) -> int | None: ...
    @property
    def mem_max(self) -> int | None: ...
    @property
    def pids_max(self) -> int | None: ...
    @property
    def net_cls_classid(self) -> int | None: ...


def node_cpus(layout: Layout, parent: str = PARENT) -> str:
    """The CPUs slivers may be given: the root's effective cpuset (v2: of the root,
    since the parent's own may shrink by the partitions below it)."""
    if layout.mode == "v1":
        if "cpuset" not in layout.v1:
            return f"0-{(os.cpu_count() or 1) - 1}"
        return _read(layout.v1["cpuset"] / "cpuset.effective_cpus")
    assert layout.v2 is not None
    f = layout.v2 / "cpuset.cpus.effective"
    return _read(f) if f.exists() else f"0-{(os.cpu_count() or 1) - 1}"


def set_parent_exclusive(layout: Layout, parent: str, cpus: str) -> None:
    """v2: the CPUs the node-wide parent may hand to partitions below it
    (`cpuset.cpus.exclusive`; a child partition's CPUs must be in it). No-op on v1,
    whose cpusets have no partitions."""
    if layout.mode != "v2":
        return
    assert layout.v2 is not None
    f = layout.v2 / parent / "cpuset.cpus.exclusive"
    if f.exists() and _read(f) != cpus:
        _write(f, cpus)


def node_budget(pids_headroom: int, mem_headroom: int) -> tuple[int, int]:
    """(pids, bytes) all slivers together may use: the kernel's pid_max and the
    node's RAM, less what the node keeps for its own processes (F41). ValueError if
    a headroom leaves nothing."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
            break
    pids, mem = pid_max - pids_headroom, total - mem_headroom
    if pids < 1 or mem < 1:
        raise ValueError(f"headroom of {pids_headroom} pids and {mem_headroom} bytes leaves "
                         f"nothing of pid_max {pid_max} and {total} bytes of RAM")
    return pids, mem


def limit_parent(layout: Layout, parent: str, pids_max: int, mem_max: int) -> list[Path]:
    """Make the node-wide parent group (if missing) and cap it: every sliver together
    gets at most `pids_max` tasks and `mem_max` bytes (hierarchical limits), so the
    node's own processes keep headroom whatever slices do (F41). Returns the files
    written."""
    SliverCgroup(layout, "probe", parent)._ensure_parent()
    if layout.mode == "v2":
        assert layout.v2 is not None
        d = layout.v2 / parent
        targets = [(d / "pids.max", pids_max), (d / "memory.max", mem_max)]
    else:
        targets = [(layout.v1["pids"] / parent / "pids.max", pids_max),
                   (layout.v1["memory"] / parent / "memory.limit_in_bytes", mem_max)]
    for path, value in targets:
        _write(path, str(int(value)))
    return [p for p, _ in targets]


def remove_parent(layout: Layout, parent: str, timeout: float = 10.0) -> list[Path]:
    """Remove the node-wide parent group and everything below it, in every hierarchy
    (a node leaving PlanetLab: `planetlab-agent decommission`). Tasks still inside are
    killed. Returns the top directories removed; idempotent."""
    tops = [mnt / parent for mnt in layout.v1.values()]
    if layout.v2 is not None:
        tops.append(layout.v2 / parent)
    deadline = time.monotonic() + timeout
    removed: list[Path] = []
    for top in dict.fromkeys(tops):     # v1 co-mounted controllers share a directory
        if not top.is_dir():
            continue
        # Deepest first: a cgroup directory holds only control files besides children.
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            _rmdir_when_empty(Path(dirpath), deadline)
        removed.append(top)
    _parents_ready.clear()
    return removed
