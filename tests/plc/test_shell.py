"""plc shell: method functions with auth filled in, begin()/commit() batching, -c, scripts,
interactive input, --config.

The client is tested against a stdlib XML-RPC server on loopback that records what it
receives (a test double for the wire peer, which is what the shell's logic depends on);
the conformance tests drive the real server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest

from plc import shell

REPO = Path(__file__).resolve().parents[2]


class _Recorder:
    """A few PLCAPI-shaped methods; each records the auth it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.slices = [{"slice_id": 1, "name": "pl_one"}, {"slice_id": 2, "name": "pl_two"}]

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        self.calls.append((method, params))
        if method == "GetSlices":
            auth, *rest = params
            if auth.get("AuthMethod") not in ("password", "session", "anonymous"):
                raise xmlrpc.client.Fault(102, "Invalid AuthMethod value")
            fields = rest[1] if len(rest) > 1 else None
            rows = self.slices
            if rest and isinstance(rest[0], list):
                rows = [s for s in rows if s["slice_id"] in rest[0] or s["name"] in rest[0]]
            if fields:
                rows = [{k: v for k, v in s.items() if k in fields} for s in rows]
            return rows
        if method == "AuthCheck":
            if params[0].get("AuthString") != "secret" and params[0].get("session") != "S1":
                raise xmlrpc.client.Fault(103, ": AuthCheck: Failed to authenticate call")
            return 1
        if method == "AddSlice":
            auth, fields = params
            if not fields.get("name", "").startswith("pl_"):
                raise xmlrpc.client.Fault(102, "Invalid slice prefix")
            self.slices.append({"slice_id": len(self.slices) + 1, "name": fields["name"]})
            return len(self.slices)
        raise xmlrpc.client.Fault(100, f"Invalid method {method}")


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/PLCAPI/",)
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, _Recorder]]:
    srv = SimpleXMLRPCServer(("127.0.0.1", 0), _Handler, allow_none=True, logRequests=False)
    recorder = _Recorder()
    srv.register_instance(recorder)
    srv.register_introspection_functions()
    srv.register_multicall_functions()
    # listMethods of an instance with _dispatch lists nothing: name the methods.
    srv.register_function(lambda: ["AddSlice", "AuthCheck", "GetSlices", "system.listMethods",
                                   "system.methodHelp", "system.multicall"], "system.listMethods")
    srv.register_function(lambda name: f"{name}(auth, ...) -> help text", "system.methodHelp")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/PLCAPI/", recorder
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_methods_fill_in_auth(server: tuple[str, _Recorder]) -> None:
    url, rec = server
    sh = shell.Shell(url, shell.make_auth("admin@example.org", "secret", role="admin"))
    ns = sh.namespace()
    assert {"GetSlices", "AuthCheck", "AddSlice", "begin", "commit"} <= set(ns)
    assert "system.listMethods" not in ns  # reached as system.listMethods()
    assert ns["GetSlices"]([1], ["name"]) == [{"name": "pl_one"}]
    auth = rec.calls[-1][1][0]
    assert auth == {"AuthMethod": "password", "Username": "admin@example.org",
                    "AuthString": "secret", "Role": "admin"}
    # An explicit auth struct is passed through, not doubled.
    other = {"AuthMethod": "session", "session": "S1"}
    assert ns["AuthCheck"](other) == 1
    assert rec.calls[-1][1] == (other,)
    # system.* methods take no auth.
    assert "GetSlices" in ns["system"].listMethods()
    assert "help text" in ns["GetSlices"].__doc__
    with pytest.raises(xmlrpc.client.Fault) as err:
        ns["AddSlice"]({"name": "bad_prefix"})
    assert err.value.faultCode == 102
    sh.close()


def test_anonymous_and_session_auth() -> None:
    assert shell.make_auth() == {"AuthMethod": "anonymous"}
    assert shell.make_auth(session="abc") == {"AuthMethod": "session", "session": "abc"}
    with pytest.raises(shell.ShellError, match="no password given for user 'u@x.org'"):
        shell.make_auth("u@x.org")
    with pytest.raises(shell.ShellError, match="unsupported URL 'ftp://x'"):
        shell.Shell("ftp://x")


def test_begin_commit_batches_through_multicall(server: tuple[str, _Recorder]) -> None:
    url, rec = server
    sh = shell.Shell(url, shell.make_auth("admin@example.org", "secret"))
    before = len(rec.calls)
    sh.begin()
    assert sh.call("AddSlice", {"name": "pl_three"}) is None
    assert sh.call("GetSlices", ["pl_three"], ["slice_id"]) is None
    assert len(rec.calls) == before  # nothing sent yet
    with pytest.raises(shell.ShellError, match="already in progress"):
        sh.begin()
    assert sh.commit() == [3, [{"slice_id": 3}]]
    # Both ran inside one multicall, each with the auth filled in.
    names = [c[0] for c in rec.calls[before:]]
    assert names == ["AddSlice", "GetSlices"]
    assert all(c[1][0]["Username"] == "admin@example.org" for c in rec.calls[before:])
    # A fault inside the batch is raised by commit(), and the queue is gone afterwards.
    sh.begin()
    sh.call("AddSlice", {"name": "bad_x"})
    with pytest.raises(xmlrpc.client.Fault, match="Invalid slice prefix"):
        sh.commit()
    with pytest.raises(shell.ShellError, match="commit\\(\\) without begin\\(\\)"):
        sh.commit()
    sh.begin()
    assert sh.commit() is None  # empty batch
    sh.close()


def test_main_command_prints_result(server: tuple[str, _Recorder],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    rc = shell.main(["--url", url, "-u", "admin@example.org", "-p", "secret",
                     "-c", 'GetSlices({}, ["name"])'])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "[{'name': 'pl_one'}, {'name': 'pl_two'}]"
    # Statements, several -c, begin/commit from the command line.
    rc = shell.main(["--url", url, "-u", "admin@example.org", "-p", "secret",
                     "-c", "begin(); AddSlice({'name': 'pl_c'}); AuthCheck()",
                     "-c", "print(commit())"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "[3, 1]"


def test_main_reports_faults_and_unreachable(server: tuple[str, _Recorder],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    rc = shell.main(["--url", url, "-u", "a@example.org", "-p", "wrong", "-c", "AuthCheck()"])
    assert rc == 1
    assert "Fault 103" in capsys.readouterr().err
    rc = shell.main(["--url", "http://127.0.0.1:9/PLCAPI/", "-c", "GetSlices()"])
    assert rc == 1
    assert "cannot reach http://127.0.0.1:9/PLCAPI/" in capsys.readouterr().err


def test_script_with_arguments(server: tuple[str, _Recorder], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    script = tmp_path / f"script-{os.getpid()}.py"
    script.write_text("import sys\nfor s in GetSlices(sys.argv[1:], ['slice_id']):\n"
                      "    print(s['slice_id'])\n")
    rc = shell.main(["--url", url, "-s", "S1", str(script), "pl_two", "pl_one"])
    assert rc == 0
    assert capsys.readouterr().out.split() == ["1", "2"]


def test_interactive_reads_stdin(server: tuple[str, _Recorder]) -> None:
    url, rec = server
    proc = subprocess.run(
        [sys.executable, "-m", "plc.shell", "--url", url, "-u", "admin@example.org",
         "-p", "secret"],
        input="x = GetSlices([2], ['name'])\nprint('GOT', x[0]['name'])\n",
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "HOME": "/nonexistent-home"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "GOT pl_two" in proc.stdout


def test_config_gives_url_and_maintenance_account(tmp_path: Path) -> None:
    conf = tmp_path / "plc.toml"
    conf.write_text('[api]\nlisten = "0.0.0.0:8123"\nmaintenance_user = "maint@localhost"\n'
                    'maintenance_password = "m-pass"\n')
    assert shell.load_config(conf) == {"url": "http://127.0.0.1:8123/PLCAPI/",
                                       "username": "maint@localhost", "password": "m-pass"}
    conf.write_text('[api]\nlisten = "[::1]:8124"\n')
    assert shell.load_config(conf) == {"url": "http://[::1]:8124/PLCAPI/"}
    conf.write_text('[api]\nlistne = "x"\n')
    with pytest.raises(shell.ShellError, match="listne"):
        shell.load_config(conf)
    with pytest.raises(shell.ShellError, match="no such file"):
        shell.load_config(tmp_path / "missing.toml")


def test_plc_shell_console_script_against_real_server(tmp_path: Path) -> None:
    """`plc shell` (the console script) against `plc serve`: a read, and a batch."""
    try:
        from plc_live import remove_workdir, start_server
    except ImportError:  # tests/plc imported as a package
        from .plc_live import remove_workdir, start_server  # type: ignore[no-redef]

    srv = start_server(tmp_path / f"shell-{os.getpid()}")
    try:
        plc = str(Path(sys.executable).with_name("plc"))
        base = [plc, "shell", "--url", srv.url.replace("/PLCAPI/", "//PLCAPI//"),
                "-u", srv.admin_email, "-p", srv.admin_password]
        out = subprocess.run(base + ["-c", f"GetSites(['{srv.prefix}'], ['login_base'])"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"[{{'login_base': '{srv.prefix}'}}]"
        batch = ("begin(); AddSite({'name': 'S', 'abbreviated_name': 'S', "
                 "'login_base': 'shellsite'}); GetSites(['shellsite'], ['name']); "
                 "r = commit(); print(r[0] > 0, r[1])")
        out = subprocess.run(base + ["-c", batch], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "True [{'name': 'S'}]"
        out = subprocess.run(base + ["-c", "DeleteSite('no-such-site')"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Fault 102" in out.stderr
    finally:
        srv.stop()
        remove_workdir(tmp_path / f"shell-{os.getpid()}")
