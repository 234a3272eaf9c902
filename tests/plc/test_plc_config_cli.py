"""plc.toml handling and the `plc` command (real subprocesses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import psutil
import pytest

from plc import config
from plc.config import ConfigError

PLC = [sys.executable, "-m", "plc.cli"]


def test_default_config_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "plc.toml"
    config.write_default(path)
    text = path.read_text()
    assert "# PLC_NAME" in text and "[api]" in text
    cfg = config.load(path)
    assert cfg.api_listen == "127.0.0.1:8000" and cfg.api_max_body == 16 * 1024 * 1024
    with pytest.raises(ConfigError, match="already exists"):
        config.write_default(path)


@pytest.mark.parametrize("text, words", [
    ("[api]\nlisten = 8000\n", ["[api] listen", "must be a string"]),
    ("[api]\nlisten = 'nohost'\n", ["[api] listen", "HOST:PORT"]),
    ("[api]\nlistn = 'x'\n", ["unknown key [api] listn", "allowed: listen"]),
    ("[nosuch]\n", ["unknown section [nosuch]", "allowed: plc"]),
    ("[api]\nmax_body = 10\n", ["[api] max_body", "at least 1024"]),
    ("[api]\ndebug = 'yes'\n", ["[api] debug", "true or false"]),
    ("[api]\ncert = 'c.pem'\n", ["cert and key must be given together"]),
    ("not = [toml", ["not valid TOML"]),
])
def test_bad_config_names_file_key_and_allowed(tmp_path: Path, text: str,
                                               words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PLC, *args], capture_output=True, text=True, timeout=60)


def test_cli_init_node_key_serve(tmp_path: Path) -> None:
    db = tmp_path / f"plc-{os.getpid()}.db"
    bad = run("serve", "--db", str(db))
    assert bad.returncode != 0 and "no PLC database" in bad.stderr
    out = run("init", "--db", str(db), "--admin-email", "root@example.org",
              "--admin-password", "pw-1", "--slice-prefix", "demo")
    assert out.returncode == 0, out.stderr
    again = run("init", "--db", str(db), "--admin-email", "root@example.org",
                "--admin-password", "pw-1", "--slice-prefix", "demo")
    assert again.returncode == 1 and f"{db}: a PLC database is already there" in again.stderr
    assert run("node-key", "--db", str(db), "nosuch.example.org").returncode == 1
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[api]\nlisten = 1\n")
    out = run("serve", "--config", str(bad_cfg))
    assert out.returncode == 2 and str(bad_cfg) in out.stderr and "listen" in out.stderr
    port = free_port()
    proc = subprocess.Popen([*PLC, "serve", "--db", str(db), "--listen", f"127.0.0.1:{port}",
                             "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers: list[psutil.Process] = []
    try:
        api = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}//PLCAPI//", allow_none=True)
        admin = {"AuthMethod": "password", "Username": "root@example.org", "AuthString": "pw-1"}
        for _ in range(100):
            try:
                api.AuthCheck(admin)
                break
            except OSError:
                time.sleep(0.1)
        assert api.GetSites(admin, "demo", ["login_base"]) == [{"login_base": "demo"}]
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 1  # a second process serves the same port
        tags = {t["tagname"] for t in api.GetTagTypes(admin, None, ["tagname"])}
        assert {"vref", "hrn", "system", "vsys", "cpu_share", "nofile_soft",
                "ifname"} <= tags
        api.UpdateSite(admin, "demo", {"max_slices": 1})
        site_node = api.AddNode(admin, "demo", {"hostname": "box.demo.example.org"})
        key = run("node-key", "--db", str(db), "box.demo.example.org")
        assert key.returncode == 0
        node_key = key.stdout.strip()
        assert len(node_key) == 43 and "=" not in node_key
        assert run("node-key", "--db", str(db), "box.demo.example.org").stdout.strip() == \
            node_key
        from tests.plc.world import hmac_of
        assert api.AuthCheck({"AuthMethod": "hmac", "node_id": site_node,
                              "value": hmac_of(node_key)}) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            # the parent reaps its workers before it exits
            _, survivors = psutil.wait_procs(workers, timeout=5)
            for w in survivors:  # never leave a worker behind, even on failure
                w.kill()
    assert proc.returncode == 0
    assert workers and not survivors
