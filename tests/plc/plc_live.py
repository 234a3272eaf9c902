"""A real `plc init` + `plc serve` on a free loopback port, for black-box tests and benches.

Only the console scripts in .venv/bin and the XML-RPC wire are used, never the server's
modules: these tests check the server against the spec, not against its own code.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PLC = str(Path(sys.executable).with_name("plc"))
ADMIN_PASSWORD = "Adm1n-pass-word"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    """A running `plc serve`; ``stop()`` always terminates and reaps it."""

    workdir: Path
    db: Path
    port: int
    prefix: str
    admin_email: str
    admin_password: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/PLCAPI/"

    @property
    def admin_auth(self) -> dict[str, Any]:
        return {"AuthMethod": "password", "Username": self.admin_email,
                "AuthString": self.admin_password}

    def proxy(self) -> Any:  # ServerProxy; results are XML-RPC values of any shape
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)

    def node_key(self, hostname: str) -> str:
        out = subprocess.run([PLC, "node-key", "--db", str(self.db), hostname],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"plc node-key {hostname} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        finally:
            if proc.poll() is None:  # pragma: no cover - last resort
                proc.kill()
                proc.wait()


def start_server(workdir: Path, prefix: str | None = None, ready_timeout: float = 30.0,
                 extra_args: tuple[str, ...] = ()) -> LiveServer:
    """`plc init` a fresh database in ``workdir`` and start `plc serve` on it.

    On failure nothing is left running; the exception carries the server's output.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f"t{os.getpid() % 100000}{random.randrange(1000)}"
    srv = LiveServer(workdir=workdir, db=workdir / "plc.db", port=free_port(), prefix=prefix,
                     admin_email=f"admin{os.getpid()}@example.org",
                     admin_password=ADMIN_PASSWORD, log=workdir / "serve.log")
    init = subprocess.run(
        [PLC, "init", "--db", str(srv.db), "--admin-email", srv.admin_email,
         "--admin-password", srv.admin_password, "--slice-prefix", prefix],
        capture_output=True, text=True, timeout=120, check=False, cwd=workdir)
    if init.returncode != 0:
        raise RuntimeError(f"plc init failed ({init.returncode}): {init.stderr.strip()}")
    with open(srv.log, "wb") as log:
        srv.proc = subprocess.Popen(
            [PLC, "serve", "--db", str(srv.db), "--listen", f"127.0.0.1:{srv.port}",
             *extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"plc serve exited with {srv.proc.returncode}: "
                                   f"{srv.log_text()}")
            try:
                srv.proxy().system.listMethods()
                return srv
            except (OSError, xmlrpc.client.ProtocolError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"plc serve not ready after {ready_timeout}s: "
                                       f"{srv.log_text()}") from None
                time.sleep(0.1)
    except BaseException:
        srv.stop()
        raise


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)


# -- random values ----------------------------------------------------------------------
# Code points from several scripts with 1-, 2-, 3- and 4-byte UTF-8 encodings, including
# characters XML must escape. No control characters: XML cannot carry most of them, and
# it turns "\r" into "\n" on parsing (XML 1.0 section 2.11).
_ALPHABET = (
    "abcXYZ019 &<>\"'.,;:!?/-_()[]{}#%*+=@~^|\\$"
    "àéîõüßçñøåÆŒ"          # 2 bytes
    "ΑβγΔЖжщЯ"               # 2 bytes
    "中文字測試日本語한국어ไทย"  # 3 bytes
    "€™✓☃"                   # 3 bytes
    "😀🚀🎉𝄞𠜎"                # 4 bytes
)


def utext(rng: random.Random, max_bytes: int) -> str:
    """A random Unicode string of exactly ``max_bytes`` UTF-8 bytes."""
    out: list[str] = []
    size = 0
    while size < max_bytes:
        ch = rng.choice(_ALPHABET)
        n = len(ch.encode())
        if size + n > max_bytes:
            ch, n = rng.choice("abcdefxyz"), 1
        out.append(ch)
        size += n
    return "".join(out)
