"""A throwaway PostgreSQL server for tests and benchmarks: Debian's binaries, initdb
in a temp dir owned by an unprivileged user (``nobody``), listening only on a Unix
socket in that dir, stopped and removed by ``stop()``."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import psycopg

USER = "nobody"


def pg_bin() -> str | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl, if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _as_user(args: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    cmd = args if os.geteuid() != 0 else ["runuser", "-u", USER, "--", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


@dataclass
class PGServer:
    dir: str
    bin: str

    @property
    def socket_dir(self) -> str:
        return self.dir

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://plc@/{db}?host={self.dir}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE)."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def create_db(self, name: str, template: str | None = None) -> str:
        tpl = f" TEMPLATE {template}" if template else ""
        self.admin(f'CREATE DATABASE "{name}"{tpl}')
        return self.url(name)

    def stop(self) -> None:
        _as_user([f"{self.bin}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "-w",
                  "stop"], cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def start(max_connections: int = 120, name: str = "") -> PGServer:
    """initdb and start a server; raise RuntimeError with its log if it cannot."""
    binary = pg_bin()
    if binary is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    d = tempfile.mkdtemp(prefix=f"plc-pg-{name}{os.getpid()}-", dir="/tmp")
    if os.geteuid() == 0:
        pw = pwd.getpwnam(USER)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    server = PGServer(d, binary)
    try:
        r = _as_user([f"{binary}/initdb", "-D", f"{d}/data", "-U", "plc", "--auth=trust",
                      "-E", "UTF8", "--no-locale", "--no-sync"], cwd=d)
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr or r.stdout}")
        opts = (f"-k {d} -c listen_addresses='' -c max_connections={max_connections} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c shared_buffers=64MB")
        r = _as_user([f"{binary}/pg_ctl", "-D", f"{d}/data", "-o", opts, "-l", f"{d}/log",
                      "-w", "-t", "60", "start"], cwd=d)
        if r.returncode:
            log = open(f"{d}/log").read() if os.path.exists(f"{d}/log") else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr or r.stdout}\n{log}")
    except BaseException:
        server.stop()
        raise
    return server
