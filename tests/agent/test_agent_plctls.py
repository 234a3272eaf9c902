"""The PLC client against a real HTTPS XML-RPC server: verified with the configured CA,
refused without it; a refused session is renewed once by HMAC GetSession."""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest
import trio

from agent.plcclient import PLCClient, PLCError, hmac_auth

KEY = "k3y-" + str(os.getpid())


class Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/PLCAPI/",)


@pytest.fixture
def tls_plc(tmp_path: Path) -> Iterator[tuple[str, Path, list[Any]]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    calls: list[Any] = []
    server = SimpleXMLRPCServer(("127.0.0.1", 0), Handler, logRequests=False, allow_none=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    sessions: dict[str, str | None] = {"valid": None}

    def get_session(auth: dict[str, Any], *args: Any) -> str:
        calls.append(("GetSession", auth))
        if auth != hmac_auth(7, KEY, args):
            raise Exception("bad hmac")  # noqa: TRY002 - becomes a fault
        session = f"s-{len(calls)}"
        sessions["valid"] = session
        return session

    def get_slivers(auth: dict[str, Any]) -> Any:
        calls.append(("GetSlivers", auth))
        if auth.get("session") != sessions["valid"]:
            from xmlrpc.client import Fault
            raise Fault(103, "SessionAuth: No such session")
        return {"ok": True}

    server.register_function(get_session, "GetSession")  # type: ignore[arg-type]
    server.register_function(get_slivers, "GetSlivers")  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/PLCAPI/", cert, calls
    finally:
        server.shutdown()
        server.server_close()


async def test_tls_verified_and_session_renewed(tls_plc, tmp_path: Path) -> None:
    url, cert, calls = tls_plc
    (tmp_path / "session").write_text("stale-session\n")
    client = PLCClient(url, tmp_path, lambda: (7, KEY), ca_file=str(cert), timeout=10)
    assert await client.get_slivers() == {"ok": True}
    kinds = [c[0] for c in calls]
    assert kinds == ["GetSlivers", "GetSession", "GetSlivers"]   # refused, renewed, retried
    assert calls[1][1]["AuthMethod"] == "hmac" and calls[1][1]["node_id"] == 7
    session = (tmp_path / "session").read_text().strip()
    assert session == calls[2][1]["session"]
    assert (tmp_path / "session").stat().st_mode & 0o777 == 0o600
    raw = await client.get_slivers_raw()
    assert b"<boolean>1</boolean>" in raw and len(calls) == 4   # the session is reused


async def test_tls_refused_without_the_ca(tls_plc, tmp_path: Path) -> None:
    url, cert, calls = tls_plc
    client = PLCClient(url, tmp_path, lambda: (7, KEY), timeout=10)
    with pytest.raises(PLCError) as info:
        await client.get_slivers()
    assert info.value.kind == "unreachable" and "TLS" in str(info.value)
    assert calls == []


async def test_wrong_key_is_a_fault(tls_plc, tmp_path: Path) -> None:
    url, cert, calls = tls_plc
    client = PLCClient(url, tmp_path, lambda: (7, "wrong"), ca_file=str(cert), timeout=10)
    with pytest.raises(PLCError) as info:
        await client.get_slivers_raw()
    assert info.value.kind == "fault"
    assert not (tmp_path / "session").exists()


async def test_unreachable(tmp_path: Path) -> None:
    client = PLCClient("http://127.0.0.1:9/PLCAPI/", tmp_path, lambda: (7, KEY), timeout=5)
    (tmp_path / "session").write_text("s\n")
    with pytest.raises(PLCError) as info:
        await client.get_slivers_raw()
    assert info.value.kind == "unreachable"
    with trio.move_on_after(10):
        with pytest.raises(PLCError):
            await client.get_slivers()
