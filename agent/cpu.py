"""CPU policy: shares, caps, reservations (`cpu_pct`), whole cores (`cpu_cores`) and
`cpu_freezable`, for every sliver of the node at once. Pure: no I/O (docs/cpu.md).

cgroups have no minimum for CPU, so a reservation is made of weights: under full
contention a group gets weight / (sum of its siblings' weights) of the CPUs they
share. Every sliver's group is a sibling under the node-wide parent; the best-effort
ones keep `cpu_share` x 100, and a sliver reserving the fraction f_i of the shared
CPUs gets

    w_i = f_i / (1 - F) x W_be        (F = sum of the admitted f, W_be = best-effort sum)

so that w_i / (W_be + sum w) = f_i exactly when every sliver is busy, and more when
some are idle (CFS is work-conserving). The weights depend on the whole set, so they
are recomputed (and rewritten in place where they changed) whenever a sliver comes,
goes or changes its tags: `allocate` is called with all of them.

Admission: reservations together may take at most (100 - headroom) % of the shared
CPUs; one that does not fit is refused (the sliver runs best-effort, by its share)
and the refusal names the numbers. Slivers admitted before keep their reservation
(and cores); newcomers are served in name order, and new cores are refused when the
CPUs left shared would no longer hold the reservations admitted before. Whole cores (`cpu_cores` "N" or "Nb") are taken
the same way, never more than the node's CPUs minus one (the host keeps a core).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

WEIGHT_PER_SHARE = 100      # cgroup v2 cpu.weight of cpu_share 1 (the kernel default)
WEIGHT_MAX = 10_000         # cgroup v2's largest cpu.weight
# A reservation is computed for this many points more than asked, so scheduler noise
# (tick granularity, load balancing across CPUs) does not eat into it.
RESERVE_SLACK_PCT = 2.0


@dataclass(frozen=True)
class CpuRequest:
    """What a sliver's rspec asks for (agent.rspec.limits_kwargs)."""

    share: int = 1                 # cpu_share: a weight
    reserve_pct: int = 0           # cpu_pct: percent of the node reserved
    cap_pct: int | None = None     # cpu_cap: percent of one CPU at most
    cores: int = 0                 # cpu_cores: whole cores
    cores_pool: bool = True        # the "b" suffix: the best-effort pool too
    freezable: bool = False        # cpu_freezable

    @classmethod
    def from_limits(cls, limits: Mapping[str, Any]) -> CpuRequest:
        cores, pool = parse_cores(str(limits.get("cpu_cores", "0b")))
        # "cpu_pct" is the cap's older name in the sliver CLI's records (agent/cli_sliver.py).
        cap = limits.get("cpu_cap", limits.get("cpu_pct"))
        return cls(share=max(1, int(limits.get("cpu_share", 1))),
                   reserve_pct=int(limits.get("cpu_reserve_pct", 0) or 0),
                   cap_pct=int(cap) if cap else None, cores=cores, cores_pool=pool,
                   freezable=bool(int(limits.get("cpu_freezable", 0) or 0)))


@dataclass(frozen=True)
class CpuGrant:
    """What a sliver gets. `weight` is on cgroup v2's scale (1..10000)."""

    weight: int
    cap_pct: int | None
    cpus: str | None              # cpuset.cpus; None: all the node's
    partition: bool               # its cores are a cpuset partition (exclusive)
    reserve_pct: int              # the reservation admitted (0: none or refused)
    cores: tuple[int, ...]        # the whole cores it holds
    freeze: bool                  # cpu_freezable and no cores held
    refused: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cores"] = list(self.cores)
        d["refused"] = list(self.refused)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CpuGrant:
        return cls(weight=int(d["weight"]), cap_pct=d.get("cap_pct"), cpus=d.get("cpus"),
                   partition=bool(d.get("partition")), reserve_pct=int(d["reserve_pct"]),
                   cores=tuple(int(c) for c in d.get("cores", ())),
                   freeze=bool(d.get("freeze")), refused=tuple(d.get("refused", ())))


def parse_cores(text: str) -> tuple[int, bool]:
    """`cpu_cores` "N" or "Nb" -> (N, with the best-effort pool)."""
    text = text.strip()
    pool = text.endswith("b")
    digits = text[:-1] if pool else text
    if not digits.isdigit():
        raise ValueError(f"cpu_cores {text!r} must be <n> or <n>b")
    return int(digits), pool


def cpulist(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the kernel's list format)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def parse_cpulist(text: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def allocate(requests: Mapping[str, CpuRequest], node_cpus: Sequence[int],
             headroom_pct: float, previous: Mapping[str, CpuGrant] | None = None
             ) -> dict[str, CpuGrant]:
    """Grants for every sliver in `requests`; `previous` grants keep their cores and
    reservations first (a newcomer never takes what a running sliver holds)."""
    previous = previous or {}
    ncpu = len(node_cpus)
    def holders_first(attr: str) -> list[str]:
        return sorted(requests, key=lambda n: (not getattr(previous.get(n, _NONE), attr), n))
    refused: dict[str, list[str]] = {n: [] for n in requests}

    # Whole cores: earlier holders keep theirs; at most ncpu - 1 go to slivers.
    held: dict[str, list[int]] = {}
    free = list(node_cpus)
    budget = max(0, ncpu - 1)
    for name in holders_first("cores"):
        want = requests[name].cores
        if not want:
            continue
        if want > budget:
            refused[name].append(
                f"cpu_cores {want} refused: {budget} of the node's {ncpu} CPUs are left "
                "for whole cores (one always stays with the host)")
            continue
        keep = [c for c in previous.get(name, _NONE).cores if c in free][:want]
        rest = [c for c in free if c not in keep][:want - len(keep)]
        got = keep + rest
        if rest and not _reservations_fit(requests, previous, held, name,
                                          len(free) - len(got), ncpu, headroom_pct):
            refused[name].append(
                f"cpu_cores {want} refused: the {len(free) - len(got)} CPUs left shared "
                "would no longer hold the reservations (cpu_pct) admitted before")
            continue
        held[name] = got
        free = [c for c in free if c not in got]
        budget -= want
    pool = free                                   # the best-effort pool
    npool = len(pool)

    # Reservations: a fraction of the pool's CPUs; admitted in the same order.
    limit = (100.0 - headroom_pct) / 100.0
    frac: dict[str, float] = {}
    total = 0.0
    for name in holders_first("reserve_pct"):
        r = requests[name]
        if not r.reserve_pct or (name in held and not r.cores_pool):
            continue   # (an exclusive-core sliver does not run in the pool)
        f = r.reserve_pct * ncpu / (100.0 * npool) if npool else math.inf
        if total + f > limit + 1e-9:
            refused[name].append(
                f"cpu_pct {r.reserve_pct} refused: reservations hold "
                f"{total * npool * 100 / ncpu:.0f}% of the node and may hold "
                f"{limit * npool * 100 / ncpu:.0f}% (cpu_headroom_pct {headroom_pct:g} "
                f"on {npool} shared CPUs of {ncpu}); running best-effort")
            continue
        frac[name] = f
        total += f

    # Weights.
    in_pool = [n for n in requests if not (n in held and not requests[n].cores_pool)]
    w_be = sum(requests[n].share * WEIGHT_PER_SHARE for n in in_pool if n not in frac)
    slack = RESERVE_SLACK_PCT * ncpu / (100.0 * npool) if npool else 0.0
    boosted = {n: min(f + slack, f * 2) for n, f in frac.items()}
    room = max(1e-3, 1.0 - sum(boosted.values()))
    raw: dict[str, float] = {}
    for name in requests:
        share_w = float(requests[name].share * WEIGHT_PER_SHARE)
        if name in boosted:
            need = boosted[name] / room * w_be if w_be else boosted[name] * WEIGHT_MAX
            raw[name] = max(need, share_w)
        else:
            raw[name] = share_w
    top = max(raw.values(), default=0.0)
    scale = WEIGHT_MAX / top if top > WEIGHT_MAX else 1.0

    out: dict[str, CpuGrant] = {}
    pool_list = cpulist(pool) if held else None
    for name in requests:
        r = requests[name]
        cores = tuple(held.get(name, ()))
        cpus: str | None
        if cores:
            cpus = cpulist(cores) if not r.cores_pool else cpulist([*cores, *pool])
        else:
            cpus = pool_list
        weight = max(1, min(WEIGHT_MAX, math.ceil(raw[name] * scale)))
        out[name] = CpuGrant(
            weight=weight, cap_pct=r.cap_pct, cpus=cpus,
            partition=bool(cores) and not r.cores_pool,
            reserve_pct=r.reserve_pct if name in frac else 0, cores=cores,
            freeze=r.freezable and not cores, refused=tuple(refused[name]))
    return out


def _reservations_fit(requests: Mapping[str, CpuRequest], previous: Mapping[str, CpuGrant],
                      held: Mapping[str, list[int]], taker: str, npool: int, ncpu: int,
                      headroom_pct: float) -> bool:
    """Whether the reservations admitted before still fit in a pool of `npool` CPUs
    (new cores never evict an admitted reservation)."""
    pcts = [requests[n].reserve_pct for n, g in previous.items()
            if n in requests and g.reserve_pct and requests[n].reserve_pct
            and not ((n in held or n == taker) and not requests[n].cores_pool)]
    if not pcts:
        return True
    return bool(npool) and sum(pcts) * ncpu / (100.0 * npool) <= (100 - headroom_pct) / 100 + 1e-9


_NONE = CpuGrant(weight=WEIGHT_PER_SHARE, cap_pct=None, cpus=None, partition=False,
                 reserve_pct=0, cores=(), freeze=False)
