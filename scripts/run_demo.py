#!/usr/bin/env python3
"""`make run`: a demo PLC and a node agent for this machine.

Creates a state directory (default /var/lib/planetlab-demo, or $PLANETLAB_DEMO_DIR),
initialises a PLC database there if needed, starts `plc serve` on 127.0.0.1:8000, adds
(once) a demo site, a PI, this machine as a node and a slice on it; builds a small
busybox image for the node, writes an agent.toml and starts `planetlab-agent run`,
waits until the slice's sliver runs and prints how to enter it. Ctrl-C stops the agent
and PLC, then destroys the demo's slivers and unmounts what they used, so no sliver,
mount, cgroup or process is left behind (the databases and the image stay for the
next run).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

STATE = Path(os.environ.get("PLANETLAB_DEMO_DIR", "/var/lib/planetlab-demo"))
LISTEN = os.environ.get("PLANETLAB_DEMO_LISTEN", "127.0.0.1:8000")
PLC = [sys.executable, "-m", "plc.cli"]
AGENT = [sys.executable, "-m", "agent.cli"]
RUN_DIR = Path(os.environ.get("PLANETLAB_DEMO_RUN", "/run/planetlab-demo"))
IMAGE = "demo-busybox"
REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin@planetlab.test"
PI = "pi@planetlab.test"
SITE = "demo"
SLICE = "demo_slice"
DEMO_PORTS = "tcp:8080,udp:8080"
DEMO_UID_POOL_START = 2_000_000_000
DEMO_CGROUP_PARENT = "planetlab-demo"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


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


AGENT_TAGS = ("ports", "mem_max", "pids_max", "cpu_cap")   # plc init makes them too


def populate(api: xmlrpc.client.ServerProxy, admin: dict, pi_password: str,
             hostname: str) -> None:
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
    if not api.GetSliceTags(admin, {"name": SLICE, "tagname": "ports"}, ["slice_tag_id"]):
        api.AddSliceTag(admin, SLICE, "ports", DEMO_PORTS)   # to try a guarded bind


def agent_config(url: str, hostname: str) -> Path:
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
                       # Never a real agent's uids nor cgroups on the same machine: the
                       # demo's pool lies above the default pool's end (1,967,040,000).
                       ("uid_pool_start", DEMO_UID_POOL_START), ("uid_pool_ranges", 64),
                       ("cgroup_parent", DEMO_CGROUP_PARENT)):
        literal = f'"{value}"' if isinstance(value, str) else str(value)
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {literal}", text, count=1)
    cfg.write_text(text)
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


def wait_sliver(cfg: Path, agent: subprocess.Popen[bytes]) -> dict:
    import json

    for _ in range(600):
        if agent.poll() is not None:
            sys.exit(f"planetlab-agent exited with status {agent.returncode} "
                     f"(see {STATE / 'agent.log'})")
        out = subprocess.run([*AGENT, "--config", str(cfg), "status", "--json"],
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode == 0:
            for s in json.loads(out.stdout)["slivers"]:
                if s["name"] == SLICE and s["state"] == "running" and s["live"]:
                    return s
                if s["name"] == SLICE and s["state"] in ("failed", "pending") and s["message"]:
                    print(f"sliver {SLICE}: {s['state']}: {s['message']}", flush=True)
        time.sleep(0.5)
    sys.exit(f"the sliver {SLICE} did not come up within 5 minutes (see {STATE / 'agent.log'})")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def teardown() -> None:
    """Destroy the demo's slivers and release their roots and the layer store."""
    sys.path.insert(0, str(REPO))
    from agent.backend import KernelBackend
    from kernel import disk
    from kernel.context import Context
    from kernel.rootfs import list_roots, release_root

    state_dir = STATE / "agent"
    if not state_dir.exists():
        return
    backend = KernelBackend(state_dir, RUN_DIR, cgroup_parent=DEMO_CGROUP_PARENT)
    for name in Context.list(backend.run_dir):
        try:
            if name in backend.live():
                backend.destroy(name)
            else:
                Context.destroy_stale(backend.run_dir, name, cgroup_parent=DEMO_CGROUP_PARENT)
                backend.destroy(name)
            print(f"destroyed sliver {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - go on with the others, say what failed
            print(f"destroying sliver {name} failed: {exc}", file=sys.stderr, flush=True)
    for name in list_roots(backend.roots_dir):
        release_root(backend.roots_dir, name)
    disk.unmount_store(backend.roots_dir)
    # The agent's (empty) cgroup parents: a busy one (other slivers) stays.
    for parent in [*Path("/sys/fs/cgroup").glob(f"*/{backend.cgroup_parent}"),
                   Path("/sys/fs/cgroup") / backend.cgroup_parent]:
        try:
            parent.rmdir()
        except OSError:
            pass
    import shutil

    shutil.rmtree(RUN_DIR, ignore_errors=True)   # runtime state only (the socket's dir)


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    cfg = STATE / "plc.toml"
    db = STATE / "plc.db"
    if not cfg.exists():
        run("init-config", str(cfg))
        text = cfg.read_text()
        text = re.sub(r'(?m)^path = ".*"$', f'path = "{db}"', text, count=1)
        text = re.sub(r'(?m)^listen = ".*"$', f'listen = "{LISTEN}"', text, count=1)
        text = re.sub(r'(?m)^spool_dir = ".*"$', f'spool_dir = "{STATE / "mail"}"', text)
        cfg.write_text(text)
    admin_password = secret("admin-password")
    pi_password = secret("pi-password")
    if not db.exists():
        run("init", "--config", str(cfg), "--admin-email", ADMIN,
            "--admin-password", admin_password, "--slice-prefix", "pl")
    log = open(STATE / "plc-serve.log", "ab")
    proc = subprocess.Popen([*PLC, "serve", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT)
    agent: subprocess.Popen[bytes] | None = None
    agent_log = None
    try:
        url = f"http://{LISTEN}/PLCAPI/"
        api = xmlrpc.client.ServerProxy(url, allow_none=True)
        wait_ready(api, proc)
        admin = {"AuthMethod": "password", "Username": ADMIN, "AuthString": admin_password}
        hostname = node_hostname()
        populate(api, admin, pi_password, hostname)
        node_key = run("node-key", "--config", str(cfg), hostname)
        (STATE / "node.key").write_text(node_key + "\n")
        (STATE / "node.key").chmod(0o600)
        node_id = api.GetNodes(admin, [hostname], ["node_id"])[0]["node_id"]
        ensure_image()
        agent_cfg = agent_config(url, hostname)
        agent_log = open(STATE / "agent.log", "ab")
        agent = subprocess.Popen([*AGENT, "--config", str(agent_cfg), "run"], stdout=agent_log,
                                 stderr=subprocess.STDOUT, cwd=REPO)
        sliver = wait_sliver(agent_cfg, agent)
        print(f"""
PLC is running: {url}
  state directory  {STATE} (config {cfg}, log {STATE / 'plc-serve.log'})
  admin            {ADMIN} / {admin_password}
  PI               {PI} / {pi_password}
  site {SITE}, slice {SLICE} on node {hostname} (node_id {node_id}, key in {STATE / 'node.key'})

The node agent is running: config {agent_cfg}, log {STATE / 'agent.log'}
  sliver {SLICE}: {sliver['state']}, image {sliver['image']}, uids from {sliver['uid_base']}

Enter the sliver (it owns {DEMO_PORTS}: try `nc -l -p 8080` there, and 8081, refused):
  .venv/bin/planetlab-agent --config {agent_cfg} enter {SLICE}
Status of every sliver (--json for scripts):
  .venv/bin/planetlab-agent --config {agent_cfg} status
Ask PLC:
  .venv/bin/plc shell --url {url} --user {ADMIN} --password {admin_password} \\
      -c 'GetSlices({{}}, ["name", "node_ids"])'
The agent polls PLC every 30 s; SIGUSR1 to it polls at once:
  kill -USR1 {agent.pid}

Ctrl-C stops everything.""", flush=True)
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        while proc.poll() is None and agent.poll() is None:
            time.sleep(0.5)
        return proc.returncode or agent.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the cleanup finish
        stop(agent)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        if agent_log is not None:
            agent_log.close()
        teardown()
        print("stopped: PLC, the agent and every demo sliver", flush=True)


if __name__ == "__main__":
    sys.exit(main())
