"""PLC front end: server CPU per call, against references measured in the same run.

Three servers answer the same call (GetNodes of one node by hostname, all fields,
session auth) on loopback, each as one process (`--workers 1`):

* ``current``: `plc serve` from this tree;
* ``old`` (with ``--ref REF``, default the commit before the slow-client hardening of
  issue 9): `plc serve` from that commit's plc/ (``git archive``), on its own database;
* ``stdlib``: xmlrpc.server.SimpleXMLRPCServer (threaded, HTTP/1.1 keep-alive) returning
  the same reply canned: the floor for a Python XML-RPC-over-HTTP server.

Clients are separate processes in tight keep-alive loops (``--clients``, 1 and 8 by
default). For each server the CPU time (user + system, from /proc) it used while the
clients ran is divided by the calls answered. Rounds are interleaved and medians
reported, so load from other work on the machine hits every server alike. CPU per call
is steadier than calls/s on a shared machine, but is still inflated by load (cache and
scheduler effects): compare the ratios, not the absolute values, between runs.

Prints a table and ratios; the last line is one JSON object.
Run as `.venv/bin/python bench/plc_cpu.py` (``--ref ''`` skips the old code).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "plc"))
from plc_live import ADMIN_PASSWORD, free_port  # noqa: E402

# the last commit before "a selector reads each request whole under deadlines" (issue 9)
DEFAULT_REF = "924cef1"
HOST = "n1.cpu.example.org"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Plc:
    """`plc init` + `plc serve --workers 1` from a source tree (``src``: None = this
    one's installed console script)."""

    def __init__(self, name: str, workdir: Path, src: Path | None) -> None:
        self.name = name
        self.db = workdir / f"{name}.db"
        self.port = free_port()
        self.email = f"admin{os.getpid()}@example.org"
        if src is None:
            self.cmd = [str(Path(sys.executable).with_name("plc"))]
            env_path = os.environ.get("PYTHONPATH", "")
        else:
            self.cmd = [sys.executable, "-c",
                        "import sys; from plc.cli import main; sys.exit(main())"]
            env_path = str(src)
        self.env = dict(os.environ, PYTHONPATH=env_path)
        subprocess.run([*self.cmd, "init", "--db", str(self.db), "--admin-email", self.email,
                        "--admin-password", ADMIN_PASSWORD, "--slice-prefix", "pl"],
                       check=True, capture_output=True, env=self.env, cwd=workdir)
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [*self.cmd, "serve", "--db", str(self.db), "--listen", f"127.0.0.1:{self.port}",
             "--workers", "1"], stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
            cwd=workdir)
        self.url = f"http://127.0.0.1:{self.port}/PLCAPI/"
        deadline = time.monotonic() + 30
        while True:
            try:
                xmlrpc.client.ServerProxy(self.url).system.listMethods()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: plc serve did not start") from None
                time.sleep(0.1)
        api = xmlrpc.client.ServerProxy(self.url, allow_none=True)
        session = api.GetSession({"AuthMethod": "password", "Username": self.email,
                                  "AuthString": ADMIN_PASSWORD})
        self.auth = {"AuthMethod": "session", "session": session}
        api.AddSite(self.auth, {"name": "CPU bench", "abbreviated_name": "cpu",
                                "login_base": "cpub", "max_slices": 5})
        api.AddNode(self.auth, "cpub", {"hostname": HOST})
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class _Handler(SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"
    rpc_paths = ("/PLCAPI/",)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Threaded(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True


def _stdlib_server(reply: Any, ready: Any) -> None:
    server = _Threaded(("127.0.0.1", 0), _Handler, allow_none=True, logRequests=False)
    server.register_function(lambda *args: reply, "GetNodes")
    ready.put(server.server_address[1])
    server.serve_forever()


def _client(url: str, auth: Any, start: float, seconds: float, out: Any) -> None:
    proxy = xmlrpc.client.ServerProxy(url, allow_none=True)
    for _ in range(20):  # connect and warm up before the clock starts
        proxy.GetNodes(auth, HOST)
    while time.time() < start:
        time.sleep(0.001)
    n = 0
    end = start + seconds
    while time.time() < end:
        proxy.GetNodes(auth, HOST)
        n += 1
    out.put(n)


def measure(url: str, pid: int, auth: Any, clients: int, seconds: float) -> float:
    """Server CPU seconds per call over ``seconds`` of ``clients`` tight loops."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_client, args=(url, auth, start, seconds, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    while time.time() < start:
        time.sleep(0.005)
    cpu0 = _cpu_seconds(pid)
    calls = sum(out.get(timeout=seconds + 60) for _ in procs)
    cpu = _cpu_seconds(pid) - cpu0
    for p in procs:
        p.join(10)
    return cpu / max(calls, 1)


def old_tree(ref: str, workdir: Path) -> Path:
    dest = workdir / "old"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "plc"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=DEFAULT_REF,
                        help="git commit of the old code path ('' to skip it)")
    parser.add_argument("--src", action="append", default=[], metavar="NAME=DIR",
                        help="also measure `plc serve` from DIR/plc (e.g. a variant)")
    parser.add_argument("--clients", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and server")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix=f"plc-cpu-{os.getpid()}-"))
    servers: dict[str, tuple[str, int, Any]] = {}
    plcs: list[Plc] = []
    ref_proc = None
    try:
        cur = Plc("current", workdir, None)
        plcs.append(cur)
        servers["current"] = (cur.url, cur.pid, cur.auth)
        if args.ref:
            old = Plc("old", workdir, old_tree(args.ref, workdir))
            plcs.append(old)
            servers["old"] = (old.url, old.pid, old.auth)
        for spec in args.src:
            name, _, src = spec.partition("=")
            other = Plc(name, workdir, Path(src).resolve())
            plcs.append(other)
            servers[name] = (other.url, other.pid, other.auth)
        reply = xmlrpc.client.ServerProxy(cur.url, allow_none=True).GetNodes(cur.auth, HOST)
        ctx = mp.get_context("fork")
        ready = ctx.Queue()
        ref_proc = ctx.Process(target=_stdlib_server, args=(reply, ready), daemon=True)
        ref_proc.start()
        port = ready.get(timeout=30)
        assert ref_proc.pid is not None
        servers["stdlib"] = (f"http://127.0.0.1:{port}/PLCAPI/", ref_proc.pid, cur.auth)

        results: dict[str, dict[str, float]] = {}
        for clients in counts:
            samples: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, (url, pid, auth) in servers.items():
                    samples[name].append(measure(url, pid, auth, clients, args.seconds))
            results[str(clients)] = {name: statistics.median(v) * 1e6
                                     for name, v in samples.items()}
        print(f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} "
              f"at end, {os.cpu_count()} CPUs; GetNodes of one node, {args.rounds} rounds "
              f"x {args.seconds:.0f} s, medians")
        names = list(servers)
        print("clients  " + "  ".join(f"{n:>10}" for n in names) + "   (server CPU us/call)"
              + "".join(f"  current/{n}" for n in names if n != "current"))
        for clients, row in results.items():
            ratios = "".join(f"  {row['current'] / row[n]:>{9 + len(n)}.2f}"
                             for n in names if n != "current")
            print(f"{clients:>7}  " + "  ".join(f"{row[n]:>10.0f}" for n in names) + ratios)
        print(json.dumps({"cpu_us_per_call": {c: {n: round(v, 1) for n, v in row.items()}
                                               for c, row in results.items()},
                          "ref": args.ref, "loadavg_1m_start": round(load_start, 2)},
                         sort_keys=True))
        return 0
    finally:
        if ref_proc is not None:
            ref_proc.kill()
            ref_proc.join()
        for p in plcs:
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
