"""`planetlab-sensors init-config` and `collect` as programs: the default file loads,
a bad key is refused naming it, and `collect` polls a node, answers /query and stops
on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sensors.collector import load_config
from tests.sensors.collector_fixture import free_port

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from sensors.cli import main; sys.exit(main())"]


def test_init_config_then_collect(tmp_path: Path) -> None:
    path = tmp_path / "sensors.toml"
    out = subprocess.run([*CLI, "init-config", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and load_config(path).port == 3180
    again = subprocess.run([*CLI, "init-config", str(path)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[collector]\nintervall = 5\n")
    out = subprocess.run([*CLI, "collect", "--config", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "collector.intervall" in out.stderr

    node_port, http_port = free_port(), free_port()
    host = f"cli{os.getpid()}.test"
    text = path.read_text().replace('db = "/var/lib/planetlab-sensors/collector.db"',
                                    f'db = "{tmp_path / "c.db"}"')
    text = text.replace("port = 3180", f"port = {http_port}").replace(
        "interval = 60", "interval = 1")
    path.write_text(text + f'\n[[nodes]]\nhostname = "{host}"\naddress = "127.0.0.1"\n'
                           f"port = {node_port}\nsite = \"cli\"\n")
    fake = subprocess.Popen([sys.executable, "tests/sensors/fakenode.py", "127.0.0.1",
                             str(node_port), host, "3"], cwd=REPO, stdout=subprocess.PIPE)
    col = subprocess.Popen([*CLI, "collect", "--config", str(path)], cwd=REPO,
                           stderr=subprocess.PIPE)
    try:
        assert fake.stdout is not None and fake.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        rows = []
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{http_port}/query?select=name,up,load1,tx_rate"
                with urllib.request.urlopen(url, timeout=5) as r:
                    rows = json.loads(r.read())
                if rows and rows[0]["tx_rate"] is not None:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert rows and rows[0]["name"] == host and rows[0]["up"] == 1, rows
        assert rows[0]["load1"] is not None and rows[0]["tx_rate"] > 0
        col.send_signal(signal.SIGTERM)
        assert col.wait(30) == 0
    finally:
        for p in (col, fake):
            if p.poll() is None:
                p.kill()
            p.wait()
