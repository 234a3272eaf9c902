"""`planetlab-agent sliver create|start|stop|destroy|list` and `planetlab-agent enter`.

Debugging commands for operators and tests. They go through the agent's own sliver
lifecycle, agent.backend.KernelBackend (create: image check, root, context with the
agent's limits mapping and hostname; destroy: context, stale leftovers, mounts, root),
with the agent's layout (images in <state_dir>/images, roots in <state_dir>/roots,
contexts in <run_dir>/contexts). What only the CLI needs is kept in
<state_dir>/cli-slivers.json (name, image, uid range, limits in the agent's
`limits_kwargs` form), so that `start` can bring a sliver back after a reboot and
`destroy` knows what to release. CLI slivers run without the guard (no agent
supervises them) and are not in the agent's state: the agent neither adopts nor
destroys them.

uid ranges: the CLI reserves its ranges in the uid index of the contexts dir
(kernel.context.reserve_uid_range), the one every Context.create there checks, and
picks them above the agent's pool (uid_pool_start + uid_pool_ranges * uid_range_size
of the config), which the agent allocates from without asking anyone: so neither
ever takes a range the other holds. An explicit --uid-base inside the agent's pool
is refused.

run_dir is the config's when --config is given; with only --state-dir it is
<state_dir>/run, so a test's state dir holds everything of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.backend import KernelBackend, MissingImage, SliverPlan, kernel_limits
from agent.relay import relay_pipes, relay_pty
from kernel.context import (
    PIPE,
    Context,
    ContextError,
    _check_name,
    release_uid_range,
    reserve_uid_range,
)
from kernel.images import ImageError
from kernel.rootfs import RootError

RECORDS = "cli-slivers.json"
UID_COUNT = 65536
DEFAULT_UID_POOL = 1_000_000
DEFAULT_UID_POOL_RANGES = 30000


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    run_dir: Path
    uid_pool_start: int      # the agent's pool: uid_pool_start..uid_pool_end - 1
    uid_pool_end: int
    cgroup_parent: str       # the agent's `cgroup_parent`, so both keep slivers together

    @property
    def images(self) -> Path:
        return self.state_dir / "images"

    @property
    def roots(self) -> Path:
        return self.state_dir / "roots"

    @property
    def contexts(self) -> Path:
        return self.run_dir / "contexts"

    @property
    def records(self) -> Path:
        return self.state_dir / RECORDS


def register(sub: Any) -> None:
    p = sub.add_parser("sliver", help="debugging: create, start, stop, destroy, list slivers")
    ssub = p.add_subparsers(dest="sliver_command", metavar="ACTION", required=True)

    q = ssub.add_parser("create", help="create and start a sliver from an image")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--image", metavar="IMG", required=True)
    q.add_argument("--uid-base", metavar="N", type=_nonneg_int,
                   help="first host uid of its 65536 (default: the first free range "
                   "above the agent's uid pool; refused inside that pool)")
    q.add_argument("--cpu-share", metavar="N", type=_pos_int, default=1)
    q.add_argument("--cpu-pct", metavar="P", type=_pos_int)
    q.add_argument("--mem-max", metavar="BYTES", type=_pos_int)
    q.add_argument("--pids-max", metavar="N", type=_pos_int)
    q.add_argument("--disk-max", metavar="KIB", type=_pos_int)
    q.set_defaults(func=cmd_create)

    for action, text, func in (("start", "start (thaw, or bring back after a reboot)", cmd_start),
                               ("stop", "stop (freeze every process)", cmd_stop),
                               ("destroy", "destroy: processes, root, cgroups, record", cmd_destroy)):
        q = ssub.add_parser(action, help=text)
        q.add_argument("name", metavar="NAME")
        q.set_defaults(func=func)

    q = ssub.add_parser("list", help="slivers: state, image, uids, init pid, usage")
    q.add_argument("--json", action="store_true", help="one JSON array")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("enter", help="run a command (default: a shell) inside a sliver")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--user", "-u", default="root", help="a user of the sliver's /etc/passwd")
    g = q.add_mutually_exclusive_group()
    g.add_argument("-t", "--tty", dest="tty", action="store_true", default=None,
                   help="allocate a terminal (default when stdin and stdout are terminals)")
    g.add_argument("-T", "--no-tty", dest="tty", action="store_false")
    q.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...",
                   help="the command and its arguments, after -- (options of enter "
                   "may come between NAME and --)")
    q.set_defaults(func=cmd_enter)


def _pos_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return v


def _paths(args: argparse.Namespace) -> Paths:
    state_dir = getattr(args, "state_dir", None)
    try:
        cfg = config_mod.load(args.config) if getattr(args, "config", None) \
            else config_mod.defaults()
    except config_mod.ConfigError as exc:
        print(f"planetlab-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if state_dir:
        sd = Path(state_dir).resolve()
        rd = Path(cfg.run_dir) if getattr(args, "config", None) else sd / "run"
    else:
        sd, rd = Path(cfg.state_dir), Path(cfg.run_dir)
    start = int(getattr(cfg, "uid_pool_start", DEFAULT_UID_POOL))
    end = start + int(getattr(cfg, "uid_pool_ranges", DEFAULT_UID_POOL_RANGES)) * \
        int(getattr(cfg, "uid_range_size", UID_COUNT))
    return Paths(sd, rd, start, end, str(cfg.cgroup_parent))


def _fail(what: str, msg: object) -> int:
    print(f"planetlab-agent {what}: {msg}", file=sys.stderr)
    return 1


# -- the record file --------------------------------------------------------------

@contextlib.contextmanager
def _records(p: Paths) -> Iterator[dict[str, dict[str, Any]]]:
    """The CLI's records, locked for the duration; written back on success."""
    p.state_dir.mkdir(parents=True, exist_ok=True)
    with open(p.state_dir / (RECORDS + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(p.records.read_text()) if p.records.exists() else {}
        except json.JSONDecodeError as exc:
            raise SystemExit(f"planetlab-agent: {p.records} is corrupt ({exc}); "
                             "fix or remove it") from None
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            tmp = p.records.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, p.records)


def _reserve_uids(p: Paths, name: str, records: dict[str, dict[str, Any]],
                  base: int | None) -> int:
    """Reserve `name`'s uid range in the contexts dir's uid index (see the module
    doc): `base` if given (refused inside the agent's pool or over a taken range),
    else the first free range above the agent's pool. The CLI's recorded slivers
    that are not running now keep their ranges too."""
    if base is not None and base < p.uid_pool_end and p.uid_pool_start < base + UID_COUNT:
        raise ValueError(f"uid range {base}..{base + UID_COUNT - 1} is in the agent's pool "
                         f"{p.uid_pool_start}..{p.uid_pool_end - 1}; choose a base outside "
                         "it or leave --uid-base out")
    avoid = [(int(r["uid_base"]), int(r["uid_count"])) for n, r in records.items()
             if n != name]
    return reserve_uid_range(p.contexts, name, UID_COUNT, base=base,
                             lowest=max(p.uid_pool_end, 1), avoid=avoid)


# -- commands ---------------------------------------------------------------------

def _backend(p: Paths) -> KernelBackend:
    return KernelBackend(p.state_dir, p.run_dir, cgroup_parent=p.cgroup_parent)


def _plan(name: str, rec: dict[str, Any]) -> SliverPlan:
    """The agent's plan for a CLI record (limits in agent.rspec.limits_kwargs form;
    records of older CLIs hold kernel Limits.to_json(), whose keys are the same)."""
    return SliverPlan(name=name, image=rec["image"], uid_base=int(rec["uid_base"]),
                      uid_count=int(rec["uid_count"]), limits=dict(rec["limits"]),
                      disk_max_kib=rec.get("disk_max_kib"), hostname=name)


_ERRORS = (ValueError, OSError, ContextError, ImageError, RootError, MissingImage)


def _error(exc: BaseException) -> str:
    if isinstance(exc, MissingImage):
        return f"image {exc.args[0]!r} is not on this node"
    return str(exc)


def cmd_create(args: argparse.Namespace) -> int:
    p = _paths(args)
    limits = {"cpu_share": args.cpu_share, "cpu_pct": args.cpu_pct,
              "mem_max": args.mem_max, "pids_max": args.pids_max}
    try:
        kernel_limits(limits).validate()
        _check_name(args.name)
        with _records(p) as records:
            if args.name in records or (p.contexts / args.name).exists():
                return _fail("sliver create", f"sliver {args.name!r} exists already")
            base = _reserve_uids(p, args.name, records, args.uid_base)
            rec = {"image": args.image, "uid_base": base, "uid_count": UID_COUNT,
                   "limits": limits, "disk_max_kib": args.disk_max}
            backend = _backend(p)
            try:
                backend.create(_plan(args.name, rec))   # unguarded: no socket back
            except BaseException:
                release_uid_range(p.contexts, args.name)
                raise
            records[args.name] = rec
            pid = _adopt(p, args.name).init_pid
    except _ERRORS as exc:
        return _fail("sliver create", _error(exc))
    print(f"created {args.name}: uids {base}..{base + UID_COUNT - 1}, init pid {pid}")
    return 0


def _adopt(p: Paths, name: str) -> Any:
    return Context.adopt(p.contexts, name)


def cmd_start(args: argparse.Namespace) -> int:
    p = _paths(args)
    backend = _backend(p)
    try:
        if args.name in backend.live():
            backend.start(args.name)
            print(f"started {args.name}")
            return 0
        with _records(p) as records:
            rec = records.get(args.name)
            if rec is None:
                return _fail("sliver start", f"no sliver {args.name!r}")
            # Not running (reboot, crash): create clears what is left and brings it
            # back on its root, with its recorded uid range.
            backend.create(_plan(args.name, rec))
            pid = _adopt(p, args.name).init_pid
    except _ERRORS as exc:
        return _fail("sliver start", _error(exc))
    print(f"started {args.name} again: init pid {pid}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    p = _paths(args)
    backend = _backend(p)
    try:
        if args.name not in backend.live():
            return _fail("sliver stop", f"{args.name} is not running")
        backend.stop(args.name)
    except (OSError, ContextError, TimeoutError) as exc:
        return _fail("sliver stop", exc)
    print(f"stopped {args.name}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    p = _paths(args)
    try:
        _check_name(args.name)
        with _records(p) as records:
            known = args.name in records or (p.contexts / args.name).exists()
            if not known:
                return _fail("sliver destroy", f"no sliver {args.name!r}")
            _backend(p).destroy(args.name)   # running or not
            records.pop(args.name, None)
    except _ERRORS as exc:
        return _fail("sliver destroy", _error(exc))
    print(f"destroyed {args.name}")
    return 0


def _describe(p: Paths, name: str, rec: dict[str, Any] | None) -> dict[str, Any]:
    st = Context.read_state(p.contexts, name)
    row: dict[str, Any] = {"name": name, "image": rec.get("image") if rec else None,
                           "uid_base": (rec or st or {}).get("uid_base"),
                           "state": "down", "init_pid": None}
    if st is not None:
        try:
            ctx = Context(p.contexts, name, st)
            if ctx.alive():
                row["state"] = "stopped" if ctx.frozen() else "running"
                row["init_pid"] = ctx.init_pid
                row.update(ctx.usage())
            else:
                row["state"] = "dead"
        except OSError:
            row["state"] = "dead"
    return row


def cmd_list(args: argparse.Namespace) -> int:
    p = _paths(args)
    with _records(p) as records:
        names = sorted(set(records) | set(Context.list(p.contexts)))
        rows = [_describe(p, n, records.get(n)) for n in names]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':24} {'STATE':8} {'IMAGE':12} {'UID_BASE':>11} {'INIT':>7} "
          f"{'PIDS':>5} {'MEM_KIB':>9}")
    for r in rows:
        mem = r.get("mem_bytes")
        print(f"{r['name']:24} {r['state']:8} {r['image'] or '-':12} "
              f"{r['uid_base'] if r['uid_base'] is not None else '-':>11} "
              f"{r['init_pid'] or '-':>7} {r.get('pids', '-'):>5} "
              f"{mem // 1024 if mem is not None else '-':>9}")
    return 0


# -- enter ------------------------------------------------------------------------

def cmd_enter(args: argparse.Namespace) -> int:
    p = _paths(args)
    try:
        argv = _split_enter_args(args)
    except ValueError as exc:
        return _fail("enter", exc)
    use_tty = args.tty if args.tty is not None else (os.isatty(0) and os.isatty(1))
    try:
        ctx = _adopt(p, args.name)
        if not use_tty:
            # None of our stdio is ever handed into the sliver: a terminal could be read
            # by a process there later (F10), a file written after enter returned (F37).
            # Pipes, relayed until the command exits.
            piped = ctx.spawn(argv, user=args.user, stdin=PIPE, stdout=PIPE, stderr=PIPE)
            try:
                relay_pipes(piped)
                return _exit_code(piped.wait())
            finally:
                piped.close()
        size = os.get_terminal_size(1) if os.isatty(1) else os.terminal_size((80, 24))
        proc = ctx.spawn(argv, user=args.user, tty=True, winsize=(size.lines, size.columns))
    except FileNotFoundError:
        return _fail("enter", f"no sliver {args.name!r} on this node (see `list`)")
    except ProcessLookupError as exc:
        return _fail("enter", f"{args.name} is not running ({exc})")
    except (OSError, ContextError, ValueError) as exc:
        return _fail("enter", exc)
    try:
        relay_pty(proc.master)
        return _exit_code(proc.wait())
    finally:
        proc.close()


def _split_enter_args(args: argparse.Namespace) -> list[str]:
    """argparse stops at NAME; take enter's own options up to `--`, the rest is
    the command (`enter s1 --user bob -- id`, `enter s1 id`)."""
    rest = list(args.command)
    while rest and rest[0] != "--":
        opt = rest[0]
        if opt in ("--user", "-u"):
            if len(rest) < 2:
                raise ValueError(f"{opt} needs a user name")
            args.user = rest[1]
            rest = rest[2:]
        elif opt.startswith("--user="):
            args.user = opt.split("=", 1)[1]
            rest = rest[1:]
        elif opt in ("-t", "--tty", "-T", "--no-tty"):
            args.tty = opt in ("-t", "--tty")
            rest = rest[1:]
        else:
            return rest            # no `--`: the command starts here
    return rest[1:]


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc
