"""The per-sliver INET socket cap (kernel/sockcap.py, kernel/ebpf.py) on the real kernel.

Slivers are real contexts (kernel/context.py) with a static probe (sockprobe.c) in
their roots; the lower-level cases use a bare cgroup v2 group and forked children.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import ebpf, sockcap
from kernel.cgroups import detect_layout
from kernel.context import Context, Limits
from tests.kernel.test_context_support import Slivers, slivers

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

PID = os.getpid()
REPO = Path(__file__).resolve().parents[2]
EPERM = f"E{errno.EPERM}"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"sockprobe{PID}") / "sockprobe"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out),
                    str(Path(__file__).with_name("sockprobe.c"))],
                   check=True, timeout=120, capture_output=True)
    return out


@pytest.fixture(scope="module")
def node() -> Iterator[Slivers]:
    with slivers() as s:
        yield s


def make(node: Slivers, probe: Path, limit: int | None, tag: str = "s") -> Context:
    ctx = node.create(node.name(tag), limits=Limits(inet_sockets_max=limit))
    dest = ctx.root / "bin" / "sockprobe"
    shutil.copyfile(probe, dest)
    os.chmod(dest, 0o755)
    return ctx


def steps(ctx: Context, *argv: str) -> list[str]:
    rc, out, err = ctx.output(["/bin/sockprobe", *argv], timeout=60)
    assert rc == 0, (argv, rc, out, err)
    return out.decode().splitlines()


class Holder:
    """A probe that runs its steps and keeps its sockets until stop()."""

    def __init__(self, ctx: Context, *argv: str) -> None:
        self.proc = ctx.spawn(["/bin/sockprobe", *argv, "wait"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        while True:
            line = self.proc.stdout.readline().decode().strip()
            assert line, f"probe ended early after {self.lines}"
            if line == "waiting":
                break
            self.lines.append(line)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.stdin = None
        assert self.proc.wait(30) == 0


def group_of(ctx: Context) -> Path:
    g = ctx.cgroup.v2_dir()
    assert g is not None
    return g


def test_cap_counts_tcp_and_udp_v4_and_v6_and_not_unix(node: Slivers, probe: Path) -> None:
    ctx = make(node, probe, 4)
    out = steps(ctx, "u4", "t4", "u6", "t6", "u4", "t6", "unix", "unix", "close", "unix",
                "close", "close", "close", "t6", "u4")
    # 4 INET sockets, the 5th and 6th refused; unix sockets are not counted (three
    # closes drop the unix sockets, the fourth an INET one, which frees one place).
    assert out == ["ok"] * 4 + [EPERM, EPERM] + ["ok"] * 7 + ["ok", EPERM], out
    assert sockcap.usage(group_of(ctx)) == (0, 4)   # the probe exited: all released


def test_autobinds_count_at_creation(node: Slivers, probe: Path) -> None:
    ctx = make(node, probe, 2)
    assert steps(ctx, "send4", "conn6", "send4", "u6") == ["ok", "ok", EPERM, EPERM]


def test_other_sliver_and_host_unaffected(node: Slivers, probe: Path) -> None:
    a, b = make(node, probe, 2, "a"), make(node, probe, 2, "b")
    held = Holder(a, "u4", "t6", "u4")
    try:
        assert held.lines == ["ok", "ok", EPERM]
        assert sockcap.usage(group_of(a)) == (2, 2)
        assert steps(b, "u4", "u6", "t4") == ["ok", "ok", EPERM]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
    finally:
        held.stop()
    assert sockcap.usage(group_of(a)) == (0, 2)


def test_limit_raised_and_lowered_in_place(node: Slivers, probe: Path) -> None:
    ctx = make(node, probe, 3)
    held = Holder(ctx, "u4", "u4", "u4")
    try:
        assert steps(ctx, "t4") == [EPERM]
        ctx.update_limits(Limits(inet_sockets_max=5))
        assert sockcap.usage(group_of(ctx)) == (3, 5)
        assert steps(ctx, "t4", "t6", "u6") == ["ok", "ok", EPERM]
        ctx.update_limits(Limits(inet_sockets_max=2))
        # The open ones stay; no new one until fewer than 2 are open.
        assert sockcap.usage(group_of(ctx)) == (3, 2)
        assert steps(ctx, "u4") == [EPERM]
        ctx.update_limits(Limits())          # no cap: still counted
        assert steps(ctx, "u4", "u4", "u4", "u4") == ["ok"] * 4
        assert sockcap.usage(group_of(ctx)) == (3, None)
    finally:
        held.stop()
    ctx.update_limits(Limits(inet_sockets_max=1))
    assert steps(ctx, "u4", "u4") == ["ok", EPERM]
    assert Context.adopt(ctx.run_dir, ctx.name).limits.inet_sockets_max == 1


def test_another_process_adopts_and_changes_the_cap(node: Slivers, probe: Path) -> None:
    """What an agent restart does: a fresh process finds the programs on the group
    (no fd of ours is needed for enforcement) and changes the limit."""
    ctx = make(node, probe, 1)
    assert steps(ctx, "u4", "u4") == ["ok", EPERM]
    code = ("import sys; from kernel.context import Context, Limits; "
            "Context.adopt(sys.argv[1], sys.argv[2]).update_limits(Limits(inet_sockets_max=3))")
    subprocess.run([sys.executable, "-c", code, str(ctx.run_dir), ctx.name], cwd=REPO,
                   check=True, timeout=60)
    assert steps(ctx, "u4", "u4", "u4", "u4") == ["ok", "ok", "ok", EPERM]
    found = sockcap.find(group_of(ctx))
    assert found is not None
    # One pair of programs on the group, not a second one installed by the update.
    cg = ebpf.cgroup_fd(group_of(ctx))
    try:
        assert len(ebpf.prog_query(cg, ebpf.CGROUP_INET_SOCK_CREATE)) == 1
        assert len(ebpf.prog_query(cg, ebpf.CGROUP_INET_SOCK_RELEASE)) == 1
    finally:
        os.close(cg)


def test_destroy_leaves_no_program_or_map(node: Slivers, probe: Path) -> None:
    ctx = make(node, probe, 4)
    assert steps(ctx, "u4", "t6") == ["ok", "ok"]
    found = sockcap.find(group_of(ctx))
    assert found is not None
    ctx.destroy()
    node.contexts.remove(ctx)
    progs = {found.create_prog, found.release_prog}
    maps = {found.count_map, found.mark_map}
    deadline = time.monotonic() + 10     # the kernel frees them from a work queue
    while (progs & set(ebpf.prog_ids()) or maps & set(ebpf.map_ids())) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not progs & set(ebpf.prog_ids())
    assert not maps & set(ebpf.map_ids())


def test_no_cap_attaches_nothing(node: Slivers, probe: Path) -> None:
    ctx = make(node, probe, None)
    assert sockcap.find(group_of(ctx)) is None
    ctx.update_limits(Limits(inet_sockets_max=2))
    # Sockets open before the cap was installed are not counted, and their close does
    # not uncount others.
    assert steps(ctx, "u4", "u4", "u4") == ["ok", "ok", EPERM]


def test_bind_port_zero_drain_stops_at_the_cap(node: Slivers, probe: Path) -> None:
    """F33: processes binding UDP sockets to port 0 in a loop took the node's whole
    ephemeral range. Two of them together stop at the sliver's cap, and the host
    still gets UDP ports."""
    ctx = make(node, probe, 300)
    first = Holder(ctx, "drain")
    second = Holder(ctx, "drain")
    try:
        n1, e1 = first.lines[0].split()
        n2, e2 = second.lines[0].split()
        assert int(n1) + int(n2) == 300 and e1 == e2 == EPERM, (first.lines, second.lines)
        assert sockcap.usage(group_of(ctx)) == (300, 300)
        for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.bind((addr, 0))
                s.sendto(b"x", (addr, 9))
    finally:
        first.stop()
        second.stop()


def test_limits_validate_the_cap() -> None:
    with pytest.raises(ValueError, match="inet_sockets_max"):
        Limits(inet_sockets_max=0).validate()
    with pytest.raises(ValueError, match="inet_sockets_max"):
        sockcap.apply(None, 2**40)
    with pytest.raises(OSError, match="cgroup v2"):
        sockcap.apply(None, 5)
    sockcap.apply(None, None)


# -- a bare cgroup v2 group and forked children -------------------------------------


@pytest.fixture
def group() -> Iterator[Path]:
    v2 = detect_layout().v2
    if v2 is None:
        pytest.skip("no cgroup2 hierarchy")
    g = v2 / f"sockcap-test-{PID}"
    g.mkdir()
    try:
        yield g
    finally:
        for pid in (g / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        deadline = time.monotonic() + 5
        while True:
            try:
                g.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def in_group(group: Path, body: str) -> list[str]:
    """Run python `body` in a child moved into `group`; its printed lines."""
    code = ("import os, socket, sys\n"
            f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n" + body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_accepted_sockets_and_sockets_from_before_do_not_uncount(group: Path) -> None:
    body = """
def try_open():
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except PermissionError:
        print("EPERM"); return None
old = socket.socket()                        # made before the cap: never counted
sys.stdin.readline()                         # the test installs the cap now
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen()
cli = socket.create_connection(lst.getsockname())
for _ in range(3):
    conn, _ = lst.accept(); conn.close()     # accepted: not counted, not uncounted
    cli.close(); cli = socket.create_connection(lst.getsockname())
old.close()
keep = [try_open(), try_open()]              # the 3rd of 3, then one over the cap
print("open", [k is not None for k in keep])
"""
    code = ("import os, socket, sys\n"
            f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "print('in', flush=True)\n" + body)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None and p.stdout.readline().strip() == "in"
    sockcap.install(group, 3)
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    assert out.split() == ["EPERM", "open", "[True,", "False]"], out
    assert sockcap.usage(group) == (0, 3)


def test_apply_twice_installs_once(group: Path) -> None:
    sockcap.apply(group, 2)
    sockcap.apply(group, 4)
    found = sockcap.find(group)
    assert found is not None and sockcap.usage(group) == (0, 4)
    assert in_group(group, "s = [socket.socket() for _ in range(4)]\n"
                    "try:\n    socket.socket(socket.AF_INET6)\n"
                    "except PermissionError:\n    print('EPERM')\n") == ["EPERM"]


def test_verifier_log_is_in_the_error() -> None:
    bad = [ebpf.exit_insn()]          # r0 never set
    with pytest.raises(OSError) as info:
        ebpf.prog_load(ebpf.PROG_TYPE_CGROUP_SOCK, bad, "bad_prog",
                       ebpf.CGROUP_INET_SOCK_CREATE)
    assert "verifier log" in str(info.value) and "R0" in str(info.value)


def test_assembler_labels_and_encoding() -> None:
    code = ebpf.assemble([ebpf.jmp_imm(ebpf.JEQ, ebpf.R1, 0, "end"),
                          ebpf.ld_imm64(ebpf.R2, 1 << 40), ebpf.Label("end"),
                          ebpf.mov64_imm(ebpf.R0, -1), ebpf.exit_insn()])
    assert len(code) == 5 * 8
    assert code[:8] == bytes([0x15, 0x01, 2, 0, 0, 0, 0, 0])       # jeq r1, 0, +2
    assert code[8:24] == bytes([0x18, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])
    assert code[24:32] == bytes([0xB7, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
    with pytest.raises(ValueError, match="unknown label"):
        ebpf.assemble([ebpf.ja("nowhere")])


def test_cap_holds_beside_a_net_cls_class(node: Slivers, probe: Path) -> None:
    """On the hybrid layout a sliver with a net_cls class id is counted all the same
    (the socket keeps its cgroup2 group beside the v1 class id)."""
    ctx = node.create(node.name("cls"), limits=Limits(inet_sockets_max=1,
                                                      net_cls_classid=0x10042))
    shutil.copyfile(probe, ctx.root / "bin" / "sockprobe")
    os.chmod(ctx.root / "bin" / "sockprobe", 0o755)
    assert steps(ctx, "t4", "u4") == ["ok", EPERM]
