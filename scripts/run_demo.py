#!/usr/bin/env python3
"""`make run`: a demo PLC on this machine.

Creates a state directory (default /var/lib/planetlab-demo, or $PLANETLAB_DEMO_DIR),
initialises a PLC database there if needed, starts `plc serve` on 127.0.0.1:8000, adds
(once) a demo site, a PI, this machine as a node and a slice on it, prints how to reach
it, and serves until Ctrl-C, which stops the server cleanly.
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
ADMIN = "admin@planetlab.test"
PI = "pi@planetlab.test"
SITE = "demo"
SLICE = "demo_slice"
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


def populate(api: xmlrpc.client.ServerProxy, admin: dict, pi_password: str,
             hostname: str) -> None:
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
        print(f"""
PLC is running: {url}
  state directory  {STATE} (config {cfg}, log {STATE / 'plc-serve.log'})
  admin            {ADMIN} / {admin_password}
  PI               {PI} / {pi_password}
  site {SITE}, slice {SLICE} on node {hostname} (node_id {node_id}, key in {STATE / 'node.key'})

Try:
  .venv/bin/plc shell --url {url} --user {ADMIN} --password {admin_password} \\
      -c 'GetSlices({{}}, ["name", "node_ids"])'
  python3 -c "import xmlrpc.client as x; print(x.ServerProxy('{url}', allow_none=True)\\
.GetNodes({{'AuthMethod': 'anonymous'}}, None, ['hostname']))"

Ctrl-C stops it.""", flush=True)
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        proc.wait()
        return proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
