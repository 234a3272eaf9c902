"""Node accounts from GetSlivers `accounts`, and safe writes into sliver roots."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config
from agent.accounts import Accounts, managed_block
from agent.initscripts import Initscripts
from agent.rootfiles import write_in_root
from agent.tasks import BackgroundTasks


def test_managed_block_keeps_other_keys() -> None:
    text = managed_block("ssh-rsa AAA mine\n", ["k1", "k2"])
    assert text.startswith("ssh-rsa AAA mine\n") and "k1\nk2\n" in text
    again = managed_block(text, ["k3"])
    assert "k1" not in again and "k3" in again and again.count("ssh-rsa AAA mine") == 1


def test_write_in_root_refuses_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "home").symlink_to(outside)   # planted by the sliver
    with pytest.raises(OSError):
        write_in_root(root, "home/x/.ssh/authorized_keys", b"k\n", 0o600, os.getuid(),
                      os.getgid())
    assert list(outside.iterdir()) == []
    write_in_root(root, "etc/planetlab/key", b"s\n", 0o400, os.getuid(), os.getgid())
    assert (root / "etc/planetlab/key").read_bytes() == b"s\n"
    assert (root / "etc/planetlab/key").stat().st_mode & 0o777 == 0o400


@pytest.fixture
def local_user(tmp_path: Path) -> Iterator[str]:
    name = f"agtst{os.getpid() % 100000}"
    home = tmp_path / "home"
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/false", name], check=True)
    try:
        home.mkdir()
        os.chown(home, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.mark.kernel
def test_node_accounts_honoured(tmp_path: Path, local_user: str) -> None:
    cfg = config.from_mapping({"node_accounts": f"{local_user},site_admin",
                               "state_dir": str(tmp_path / "s")}, "t")
    acc = Accounts(cfg, None, None)  # type: ignore[arg-type]
    auth = Path(pwd.getpwnam(local_user).pw_dir) / ".ssh" / "authorized_keys"
    auth.parent.mkdir(mode=0o700)
    auth.write_text("ssh-rsa KEPT admin-own\n")
    acc.install_node_accounts({local_user: ("ssh-rsa K1 a", "ssh-rsa K2 b"),
                               "root": ("ssh-rsa NOT-FOR-ROOT x",)})
    text = auth.read_text()
    assert "KEPT" in text and "K1" in text and "K2" in text
    assert auth.stat().st_uid == pwd.getpwnam(local_user).pw_uid
    assert auth.stat().st_mode & 0o777 == 0o600
    acc.install_node_accounts({local_user: ("ssh-rsa K3 c",)})
    text = auth.read_text()
    assert "K1" not in text and "K3" in text and "KEPT" in text


@pytest.mark.kernel
@pytest.mark.parametrize("plant", ["tmp_symlink", "keys_symlink", "keys_hardlink", "ssh_symlink"])
def test_node_accounts_follow_no_link_the_user_planted(tmp_path: Path, local_user: str,
                                                       plant: str) -> None:
    """The user owns its home: a symlink or hard link it plants in .ssh never makes
    root write, chown or read a file of the user's choosing."""
    cfg = config.from_mapping({"node_accounts": local_user, "state_dir": str(tmp_path / "s")},
                              "t")
    acc = Accounts(cfg, None, None)  # type: ignore[arg-type]
    pw = pwd.getpwnam(local_user)
    ssh = Path(pw.pw_dir) / ".ssh"
    victim = tmp_path / "victim"
    victim.write_text("root:secret-hash\n")
    victim.chmod(0o600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if plant == "ssh_symlink":
        ssh.symlink_to(elsewhere)
    else:
        ssh.mkdir()
        os.chown(ssh, pw.pw_uid, pw.pw_gid)
        if plant == "tmp_symlink":
            (ssh / ".authorized_keys.agent-tmp").symlink_to(victim)
        elif plant == "keys_symlink":
            (ssh / "authorized_keys").symlink_to(victim)
        else:
            os.link(victim, ssh / "authorized_keys")
    acc.install_node_accounts({local_user: ("ssh-ed25519 KEY pi@site",)})
    st = victim.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), plant
    assert victim.read_text() == "root:secret-hash\n"
    assert list(elsewhere.iterdir()) == []
    if plant != "ssh_symlink":
        text = (ssh / "authorized_keys").read_text()
        assert "KEY" in text and "secret" not in text
        assert (ssh / "authorized_keys").stat().st_uid == pw.pw_uid


def test_output_tail_keeps_the_last_bytes_and_counts_the_rest() -> None:
    """[F21] The tail never holds more than twice its limit; what it drops is counted."""
    from agent.backend import OutputTail, dropped_line, split_dropped

    tail = OutputTail(10)
    data = bytes(range(256)) * 40
    for i in range(0, len(data), 7):
        tail.add(data[i:i + 7])
        assert len(tail._buf) < 2 * 10 + 7
    assert tail.data() == data[-10:]
    assert tail.dropped == len(data) - 10
    assert split_dropped(dropped_line(123) + "\nrest\n") == (123, "rest\n")
    assert split_dropped("[no] bytes\nx") == (0, "[no] bytes\nx")
    small = OutputTail(10)
    small.add(b"abc")
    assert small.data() == b"abc" and small.dropped == 0


async def test_background_initscripts_never_hold_a_stop(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Background runs take a slot each; a sliver's `stop` does not wait for one, and
    runs queued for a sliver are void once a newer script, a stop or a destroy came."""
    import threading
    import time

    import trio
    from agent_fakes import FakeBackend, reply, sliver

    from agent import getslivers
    from agent import initscripts as initscripts_mod
    from agent.reconcile import ingest
    from agent.state import State

    monkeypatch.setattr(initscripts_mod, "INITSCRIPT_SLOTS", 1)
    state = State.open(tmp_path / "state")
    desired = getslivers.parse(reply([sliver("pl_a"), sliver("pl_b")]))
    ingest(state, desired, "base", "pl", time.time())
    for name in ("pl_a", "pl_b"):
        state.allocate_uid_range(name, 10)
        state.set_sliver_state(name, "running")
        (tmp_path / name).mkdir()
    release = threading.Event()
    calls: list[tuple[str, str]] = []

    class Backend(FakeBackend):
        def root_of(self, name: str) -> Path | None:
            return tmp_path / name

        def run(self, name: str, argv: list[str], user: str = "root",
                timeout: float = 60.0) -> tuple[int, str]:
            calls.append((name, argv[2]))
            if argv[2] != "stop":
                release.wait(10)   # a long start/restart holds the only slot
            return 0, ""

    cfg = config.from_mapping({"state_dir": str(tmp_path / "s"), "uid_pool_start": 1_000_000,
                               "uid_range_size": 65536}, "t")
    tasks = BackgroundTasks()
    scripts = initscripts_mod.Initscripts(cfg, state, Backend(), background=tasks)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(tasks.serve)
        await scripts.install("pl_b", "#!/bin/sh\n", "start")      # takes the slot
        await scripts.install("pl_a", "#!/bin/sh\n", "start")      # queued
        await scripts.install("pl_a", "#!/bin/sh\necho 2\n", "restart")   # supersedes it
        await trio.sleep(0.2)
        with trio.fail_after(5):
            await scripts.before_stop("pl_b")   # not behind the busy slot
        assert ("pl_b", "stop") in calls
        release.set()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert calls.count(("pl_a", "start")) == 0      # superseded while queued
    assert calls.count(("pl_a", "restart")) == 1
    assert calls.count(("pl_b", "start")) == 1
    state.close()


def test_a_slice_name_too_long_for_a_user_gets_no_host_account(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """useradd refuses names over 32 characters: no attempt at every poll, one warning."""
    import agent.accounts as accounts_mod

    cfg = config.from_mapping({"state_dir": str(tmp_path / "s"), "host_accounts": 1}, "t")
    acc = Accounts(cfg, None, None)  # type: ignore[arg-type]
    tried: list[str] = []
    monkeypatch.setattr(accounts_mod, "ensure_host_account",
                        lambda name, *a, **k: tried.append(name))
    long_name = "pl_" + "x" * 30   # 33 characters
    for _ in range(3):
        acc._host_account(long_name, ["ssh-ed25519 K a"])
    acc._host_account("pl_short", ["ssh-ed25519 K a"])
    assert tried == ["pl_short"]
    assert caplog.text.count("no host account") == 1


async def test_one_slivers_initscript_trap_does_not_stop_the_others(tmp_path: Path) -> None:
    """A sliver that made its /etc/planetlab a symlink gets no script; the next sliver's
    changed script still runs (Initscripts.sync keeps each failure to its sliver)."""
    import time

    from agent_fakes import FakeBackend, reply, sliver

    from agent import getslivers
    from agent.reconcile import ingest
    from agent.state import State

    state = State.open(tmp_path / "state")
    ingest(state, getslivers.parse(reply([sliver("pl_a"), sliver("pl_b")])), "base", "pl",
           time.time())
    calls: list[str] = []
    for name in ("pl_a", "pl_b"):
        state.allocate_uid_range(name, 10)
        state.set_sliver_state(name, "running")
        state.set_meta(f"initscript_ran:{name}", "an older script")
        (tmp_path / name / "etc").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "pl_a" / "etc" / "planetlab").symlink_to(tmp_path / "outside")
    for name in ("pl_a", "pl_b"):   # both have a script now
        rec = state.get_sliver(name)
        assert rec is not None
        rec.spec["initscript"] = "#!/bin/sh\n"
        state.put_sliver(rec)

    class Backend(FakeBackend):
        def root_of(self, name: str) -> Path | None:
            return tmp_path / name

        def run(self, name: str, argv: list[str], user: str = "root",
                timeout: float = 60.0) -> tuple[int, str]:
            calls.append(f"{name} {argv[2]}")
            return 0, ""

    cfg = config.from_mapping({"state_dir": str(tmp_path / "s")}, "t")
    await Initscripts(cfg, state, Backend()).sync()   # type: ignore[arg-type]
    assert calls == ["pl_b restart"]
    assert list((tmp_path / "outside").iterdir()) == []
    state.close()
