"""Issue 15 (operators), the command-line half: --version, read-only commands that
create nothing, one line for a non-root run, init-config's account questions, the
config's `addresses` and `disk_store_kib`, the login shells' fixed path, the lock
files, the systemd units."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config, lockfile, loginshell

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _agent(*args: str, env: dict[str, str] | None = None,
           user: int | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "planetlab-agent"), *args]
    if user is not None:
        argv = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, **(env or {})}, input=stdin)


def test_version_everywhere() -> None:
    from planetlab.version import version

    assert version() == _setup_cfg_version()
    for prog in ("plc", "planetlab-agent"):
        out = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"{prog} {_setup_cfg_version()}"


def _setup_cfg_version() -> str:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    return cp["metadata"]["version"]


@pytest.mark.parametrize("command", ["status", "list"])
def test_read_only_commands_create_nothing_and_say_where_they_looked(
        tmp_path: Path, command: str) -> None:
    missing = tmp_path / "etc" / "agent.toml"
    state = tmp_path / "state"
    out = _agent("--state-dir", str(state), command,
                 env={"PLANETLAB_AGENT_CONFIG": str(missing)})
    assert out.returncode == 1
    assert f"no agent state at {state}/agent.db" in out.stderr
    assert f"no --config and no {missing}" in out.stderr
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
    # With a config: it names the config; an agent that has not run has no slivers.
    cfg = config.write_default(tmp_path / "agent.toml", {
        "state_dir": str(state), "run_dir": str(tmp_path / "run")})
    out = _agent("--config", str(cfg), command, "--json")
    assert out.returncode == 0, out.stderr
    assert f"config {cfg}); the agent has not run yet" in out.stderr, out.stderr
    assert json.loads(out.stdout) in ([], {"slivers": [], "node": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]


def test_default_config_file_is_used_without_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config.write_default(tmp_path / "agent.toml", {"state_dir": str(state)})
    out = _agent("list", env={"PLANETLAB_AGENT_CONFIG": str(cfg)})
    assert f"no agent state at {state}/agent.db (config {cfg})" in out.stderr, out.stderr
    assert out.returncode == 0 and out.stdout == ""


@pytest.mark.parametrize("command", [["run"], ["run", "--once"], ["decommission"]])
def test_not_root_is_one_line(tmp_path: Path, command: list[str]) -> None:
    cfg = config.write_default(tmp_path / "agent.toml", {
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")})
    os.chmod(tmp_path, 0o755)
    out = _agent("--config", str(cfg), *command, user=65534)
    assert out.returncode == 1
    assert "must run as root" in out.stderr and "uid 65534" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "state").exists()


def test_init_config_defaults_accounts_off_and_says_what_they_do(tmp_path: Path) -> None:
    out = _agent("init-config", str(tmp_path / "a.toml"), stdin="")
    assert out.returncode == 0, out.stderr
    assert "authorized_keys" in out.stdout and "ssh SLICE@node" in out.stdout
    cfg = config.load(tmp_path / "a.toml")
    assert cfg.node_accounts == "" and cfg.host_accounts == 0
    out = _agent("init-config", str(tmp_path / "b.toml"), "--node-accounts", "root",
                 "--host-accounts", "1")
    assert out.returncode == 0, out.stderr
    cfg = config.load(tmp_path / "b.toml")
    assert cfg.node_accounts == "root" and cfg.host_accounts == 1


def test_init_config_asks_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from agent import cli

    answers = iter(["site_admin", "1"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert cli.main(["init-config", str(tmp_path / "a.toml")]) == 0
    cfg = config.load(tmp_path / "a.toml")
    assert cfg.node_accounts == "site_admin" and cfg.host_accounts == 1
    assert "node_accounts:" in capsys.readouterr().out


@pytest.mark.parametrize("value, expected", [
    ("192.0.2.7", "192.0.2.7"),
    ("192.0.2.7/24", "192.0.2.7"),                       # as `ip addr` prints it
    ("192.0.2.7/24, 2001:db8::7/64,192.0.2.7", "192.0.2.7,2001:db8::7"),
    ("", ""),
])
def test_addresses_accepted(value: str, expected: str) -> None:
    assert config.from_mapping({"addresses": value}).addresses == expected


@pytest.mark.parametrize("value, bad", [
    ("node1.example.org", "node1.example.org"), ("192.0.2.7/33", "192.0.2.7/33"),
    ("192.0.2.7,300.1.1.1", "300.1.1.1"), ("eth0", "eth0"),
])
def test_addresses_refused_naming_the_item(value: str, bad: str) -> None:
    with pytest.raises(config.ConfigError, match=rf"key 'addresses': '{bad}' is not an IP"):
        config.from_mapping({"addresses": value}, "agent.toml")


def test_disk_store_kib_is_a_key() -> None:
    assert config.defaults().disk_store_kib == 0
    assert config.from_mapping({"disk_store_kib": 1 << 20}).disk_store_kib == 1 << 20
    with pytest.raises(config.ConfigError, match="'disk_store_kib' = 1000: a layer store "
                                                 "needs at least 262144 KiB"):
        config.from_mapping({"disk_store_kib": 1000})
    from kernel.disk import MIN_STORE_KIB

    assert config.MIN_STORE_KIB == MIN_STORE_KIB


def test_login_shell_has_a_fixed_system_path(tmp_path: Path) -> None:
    cfg = config.defaults()
    assert cfg.shell_path == "/usr/local/lib/planetlab/vsh"
    assert cfg.controller_shell_path == "/usr/local/lib/planetlab/forward_api_calls"
    assert not cfg.shell_path.startswith(str(REPO))
    src, dest = tmp_path / "src", tmp_path / "lib" / "planetlab"
    src.mkdir()
    for name in loginshell.SHELLS:
        (src / name).write_bytes(b"#!/bin/sh\necho " + name.encode() + b"\n")
    written = loginshell.install(src, dest)
    assert sorted(p.name for p in written) == sorted(loginshell.SHELLS)
    for name in loginshell.SHELLS:
        assert (dest / name).read_bytes() == (src / name).read_bytes()
        assert (dest / name).stat().st_mode & 0o7777 == 0o755
    assert loginshell.install(src, dest) == []          # unchanged: not rewritten
    (src / "vsh").write_bytes(b"new")
    assert loginshell.install(src, dest) == [dest / "vsh"]
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]   # no temp left
    shutil.rmtree(src)
    with pytest.raises(config.ConfigError, match="not built .*make native"):
        loginshell.install(src, dest)


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    code = ("import sys, time; from agent.lockfile import PidLock; "
            "PidLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s"),
                               str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert lockfile.running_agent(tmp_path / "r") == holder.pid
        assert (tmp_path / "r" / "agent.pid").read_text() == f"{holder.pid}\n"
        with pytest.raises(lockfile.AlreadyRunning,
                           match=rf"another agent \(pid {holder.pid}\) holds {tmp_path}/s/"):
            lockfile.PidLock(tmp_path / "s", tmp_path / "other").acquire()
        with pytest.raises(lockfile.AlreadyRunning, match=rf"holds {tmp_path}/r/agent.pid"):
            lockfile.PidLock(tmp_path / "other", tmp_path / "r").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert lockfile.running_agent(tmp_path / "r") is None   # the kernel dropped it
    with lockfile.PidLock(tmp_path / "s", tmp_path / "r"):
        pass


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A sliver process forked by the agent that outlives it never keeps a new agent
    out (POSIX record locks are not inherited)."""
    code = ("import os, sys, time; from agent.lockfile import PidLock; "
            "PidLock(sys.argv[1], sys.argv[1]).acquire(); pid = os.fork()\n"
            "if pid == 0:\n    os.close(1); os.close(2); time.sleep(30); os._exit(0)\n"
            "print(pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=30)
    child = int(out.stdout)
    try:
        assert Path(f"/proc/{child}").exists()
        assert lockfile.running_agent(tmp_path) is None
        lockfile.PidLock(tmp_path, tmp_path).acquire().release()
    finally:
        os.kill(child, 9)


def test_poll_without_an_agent_says_so(tmp_path: Path) -> None:
    cfg = config.write_default(tmp_path / "agent.toml", {
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")})
    out = _agent("--config", str(cfg), "poll")
    assert out.returncode == 1
    assert f"no agent runs over {tmp_path}/run" in out.stderr, out.stderr


def test_api_without_an_agent_says_where_it_looked(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "agent.sock"
    cfg = config.write_default(tmp_path / "agent.toml", {
        "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
        "socket_path": str(sock)})
    out = _agent("--config", str(cfg), "api", "GetSlivers")
    assert out.returncode == 1 and not out.stdout
    assert f"cannot reach the agent at {sock}" in out.stderr, out.stderr


@pytest.mark.parametrize("text, value", [
    ('{"ports": "tcp:9000"}', {"ports": "tcp:9000"}), ("12", 12), ("true", True),
    ('"12"', "12"), ("demo_slice", "demo_slice"), ("null", "null"), ("[1, 2]", [1, 2]),
])
def test_api_arguments_are_json_else_strings(text: str, value: object) -> None:
    from agent.cli_ops import api_arg
    assert api_arg(text) == value


# -- systemd units ---------------------------------------------------------------------

UNITS = sorted((REPO / "contrib").glob("*.service"))


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str   # type: ignore[assignment,method-assign]
    cp.read(path)
    return cp


def test_units_exist_for_every_program() -> None:
    names = {p.name for p in UNITS}
    assert {"plc.service", "planetlab-agent.service", "planetlab-sensors.service"} <= names
    for path, argv in (("plc.service", "plc serve --config /etc/planetlab/plc.toml"),
                       ("planetlab-agent.service",
                        "planetlab-agent --config /etc/planetlab/agent.toml run"),
                       ("planetlab-sensors.service",
                        "planetlab-sensors collect --config /etc/planetlab/sensors.toml")):
        assert _unit(REPO / "contrib" / path)["Service"]["ExecStart"].endswith(argv)


def test_agent_unit_keeps_slivers_and_inherits_no_filter() -> None:
    """Whatever the agent's service holds, its slivers inherit: no seccomp filter, no
    no_new_privs, no private mount namespace; a restart signals the agent only."""
    svc = _unit(REPO / "contrib" / "planetlab-agent.service")["Service"]
    assert svc["KillMode"] == "process"
    for key in ("SystemCallFilter", "NoNewPrivileges", "ProtectSystem", "PrivateTmp",
                "MemoryDenyWriteExecute", "RestrictAddressFamilies", "ProtectClock",
                "RestrictNamespaces", "PrivateDevices", "ProtectHome", "LockPersonality"):
        assert key not in svc, key
    assert svc["ExecReload"].endswith("kill -USR1 $MAINPID")


def test_plc_unit_runs_unprivileged_and_hardened() -> None:
    svc = _unit(REPO / "contrib" / "plc.service")["Service"]
    assert svc["User"] == "plc" and svc["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert svc["ProtectSystem"] == "strict" and svc["StateDirectory"] == "plc"
    assert svc["NoNewPrivileges"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", [p.name for p in UNITS])
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    """systemd-analyze verify, the binary path pointed at one that exists here: no
    unknown key, no bad value, no warning."""
    text = (REPO / "contrib" / unit).read_text()
    fake = tmp_path / "bin"
    fake.mkdir()
    for prog in ("plc", "planetlab-agent", "planetlab-sensors"):
        (fake / prog).write_text("#!/bin/sh\n")
        (fake / prog).chmod(0o755)
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/", f"{fake}/"))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
