"""Issue 15 (operators), PLC's half: errors that name what is wrong (bind, cert and
key, an existing database), every fault logged with caller, address and message (a
huge value cut), numeric tag values bounded at PLC, logs journald reads."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from planetlab import logsetup
from plc import tagvalues
from plc.api import API
from plc.config import Config, ConfigError
from plc.server import make_server
from tests.plc.conftest import store_config

PLC = [sys.executable, "-m", "plc.cli"]


def _db(store: Any) -> str:
    """What `--db` takes for this store: the SQLite file, or the PostgreSQL DSN."""
    return str(store.dsn if store.dialect == "postgres" else store.path)


def _db_named(store: Any) -> str:
    """How PLC names this store in its messages (a DSN's password never shown)."""
    return str(store.url if store.dialect == "postgres" else store.path)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PLC, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_bind_failure_names_address_and_port(plc_store: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = store_config(plc_store).replace(api_listen=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=rf"\[api\] listen = '127.0.0.1:{port}': cannot "
                                              rf"bind 127.0.0.1 port {port}: Address already "
                                              "in use"):
            make_server(API(plc_store, cfg), cfg)
        out = _run("serve", "--db", _db(plc_store), "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 2
    assert f"cannot bind 127.0.0.1 port {port}" in out.stderr and "Traceback" not in out.stderr


def _cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_certificate_errors_name_the_key_and_file(plc_store: Any, tmp_path: Path) -> None:
    from plc.server import tls_context

    cert, key = _cert(tmp_path, "a")
    _, other_key = _cert(tmp_path, "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        ((missing, key), rf"\[api\] cert = '{missing}': No such file or directory"),
        ((cert, missing), rf"\[api\] key = '{missing}': No such file or directory"),
        ((junk, key), rf"\[api\] cert = '{junk}': not a PEM certificate"),
        ((cert, junk), rf"\[api\] key = '{junk}': not a PEM private key, or not the key"),
        ((cert, other_key), rf"\[api\] key = '{other_key}': .*not the key of \[api\] cert"),
    ]
    for (c, k), words in cases:
        cfg = Config().replace(api_cert=str(c), api_key=str(k))
        with pytest.raises(ConfigError, match=words):
            tls_context(cfg)
    assert tls_context(Config().replace(api_cert=str(cert), api_key=str(key)))
    toml = tmp_path / "plc.toml"
    toml.write_text(f'[api]\ncert = "{cert}"\nkey = "{other_key}"\n')
    out = _run("serve", "--config", str(toml), "--db", _db(plc_store))
    assert out.returncode == 2 and f"{toml}: [api] key = '{other_key}'" in out.stderr, \
        out.stderr


def test_init_over_an_existing_database_names_it(plc_store: Any) -> None:
    out = _run("init", "--db", _db(plc_store), "--admin-email", "a@example.org",
               "--admin-password", "pw-123456")
    assert out.returncode == 1
    assert f"{_db_named(plc_store)}: a PLC database is already there" in out.stderr


def test_every_fault_is_logged_with_caller_address_and_message(
        plc: Any, caplog: pytest.LogCaptureFixture) -> None:
    api = plc.proxy()
    bad = {"AuthMethod": "password", "Username": "nobody@example.org", "AuthString": "x"}
    huge = "A" * 100_000
    with caplog.at_level(logging.WARNING, logger="plc.api"):
        with pytest.raises(xmlrpc.client.Fault):
            api.AuthCheck(bad)
        with pytest.raises(xmlrpc.client.Fault):
            api.AuthCheck({**bad, "Username": huge})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fault ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("fault 103 to password nobody@example.org at 127.0.0.1:")
    assert "x" not in lines[0].split(": ", 1)[0].split()[-1]   # no password in the line
    assert lines[1].startswith("fault 10")   # 102 (too long) or 103, either way cut:
    assert len(lines[1]) < 600 and "characters)" in lines[1], lines[1][:700]


def test_numeric_tags_are_bounded_at_plc(plc: Any) -> None:
    api, admin = plc.proxy(), plc.admin
    site = api.AddSite(admin, {"name": "Ops", "abbreviated_name": "ops", "login_base": "ops",
                               "max_slices": 5})
    assert site
    api.AddSlice(admin, {"name": "ops_one", "url": "http://x.org/", "description": "d"})
    for tag, value, words in (
            ("cpu_pct", "101", "tag 'cpu_pct' = 101 is outside [0, 100]"),
            ("mem_max", "lots", "tag 'mem_max': 'lots' is not an integer"),
            ("pids_max", "0", "tag 'pids_max' = 0 is outside [1, 4194304]"),
            ("net_max_rate", "9" * 40, "is not an integer"),
            ("nofile_hard", "-5", "tag 'nofile_hard' = -5: an rlimit is 0 to"),
            ("cpu_cores", "2x", "tag 'cpu_cores': '2x' must be <n> or <n>b")):
        with pytest.raises(xmlrpc.client.Fault) as info:
            api.AddSliceTag(admin, "ops_one", tag, value)
        assert info.value.faultCode == 102 and words in info.value.faultString, \
            info.value.faultString
    ok = api.AddSliceTag(admin, "ops_one", "cpu_pct", "50")
    for tag, value in (("net_max_rate", "-1"), ("nofile_hard", "KEEP"), ("cpu_cores", "2b"),
                       ("mem_max", " 1024 "), ("vref", "anything at all")):
        assert api.AddSliceTag(admin, "ops_one", tag, value) > 0
    with pytest.raises(xmlrpc.client.Fault) as info:
        api.UpdateSliceTag(admin, ok, "-3")
    assert info.value.faultCode == 102 and "'cpu_pct' = -3" in info.value.faultString


def test_plc_and_agent_agree_on_numeric_ranges() -> None:
    from agent import rspec

    assert tagvalues.NUMERIC_TAG_RANGES == rspec.RANGES
    assert tagvalues.RLIMIT_TAG_BASES >= {"openfd", "nofile", "nproc", "memlock"}


def test_journald_lines_carry_the_priority(tmp_path: Path) -> None:
    code = ("import logging; from planetlab import logsetup; logsetup.setup(); "
            "logging.getLogger('plc').error('bad %s', 'x' * 5000); "
            "logging.getLogger('plc').info('fine')")
    err = tmp_path / "err"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        subprocess.run([sys.executable, "-c", code], stderr=f, timeout=60, check=True,
                       env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    lines = err.read_text().splitlines()
    assert lines[0].startswith("<3>plc ERROR bad xxx") and lines[0].endswith("(5000 characters)")
    assert len(lines[0]) < 500
    assert lines[1] == "<6>plc INFO fine"
    # Not the journal: a timestamp first, no priority prefix.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stderr.splitlines()[1].endswith(" plc INFO fine")
    assert not out.stderr.startswith("<")


def test_bounded_keeps_short_values() -> None:
    assert logsetup.bounded("short") == "short" and logsetup.bounded(7) == 7
    assert logsetup.bounded("y" * 1000) == "y" * logsetup.ARG_MAX + "... (1000 characters)"


def test_startup_line_names_version_config_and_database(plc_store: Any) -> None:
    import time

    from planetlab.version import version

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*PLC, "serve", "--db", _db(plc_store), "--listen",
                             f"127.0.0.1:{port}", "--workers", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        assert proc.stderr is not None
        while "PLCAPI serving" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert f"PLCAPI serving on http://127.0.0.1:{port}/PLCAPI/ (1 processes): plc " \
               f"{version()}, config <defaults>, database {_db_named(plc_store)}" in line, line
    finally:
        proc.terminate()
        proc.wait(10)


def test_fault_lines_are_bounded_per_address() -> None:
    """A caller sending thousands of bad calls gets `burst` lines a window, then one
    line saying how many were not logged."""
    from plc.faultlog import FaultLog

    now = [0.0]
    records: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger(f"test.faultlog.{os.getpid()}")
    logger.addHandler(Sink())
    logger.propagate = False
    flog = FaultLog(logger, burst=3, window=10.0, clock=lambda: now[0])
    def fault(host: str, address: str, code: int, message: str) -> bool:
        return flog.fault(host, address, code, lambda: "anonymous", lambda: message)

    logged = [fault("192.0.2.1", f"192.0.2.1:{1000 + i}", 103, "no") for i in range(1000)]
    assert logged.count(True) == 3 and len(records) == 3
    assert fault("192.0.2.2", "192.0.2.2:1", 102, "other")  # other addresses are logged
    now[0] = 11.0
    assert fault("192.0.2.1", "192.0.2.1:5", 103, "no")
    assert records[-1] == ("fault 103 to anonymous at 192.0.2.1:5: no (997 earlier faults "
                           "to this address not logged)")
