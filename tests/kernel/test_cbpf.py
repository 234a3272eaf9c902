"""kernel/cbpf.py: the one classic BPF assembler.

The golden digests were taken from the programs built by the two assemblers it
replaced (kernel/seccomp.py's Insn/_link and kernel/packet.py's Asm, at commit
6cc6669) on the same inputs: the unified assembler must produce them byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
from typing import Any

import pytest

from agent.guard.service import GuardService
from agent.ports import PortRange
from agent.rawsock import error_filter, sniffer_filter
from kernel import cbpf, seccomp
from kernel.libc import (
    NR_ADD_KEY,
    NR_BIND,
    NR_CONNECT,
    NR_FSTATFS,
    NR_IO_URING_ENTER,
    NR_IO_URING_REGISTER,
    NR_IO_URING_SETUP,
    NR_KEYCTL,
    NR_REQUEST_KEY,
    NR_STATFS,
    NR_USTAT,
)

HOLDINGS = [PortRange("udp", 5000, 5010, "127.0.0.1"), PortRange("tcp", 80, 80, "10.1.2.3"),
            PortRange("icmp", 7, 7, "::1"), PortRange("tcp", 8000, 8100, "fd00::5")]

# name: (instructions, sha256 of the sock_filter bytes) from the old assemblers. The
# guard programs gained the setsockopt(SOL_PACKET) rule (4 instructions) after the
# port: "guard_no_userns" below is byte-identical to what the old label assembler made
# of the same rules (checked on the branch that added the rule).
GOLDEN = {
    "guard_default": (56, "7ae2f22af8a1cb09cd25feea6d2162f0de47dc7aa196681bf0b31c80bde8c486"),
    "guard_bind_connect": (58, "ba55ee1f980bccbf9f0404682e92e861ba8bc04353d5a8f573ec83b0fe7f5928"),
    "guard_no_sockets": (29, "9031ca7ad608da6ee13fd7da414e8bcee06d497878914294ee2f548fc86fe78e"),
    "guard_no_userns": (48, "59ef1792f8bdae1b2134a38cb6ba8e9c744c5cecf5b98271d6519ce0996ab8e5"),
    "guard_bare": (7, "7effeb3cbb5d160f8e0e4a6639ebed32eba4b66bb813d59fdc3390842fb54a1b"),
    # Not from the old assemblers: the agent's own filter (GuardService.filter) since
    # it notifies statfs and fstatfs; test_the_agent_filter_is_the_sockd_one_plus_statfs
    # checks it is the sockd program with exactly those two notify pairs added, and
    # test_ustat_is_one_refusal_more the ustat pair (61 instructions before it).
    "guard_agent": (63, "cfb213036fe6acefb8c12755f357cc249efeed21af9dc09c47e22871f4374d6a"),
    "sniffer_empty": (84, "757a52cf41facf7dbce4cca9af59bf6b3e81e053abbf14b5fcef40802db74cdb"),
    "sniffer_mixed": (226, "321904463e3313f670f4cb67f9dad6d28ede9e90f20e059e669a075b529aa3bd"),
    "error_mixed": (96, "a7071273f7d1243db94f1ffe426e3e6dedbc18818e81b0efd1e640bae93569b2"),
}

# The default refusals when the golden digests were taken; ustat (ENOSYS) came after,
# and test_ustat_is_one_refusal_more checks what it added.
OLD_REFUSE = ((NR_IO_URING_SETUP, errno.EPERM), (NR_IO_URING_ENTER, errno.EPERM),
              (NR_IO_URING_REGISTER, errno.EPERM), (NR_ADD_KEY, errno.ENOSYS),
              (NR_REQUEST_KEY, errno.ENOSYS), (NR_KEYCTL, errno.ENOSYS))

BUILDERS = {
    "guard_default": lambda: seccomp.guard_filter(refuse=OLD_REFUSE),
    "guard_bind_connect": lambda: seccomp.guard_filter(notify=(NR_BIND, NR_CONNECT),
                                                       refuse=OLD_REFUSE),
    "guard_no_sockets": lambda: seccomp.guard_filter(guard_sockets=False, refuse=OLD_REFUSE),
    "guard_no_userns": lambda: seccomp.guard_filter(refuse_userns=False, refuse=OLD_REFUSE),
    "guard_bare": lambda: seccomp.guard_filter(notify=(), refuse=(), guard_sockets=False,
                                               refuse_userns=False),
    "guard_agent": lambda: GuardService.filter(),
    "sniffer_empty": lambda: sniffer_filter([]),
    "sniffer_mixed": lambda: sniffer_filter(HOLDINGS, ["192.0.2.1", "2001:db8::1"]),
    "error_mixed": lambda: error_filter(HOLDINGS),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_programs_byte_identical_to_the_old_assemblers(name: str) -> None:
    prog = BUILDERS[name]()
    assert (len(prog) // 8, hashlib.sha256(prog).hexdigest()) == GOLDEN[name]


def test_the_agent_filter_is_the_sockd_one_plus_statfs() -> None:
    """The agent's filter = guard_filter(sockd=True) with statfs and fstatfs notified:
    the same instructions, two JEQ/RET_USER_NOTIF pairs after bind's (jumps are
    relative and only forward past them, so nothing else moves)."""
    def insns(prog: bytes) -> list[bytes]:
        return [prog[i:i + 8] for i in range(0, len(prog), 8)]
    agent, sockd = insns(GuardService.filter()), insns(seccomp.guard_filter(sockd=True))
    notify = [cbpf.SOCK_FILTER.pack(cbpf.JEQ_K, 0, 1, nr) for nr in (NR_STATFS, NR_FSTATFS)]
    ret = cbpf.SOCK_FILTER.pack(cbpf.RET_K, 0, 0, seccomp.SECCOMP_RET_USER_NOTIF)
    assert sockd[6:8] == [cbpf.SOCK_FILTER.pack(cbpf.JEQ_K, 0, 1, NR_BIND), ret]
    assert agent == sockd[:8] + [notify[0], ret, notify[1], ret] + sockd[8:]


def test_ustat_is_one_refusal_more() -> None:
    """The default program = the one of the golden refusals with one JEQ/RET pair for
    ustat (ENOSYS) first among the refusals (they are sorted by number)."""
    def insns(prog: bytes) -> list[bytes]:
        return [prog[i:i + 8] for i in range(0, len(prog), 8)]
    variants: list[dict[str, Any]] = [{}, {"sockd": True}, {"guard_sockets": False}]
    for kw in variants:
        now = insns(seccomp.guard_filter(**kw))
        old = insns(seccomp.guard_filter(refuse=OLD_REFUSE, **kw))
        at = old.index(cbpf.SOCK_FILTER.pack(cbpf.JEQ_K, 0, 1, NR_ADD_KEY))
        pair = [cbpf.SOCK_FILTER.pack(cbpf.JEQ_K, 0, 1, NR_USTAT),
                cbpf.SOCK_FILTER.pack(cbpf.RET_K, 0, 0, seccomp.errno_ret(errno.ENOSYS))]
        assert now == old[:at] + pair + old[at:], kw


def test_labels_resolve_to_forward_skips() -> None:
    a = cbpf.Asm()
    a.op(cbpf.JEQ_K, 7, "yes", 0)
    a.ret(0)
    a.label("yes")
    a.op(cbpf.JA, "end")
    a.ret(1)
    a.label("end")
    a.ret(2)
    assert a.assemble() == b"".join([
        cbpf.SOCK_FILTER.pack(cbpf.JEQ_K, 1, 0, 7), cbpf.SOCK_FILTER.pack(cbpf.RET_K, 0, 0, 0),
        cbpf.SOCK_FILTER.pack(cbpf.JA, 0, 0, 1), cbpf.SOCK_FILTER.pack(cbpf.RET_K, 0, 0, 1),
        cbpf.SOCK_FILTER.pack(cbpf.RET_K, 0, 0, 2)])


def test_bad_programs_are_errors_not_wrong_bytes() -> None:
    far = cbpf.Asm()
    far.op(cbpf.JEQ_K, 1, "far", 0)
    for _ in range(300):
        far.ret(0)
    far.label("far")
    far.ret(0)
    with pytest.raises(ValueError, match="jump of 300"):
        far.assemble()
    back = cbpf.Asm()
    back.label("top")
    back.op(cbpf.JEQ_K, 1, "top", 0)
    with pytest.raises(ValueError, match="jump of -1"):
        back.assemble()
    missing = cbpf.Asm()
    missing.op(cbpf.JA, "nowhere")
    with pytest.raises(ValueError, match="not defined"):
        missing.assemble()
    twice = cbpf.Asm()
    twice.label("x")
    with pytest.raises(ValueError, match="twice"):
        twice.label("x")
    with pytest.raises(ValueError, match="only JA"):
        cbpf.Asm().op(cbpf.JEQ_K, "x")
    with pytest.raises(ValueError, match="instructions"):
        cbpf.Asm().assemble()
    with pytest.raises(ValueError, match="sock_filter"):
        cbpf.fprog(b"\0" * 7)
