#!/usr/bin/env python3
"""`make run`: a demo PLC and a node agent for this machine.

Creates a state directory (default /var/lib/planetlab-demo, --state-dir or
$PLANETLAB_DEMO_DIR), initialises a PLC database there if needed, starts `plc serve`
(--listen, default 127.0.0.1:8000), adds (once) a demo site, a PI with an ed25519 ssh
key, this machine as a node and a slice on it with bandwidth and CPU tags; builds a
small busybox image, writes an agent.toml (its sensor server on --sensors-listen) and
starts `planetlab-agent run` and the sensors collector (--collector-listen, the
dashboard); waits until the slice's sliver runs and prints the quick tour.

Ctrl-C, SIGTERM, SIGHUP (a closed terminal) stop everything: the children run in
their own session, so only this script gets the terminal's signals and stops them in
order, then `planetlab-agent decommission` removes the demo's slivers, mounts, loop
device, cgroup parent (the demo's own, never a real agent's), tc state and run
directory. The databases, keys and the image stay: a second run reuses them.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("PLANETLAB_DEMO_DIR", "/var/lib/planetlab-demo"))
RUN_DIR = Path(os.environ.get("PLANETLAB_DEMO_RUN", "/run/planetlab-demo"))
LISTEN = os.environ.get("PLANETLAB_DEMO_LISTEN", "127.0.0.1:8000")
SENSORS_LISTEN = "127.0.0.1:3100"
COLLECTOR_LISTEN = "127.0.0.1:3180"
PLC = [sys.executable, "-m", "plc.cli"]
AGENT = [sys.executable, "-m", "agent.cli"]
SENSORS = [sys.executable, "-m", "sensors.cli"]
IMAGE = "demo-busybox"
REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin@planetlab.test"
PI = "pi@planetlab.test"
SITE = "demo"
SLICE = "demo_slice"
DEMO_PORTS = "tcp:8080,udp:8080"
#: The demo slice's resource tags (agent/rspec.py units): 10 Mbit/s ceiling, CPU
#: weight 2, at most half a CPU.
DEMO_TAGS = {"ports": DEMO_PORTS, "net_max_rate": "10000", "cpu_share": "2", "cpu_cap": "50"}
#: Never a real agent's uids nor cgroups on the same machine: the demo's pool lies above
#: the default pool's end (1,967,040,000), its cgroups under their own parent.
DEMO_UID_POOL_START = 2_000_000_000
DEMO_CGROUP_PARENT = "planetlab-demo"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Stop(Exception):
    """A signal asked the demo to stop (SIGINT, SIGTERM, SIGHUP)."""


def on_signal(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def say(text: str) -> None:
    """Print, surviving a closed terminal (SIGHUP's usual companion: EIO on write)."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def split_listen(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        sys.exit(f"{option} {value!r}: ADDRESS:PORT is needed, e.g. 127.0.0.1:8001")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_free(value: str, what: str, option: str) -> None:
    """Exit with a clear message when `value` (ADDR:PORT) cannot be bound."""
    host, port = split_listen(value, option)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = ("is already in use (another `make run`, or another program)"
                   if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}")
            sys.exit(f"make run: {what} address {host}:{port} {why}.\n"
                     f"Choose another with {option} ADDRESS:PORT, e.g.\n"
                     f"  make run ARGS='{option} {host}:{port + 1}'")


def node_hostname() -> str:
    """This machine's name as a PLC hostname (which needs a dotted name with a TLD)."""
    name = socket.gethostname().lower().rstrip(".")
    labels = name.split(".")
    if len(labels) >= 2 and all(_LABEL.match(x) for x in labels) and \
            re.fullmatch(r"[a-z]{2,6}", labels[-1]):
        return name
    short = re.sub(r"[^a-z0-9-]", "-", labels[0]).strip("-") or "node"
    return f"{short}.planetlab.test"


def secret(name: str) -> str:
    """A password kept in the state directory (created once, mode 0600)."""
    path = STATE / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(12) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def run(*args: str) -> str:
    out = subprocess.run([*PLC, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"plc {args[0]} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def wait_ready(api: xmlrpc.client.ServerProxy, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"plc serve exited with status {proc.returncode} "
                     f"(see {STATE / 'plc-serve.log'})")
        try:
            api.system.listMethods()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit("plc serve did not answer within 30 s")


AGENT_TAGS = ("ports", "mem_max", "pids_max", "cpu_cap", "cpu_share", "net_max_rate")


def populate(api: xmlrpc.client.ServerProxy, admin: dict, pi_password: str,
             hostname: str, pubkey: str) -> None:
    for tag in AGENT_TAGS:   # a database made before they were standard
        if not api.GetTagTypes(admin, {"tagname": tag}, ["tag_type_id"]):
            api.AddTagType(admin, {"tagname": tag, "category": "slice/rspec",
                                   "description": f"node agent: {tag}"})
            api.AddRoleToTagType(admin, "admin", tag)
    if not api.GetSites(admin, [SITE], ["site_id"]):
        api.AddSite(admin, {"name": "Demo Site", "abbreviated_name": "Demo",
                            "login_base": SITE, "max_slices": 10, "url": "http://localhost/"})
    if not api.GetPersons(admin, [PI], ["person_id"]):
        pid = api.AddPerson(admin, {"first_name": "Demo", "last_name": "PI", "email": PI,
                                    "password": pi_password})
        api.UpdatePerson(admin, pid, {"enabled": True})
        api.AddRoleToPerson(admin, "pi", pid)
        api.AddRoleToPerson(admin, "user", pid)
        api.AddPersonToSite(admin, pid, SITE)
    if not api.GetPersons(admin, [PI], ["key_ids"])[0]["key_ids"]:
        api.AddPersonKey(admin, PI, {"key_type": "ssh", "key": pubkey})
    if not api.GetNodes(admin, [hostname], ["node_id"]):
        nid = api.AddNode(admin, SITE, {"hostname": hostname, "boot_state": "boot"})
        api.AddInterface(admin, nid, {"type": "ipv4", "method": "static", "ip": "127.0.0.1",
                                      "network": "127.0.0.0", "netmask": "255.0.0.0",
                                      "broadcast": "127.255.255.255", "gateway": "127.0.0.1",
                                      "dns1": "127.0.0.1", "is_primary": True})
    if not api.GetSlices(admin, [SLICE], ["slice_id"]):
        api.AddSlice(admin, {"name": SLICE, "url": "http://localhost/",
                             "description": "Demo slice", "instantiation": "plc-instantiated"})
        api.AddPersonToSlice(admin, PI, SLICE)
        api.AddSliceToNodes(admin, SLICE, [hostname])
    for tag, value in DEMO_TAGS.items():
        if not api.GetSliceTags(admin, {"name": SLICE, "tagname": tag}, ["slice_tag_id"]):
            api.AddSliceTag(admin, SLICE, tag, value)


def ssh_key() -> tuple[Path, str]:
    """The PI's ed25519 key pair in the state directory (made once)."""
    key = STATE / "pi_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PI, "-f",
                        str(key)], check=True, stdin=subprocess.DEVNULL)
    return key, key.with_suffix(".pub").read_text().strip()


def set_key(text: str, key: str, value: object, table: str | None = None) -> str:
    """Set `key` (in `[table]`, or before the first table) of a generated TOML file."""
    literal = f'"{value}"' if isinstance(value, str) else str(value)
    if table is None:
        return re.sub(rf"(?m)^#? ?{key} = .*$", f"{key} = {literal}", text, count=1)
    head = re.search(rf"(?m)^\[{re.escape(table)}\]$", text)
    if head is None:
        return text.rstrip("\n") + f"\n\n[{table}]\n{key} = {literal}\n"
    end = re.search(r"(?m)^\[", text[head.end():])
    stop = head.end() + end.start() if end else len(text)
    body, n = re.subn(rf"(?m)^#? ?{key} = .*$", f"{key} = {literal}", text[head.end():stop],
                      count=1)
    if not n:
        body = f"\n{key} = {literal}" + body
    return text[:head.end()] + body + text[stop:]


def agent_config(opts: argparse.Namespace, url: str, hostname: str) -> Path:
    """agent.toml for this machine's agent, written anew by every run (so that it has
    every key of this version; an operator's own config comes from `init-config`)."""
    cfg = STATE / "agent.toml"
    cfg.unlink(missing_ok=True)
    out = subprocess.run(
        [*AGENT, "init-config", str(cfg), "--plc-url", url, "--hostname", hostname,
         "--key-file", str(STATE / "node.key"), "--state-dir", str(STATE / "agent"),
         "--node-accounts", "", "--host-accounts", "0"],
        capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        sys.exit(f"planetlab-agent init-config failed: {out.stderr.strip()}")
    text = cfg.read_text()
    for key, value in (("run_dir", str(RUN_DIR)), ("socket_path", str(RUN_DIR / "agent.sock")),
                       ("default_image", IMAGE), ("poll_interval", 30), ("poll_jitter", 5),
                       ("host_accounts", 0), ("node_accounts", ""),
                       ("uid_pool_start", opts.uid_pool_start), ("uid_pool_ranges", 64),
                       ("cgroup_parent", opts.cgroup_parent)):
        text = set_key(text, key, value)
    # The node sensor server, a task of the agent ([sensors] listen, docs/sensors.md).
    # An agent without the [sensors] table refuses it as an unknown key: then the
    # collector shows the node as down.
    if "[sensors]" in text:
        text = set_key(text, "listen", opts.sensors_listen, "sensors")
    if opts.shape:
        text = set_key(text, "interfaces", "@@", "bandwidth").replace(
            '"@@"', "[" + ", ".join(f'"{i}"' for i in opts.shape) + "]")
    cfg.write_text(text)
    return cfg


def collector_config(opts: argparse.Namespace, url: str, admin_password: str) -> Path:
    cfg = STATE / "sensors.toml"
    cfg.unlink(missing_ok=True)
    out = subprocess.run([*SENSORS, "init-config", str(cfg)], capture_output=True, text=True,
                         cwd=REPO, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        sys.exit(f"planetlab-sensors init-config failed: {out.stderr.strip()}")
    host, port = split_listen(opts.collector_listen, "--collector-listen")
    _, node_port = split_listen(opts.sensors_listen, "--sensors-listen")
    text = cfg.read_text()
    for key, value in (("db", str(STATE / "collector.db")), ("listen", host), ("port", port),
                       ("interval", 10), ("node_port", node_port)):
        text = set_key(text, key, value, "collector")
    for key, value in (("url", url), ("username", ADMIN), ("password", admin_password),
                       ("refresh", 30)):
        text = set_key(text, key, value, "plc")
    cfg.write_text(text)
    cfg.chmod(0o600)
    return cfg


def ensure_image() -> None:
    """The demo image: a busybox root (about 2 MB), imported once."""
    sys.path.insert(0, str(REPO))
    from kernel.images import ImageStore
    from tests.kernel.busybox_image import make_busybox_tree

    store = ImageStore(STATE / "agent" / "images")
    try:
        store.get(IMAGE)
        return
    except LookupError:
        pass
    src = STATE / "image-src"
    if src.exists():
        import shutil

        shutil.rmtree(src)
    store.import_dir(IMAGE, make_busybox_tree(src))
    import shutil

    shutil.rmtree(src, ignore_errors=True)
    print(f"built the image {IMAGE!r} (busybox)", flush=True)


def wait_sliver(status_argv: list[str], agent: subprocess.Popen[bytes], log: Path) -> dict:
    """The demo sliver's status once it runs (`status_argv`: the agent's `status --json`)."""
    import json

    for _ in range(600):
        if agent.poll() is not None:
            sys.exit(f"planetlab-agent exited with status {agent.returncode} (see {log})")
        out = subprocess.run(status_argv, capture_output=True, text=True, cwd=REPO)
        if out.returncode == 0:
            for s in json.loads(out.stdout)["slivers"]:
                if s["name"] == SLICE and s["state"] == "running" and s["live"]:
                    return s
                if s["name"] == SLICE and s["state"] in ("failed", "pending") and s["message"]:
                    print(f"sliver {SLICE}: {s['state']}: {s['message']}", flush=True)
        time.sleep(0.5)
    sys.exit(f"the sliver {SLICE} did not come up within 5 minutes (see {log})")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def teardown(agent_cfg: Path | None) -> None:
    """`planetlab-agent decommission` on the demo's agent: its slivers, mounts, loop
    device, cgroup parent (the demo's own), tc state and run directory go."""
    if agent_cfg is None or not agent_cfg.exists():
        return
    out = subprocess.run([*AGENT, "--config", str(agent_cfg), "decommission"],
                         capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL)
    for line in out.stdout.splitlines():
        say(f"  {line}")
    if out.returncode != 0:
        say(f"cleaning up failed: {out.stderr.strip()}")


def options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make run ARGS=...", description="PLC, a node agent with its sensor server "
        "and the sensors collector on this machine, with a demo slice.")
    p.add_argument("--listen", default=LISTEN, metavar="ADDR:PORT",
                   help=f"PLC's API address (default {LISTEN})")
    p.add_argument("--sensors-listen", default=SENSORS_LISTEN, metavar="ADDR:PORT",
                   help=f"the node sensor server's address (default {SENSORS_LISTEN})")
    p.add_argument("--collector-listen", default=COLLECTOR_LISTEN, metavar="ADDR:PORT",
                   help=f"the collector's dashboard address (default {COLLECTOR_LISTEN})")
    p.add_argument("--state-dir", type=Path, default=STATE,
                   help=f"databases, keys, image, configs (default {STATE})")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help=f"the agent's runtime directory (default {RUN_DIR})")
    p.add_argument("--cgroup-parent", default=DEMO_CGROUP_PARENT,
                   help="the agent's cgroup parent (one per demo on a machine)")
    p.add_argument("--uid-pool-start", type=int, default=DEMO_UID_POOL_START,
                   help="first host uid of the slivers (one range per demo on a machine)")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="N > 1: N nodes, each an agent in its own network namespace")
    p.add_argument("--shape", action="append", default=[], metavar="IFACE",
                   help="shape this interface's traffic (HTB, net_max_rate); none by default")
    return p.parse_args(argv)


def prepare_plc(listen: str) -> tuple[Path, str, str]:
    """plc.toml (made once, its listen set by every run) and the database (made once);
    (config, admin password, PI password)."""
    STATE.mkdir(parents=True, exist_ok=True)
    cfg = STATE / "plc.toml"
    db = STATE / "plc.db"
    if not cfg.exists():
        run("init-config", str(cfg))
        text = cfg.read_text()
        text = re.sub(r'(?m)^path = ".*"$', f'path = "{db}"', text, count=1)
        text = re.sub(r'(?m)^spool_dir = ".*"$', f'spool_dir = "{STATE / "mail"}"', text)
        cfg.write_text(text)
    # Every run honours --listen (a second run on another port reuses the database).
    cfg.write_text(re.sub(r'(?m)^listen = ".*"$', f'listen = "{listen}"',
                          cfg.read_text(), count=1))
    admin_password = secret("admin-password")
    pi_password = secret("pi-password")
    if not db.exists():
        run("init", "--config", str(cfg), "--admin-email", ADMIN,
            "--admin-password", admin_password, "--slice-prefix", "pl")
    return cfg, admin_password, pi_password


class Children:
    """The demo's long-running programs, each in its own session: the terminal's
    SIGINT/SIGHUP reach this script only, which stops them in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def start(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(STATE / log_name, "ab")
        self.logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):   # collector, agent, then PLC
            stop(proc)
        for log in self.logs:
            log.close()


def main_nodes(opts: argparse.Namespace) -> int:
    """`make run NODES=N`: PLC, N agents in network namespaces, the collector."""
    sys.path.insert(0, str(REPO))
    from scripts.demo_nodes import SENSORS_PORT, Nodes

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    check_free(opts.collector_listen, "the collector's dashboard", "--collector-listen")
    _, port = split_listen(opts.listen, "--listen")
    nodes = Nodes(opts.nodes)
    children = Children()
    try:
        nodes.make_links()
        listen = f"{nodes.plc_address}:{port}"
        check_free(listen, "PLC's API", "--listen")
        cfg, admin_password, pi_password = prepare_plc(listen)
        proc = children.start([*PLC, "serve", "--config", str(cfg)], "plc-serve.log")
        url = f"http://{listen}/PLCAPI/"
        api = xmlrpc.client.ServerProxy(url, allow_none=True)
        wait_ready(api, proc)
        admin = {"AuthMethod": "password", "Username": ADMIN, "AuthString": admin_password}
        key, pubkey = ssh_key()
        hostnames = nodes.hostnames()
        populate(api, admin, pi_password, hostnames[0], pubkey)
        for hostname in hostnames[1:]:
            if not api.GetNodes(admin, [hostname], ["node_id"]):
                api.AddNode(admin, SITE, {"hostname": hostname, "boot_state": "boot"})
        api.AddSliceToNodes(admin, SLICE, hostnames)
        from agent import config as agent_config_mod

        try:
            agent_config_mod.from_mapping({"sensors": {"listen": "127.0.0.1:3100"}}, "probe")
            serves = True
        except agent_config_mod.ConfigError:
            serves = False   # an agent without the node sensor server
        nodes.start(STATE, port, "pl", ADMIN, opts.uid_pool_start, serves)
        col_cfg = collector_config(opts, "", admin_password)
        col_cfg.write_text(col_cfg.read_text() + "".join(
            f'\n[[nodes]]\nhostname = "{n.hostname}"\naddress = "{n.link.node_addr}"\n'
            f'port = {SENSORS_PORT}\nsite = "{SITE}"\n' for n in nodes.nodes))
        collector = children.start([*SENSORS, "collect", "--config", str(col_cfg)],
                                   "collector.log")
        lines = []
        for n in nodes.nodes:
            sliver = wait_sliver(n.agent_argv("status", "--json"), n.agents[-1],
                                 n.base / "agent.log")
            lines.append(f"  node {n.index} {n.hostname} ({n.link.node_addr}, netns "
                         f"{n.link.netns}): {SLICE} {sliver['state']}, log {n.base}/agent.log\n"
                         f"    {shlex.join(n.agent_argv('enter', SLICE))}")
        say(f"""
PLC is running: {url} (admin {ADMIN} / {admin_password}; PI {PI} / {pi_password},
  ssh key {key})
{len(nodes.nodes)} nodes, each an agent in its own network namespace; the slice {SLICE}
runs on each. Enter it on a node:
""" + "\n".join(lines) + f"""
From a sliver, another node's sliver is reachable on the slice's ports
(`nc -l -p 8080` on one, `nc NODE_ADDRESS 8080` on another); plapi is in every sliver:
  /usr/lib/planetlab/plapi GetRSpec
Ask PLC:
  {REPO}/.venv/bin/plc shell --url {url} --user {ADMIN} --password {admin_password} \\
      -c 'GetSlices({{}}, ["name", "node_ids"])'
Open the dashboard: http://{opts.collector_listen}/

Ctrl-C stops everything.""")
        while proc.poll() is None and collector.poll() is None and \
                all(n.agents[-1].poll() is None for n in nodes.nodes):
            time.sleep(0.5)
        say("a program of the demo exited; stopping")
        return 1
    except Stop as why:
        say(f"stopping ({why})")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)   # let the cleanup finish
        children.stop_all()
        for error in nodes.close():
            say(f"cleaning up: {error}")
        say(f"stopped: PLC, {len(nodes.nodes)} nodes, the collector and every demo sliver")


def main(argv: list[str] | None = None) -> int:
    global STATE, RUN_DIR
    opts = options(argv)
    STATE, RUN_DIR = opts.state_dir.resolve(), opts.run_dir.resolve()
    if os.geteuid() != 0:
        sys.exit("make run: run as root (the node agent makes namespaces, mounts, cgroups)")
    if opts.nodes > 1:
        return main_nodes(opts)
    if opts.nodes < 1:
        sys.exit("make run: --nodes (NODES=) must be at least 1")
    for value, what, option in ((opts.listen, "PLC's API", "--listen"),
                                (opts.sensors_listen, "the node sensor server",
                                 "--sensors-listen"),
                                (opts.collector_listen, "the collector's dashboard",
                                 "--collector-listen")):
        check_free(value, what, option)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    cfg, admin_password, pi_password = prepare_plc(opts.listen)
    children = Children()
    start = children.start
    agent_cfg: Path | None = None
    try:
        proc = start([*PLC, "serve", "--config", str(cfg)], "plc-serve.log")
        url = f"http://{opts.listen}/PLCAPI/"
        api = xmlrpc.client.ServerProxy(url, allow_none=True)
        wait_ready(api, proc)
        admin = {"AuthMethod": "password", "Username": ADMIN, "AuthString": admin_password}
        hostname = node_hostname()
        key, pubkey = ssh_key()
        populate(api, admin, pi_password, hostname, pubkey)
        node_key = run("node-key", "--config", str(cfg), hostname)
        (STATE / "node.key").write_text(node_key + "\n")
        (STATE / "node.key").chmod(0o600)
        node_id = api.GetNodes(admin, [hostname], ["node_id"])[0]["node_id"]
        ensure_image()
        agent_cfg = agent_config(opts, url, hostname)
        agent = start([*AGENT, "--config", str(agent_cfg), "run"], "agent.log")
        collector = start([*SENSORS, "collect", "--config",
                           str(collector_config(opts, url, admin_password))], "collector.log")
        sliver = wait_sliver([*AGENT, "--config", str(agent_cfg), "status", "--json"], agent,
                             STATE / "agent.log")
        cli = f"{REPO}/.venv/bin"
        say(f"""
PLC is running: {url}
  state directory  {STATE} (config {cfg}, log {STATE / 'plc-serve.log'})
  admin            {ADMIN} / {admin_password}
  PI               {PI} / {pi_password}, ssh key {key}
  site {SITE}, slice {SLICE} on node {hostname} (node_id {node_id}, key in {STATE / 'node.key'})
  slice tags       {', '.join(f'{k}={v}' for k, v in DEMO_TAGS.items())}

The node agent is running: config {agent_cfg}, log {STATE / 'agent.log'}
  sliver {SLICE}: {sliver['state']}, image {sliver['image']}, uids from {sliver['uid_base']}
The sensors collector is running: http://{opts.collector_listen}/ (the dashboard),
  log {STATE / 'collector.log'}; the node's sensors: http://{opts.sensors_listen}/

Enter the sliver (it owns {DEMO_PORTS}: try `nc -l -p 8080` there, and 8081, refused):
  {cli}/planetlab-agent --config {agent_cfg} enter {SLICE}
Call the slice API from inside the sliver (plapi, in every sliver):
  /usr/lib/planetlab/plapi GetRSpec
  /usr/lib/planetlab/plapi GetPorts                 # the ports it may bind
  /usr/lib/planetlab/plapi Help
  df -k /                                           # its own disk_max, not the node's disk
Give the slice another port (the node admin's rcap, on the host):
  {cli}/planetlab-agent --config {agent_cfg} api AcquireRcap '{{"ports": "tcp:9000"}}'
  {cli}/planetlab-agent --config {agent_cfg} api BindRcap {SLICE} RCAP
  # RCAP: the 32 hex digits AcquireRcap printed; then `nc -l -p 9000` works in the sliver
ssh into the sliver (host accounts are off in the demo; with host_accounts = 1 in
{agent_cfg}, the PI's key logs in as the slice):
  ssh -i {key} {SLICE}@localhost
Status of every sliver (--json for scripts):
  {cli}/planetlab-agent --config {agent_cfg} status
Ask PLC:
  {cli}/plc shell --url {url} --user {ADMIN} --password {admin_password} \\
      -c 'GetSlices({{}}, ["name", "node_ids"])'
Open the dashboard: http://{opts.collector_listen}/
The agent polls PLC every 30 s; `planetlab-agent poll` polls at once:
  {cli}/planetlab-agent --config {agent_cfg} poll

Ctrl-C stops everything.""")
        while all(c.poll() is None for c in (proc, agent, collector)):
            time.sleep(0.5)
        for c, what in ((proc, "plc serve"), (agent, "the agent"), (collector, "the collector")):
            if c.returncode is not None:
                say(f"{what} exited with status {c.returncode}")
        return 1
    except Stop as why:
        say(f"stopping ({why})")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)   # let the cleanup finish
        children.stop_all()
        teardown(agent_cfg)
        say("stopped: PLC, the agent, the collector and every demo sliver")


if __name__ == "__main__":
    sys.exit(main())
