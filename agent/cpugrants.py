"""The CPU half of KernelBackend: every sliver's CPU request and grant (agent/cpu.py),
written in place into the kernel's cgroups (kernel.cgroups.SliverCgroup.set_cpu), and
the book of them in run_dir/cpu.json that an agent restart and `status` read
(docs/cpu.md). A mixin: KernelBackend provides `run_dir`, `cgroup_parent`,
`_contexts` and `_context`."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent import cpu as cpu_policy
from kernel import cgroups as cg
from kernel.context import Context

log = logging.getLogger("agent.backend")

CPU_BOOK = "cpu.json"


def asdict_request(r: cpu_policy.CpuRequest) -> dict[str, Any]:
    return dict(r.__dict__)


def read_cpu_book(run_dir: str | Path) -> dict[str, Any]:
    """The CPU book the agent's backend keeps (requests, grants, refusals), for status;
    {} when there is none or it does not parse."""
    try:
        data = json.loads((Path(run_dir) / CPU_BOOK).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}



class CpuGrants:
    run_dir: Path
    cgroup_parent: str
    _contexts: dict[str, Any]

    def _context(self, name: str) -> Any:   # KernelBackend's
        raise NotImplementedError

    def _cpu_init(self, book_dir: Path, headroom_pct: float) -> None:
        self.cpu_headroom_pct = headroom_pct
        self.cpu_path = book_dir / CPU_BOOK
        book = read_cpu_book(book_dir)
        self._cpu_requests = {n: cpu_policy.CpuRequest(**r)
                              for n, r in book.get("requests", {}).items()}
        self._cpu_grants = {n: cpu_policy.CpuGrant.from_json(g)
                            for n, g in book.get("grants", {}).items()}
        self._cpu_frozen: set[str] = set(book.get("frozen_by_policy", []))
        # Updates of several slivers run in threads at once: the book and its file are
        # changed by one at a time (two saves raced on the same .tmp file).
        self._cpu_lock = threading.RLock()
        self._cpu_excl_set = False      # the parent's exclusive set written once here
        self._cpu_saved: tuple[Any, ...] | None = None   # what the book on disk holds

    def _cpu_limits(self, plan: Any, base: Any) -> Any:
        """`base` (kernel Limits for `plan`) with its CPU grant; the node's grants are
        recomputed with its request (the others' changed files rewritten in place,
        cpusets shrunk before this sliver's grow)."""
        with self._cpu_lock:
            self._cpu_requests[plan.name] = cpu_policy.CpuRequest.from_limits(plan.limits)
            self._cpu_reallocate(skip=plan.name)
            g = self._cpu_grants[plan.name]
            return replace(base, cpu_weight=g.weight, cpus=g.cpus,
                           cpu_partition=g.partition)

    def _cpu_forget(self, name: str) -> None:
        with self._cpu_lock:
            if self._cpu_requests.pop(name, None) is not None:
                self._cpu_grants.pop(name, None)
                self._cpu_frozen.discard(name)
                self._cpu_reallocate(skip=name)

    def _cpu_reallocate(self, skip: str) -> None:
        layout = cg.detect_layout()
        node = cpu_policy.parse_cpulist(cg.node_cpus(layout, self.cgroup_parent))
        old = self._cpu_grants
        new = cpu_policy.allocate(self._cpu_requests, node, self.cpu_headroom_pct, old)
        for name, g in new.items():
            if g.refused and (name not in old or old[name].refused != g.refused):
                for why in g.refused:
                    log.warning("sliver %s: %s", name, why)
        self._cpu_grants = new
        # Only the others whose grant moved are written (a weight change of one sliver
        # leaves the rest as they are), and the book only when something changed.
        others = [n for n in new if n != skip and new[n] != old.get(n)]
        if others:
            running = set(Context.list(self.run_dir))
            others = [n for n in others if n in running]
        excl = cpu_policy.cpulist([c for g in new.values() if g.partition for c in g.cores])
        old_excl = cpu_policy.cpulist([c for g in old.values() if g.partition for c in g.cores])
        # Shrink first: the members (the pool), then the parent's exclusive set, then
        # the partitions.
        for name in others:
            if not new[name].partition:
                self._cpu_write(name, new[name])
        if excl != old_excl or not self._cpu_excl_set:
            cg.set_parent_exclusive(layout, self.cgroup_parent, excl)
            self._cpu_excl_set = True
        for name in others:
            if new[name].partition:
                self._cpu_write(name, new[name])
        book = (dict(self._cpu_requests), new, set(self._cpu_frozen))
        if book != self._cpu_saved:
            self._cpu_save()

    def _cpu_write(self, name: str, g: cpu_policy.CpuGrant) -> None:
        try:
            ctx = self._context(name)
            ctx.cgroup.set_cpu(g.weight, g.cap_pct, g.cpus, g.partition)
        except (ProcessLookupError, FileNotFoundError, ValueError, KeyError) as exc:
            log.info("sliver %s: CPU grant not written (%s)", name, exc)

    def _cpu_settle(self) -> None:
        """Freeze what cpu_freezable says (no cores held) and thaw what it froze before
        and now holds cores; a sliver an operator or PLC stopped is left alone."""
        with self._cpu_lock:
            changed = False
            for name, g in self._cpu_grants.items():
                if name not in self._contexts:
                    continue
                ctx = self._contexts[name]
                if g.freeze and name not in self._cpu_frozen and not ctx.frozen():
                    log.info("sliver %s: frozen: cpu_freezable=1 and it holds no cores", name)
                    ctx.stop()
                    self._cpu_frozen.add(name)
                    changed = True
                elif not g.freeze and name in self._cpu_frozen:
                    log.info("sliver %s: thawed: it holds cores %s", name, list(g.cores))
                    ctx.start()
                    self._cpu_frozen.discard(name)
                    changed = True
            if changed:
                self._cpu_save()

    def _cpu_save(self) -> None:
        with self._cpu_lock:
            book = {"headroom_pct": self.cpu_headroom_pct,
                    "requests": {n: asdict_request(r) for n, r in self._cpu_requests.items()},
                    "grants": {n: g.to_json() for n, g in self._cpu_grants.items()},
                    "frozen_by_policy": sorted(self._cpu_frozen)}
            tmp = self.cpu_path.with_name(self.cpu_path.name + ".tmp")
            tmp.write_text(json.dumps(book, sort_keys=True))
            tmp.replace(self.cpu_path)
            self._cpu_saved = (dict(self._cpu_requests), dict(self._cpu_grants),
                               set(self._cpu_frozen))

    def cpu_grant(self, name: str) -> dict[str, Any] | None:
        g = self._cpu_grants.get(name)
        return None if g is None else g.to_json()
