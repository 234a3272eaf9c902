"""The collector learns its nodes from a real `plc serve` with its own PLC account
(GetNodes, GetSites, GetInterfaces): primary address, site login_base, hostname when
a node has no address; a refused account keeps the list it had."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plc"))

from plc_live import remove_workdir, start_server  # noqa: E402

from sensors.collector import Collector, Config, NodeEntry  # noqa: E402
from sensors.tsstore import TSStore  # noqa: E402

PID = os.getpid()


def test_nodes_from_plc_with_the_collectors_own_account() -> None:
    work = Path(tempfile.mkdtemp(prefix=f"scplc{PID}-"))
    srv = start_server(work / "plc")
    try:
        api, admin = srv.proxy(), srv.admin_auth
        login = f"sc{PID % 100000}"
        site = api.AddSite(admin, {"name": "Sensors site", "abbreviated_name": "ss",
                                   "login_base": login, "max_slices": 1})
        hosts = [f"n1-{PID}.sensors.test", f"n2-{PID}.sensors.test"]
        n1 = api.AddNode(admin, site, {"hostname": hosts[0]})
        api.AddNode(admin, site, {"hostname": hosts[1]})
        api.AddInterface(admin, n1, {"type": "ipv4", "method": "static", "ip": "10.9.8.7",
                                     "netmask": "255.255.255.0", "network": "10.9.8.0",
                                     "broadcast": "10.9.8.255", "gateway": "10.9.8.1",
                                     "dns1": "10.9.8.53", "is_primary": True})
        email, password = f"collector{PID}@sensors.test", "collector-pw"
        person = api.AddPerson(admin, {"first_name": "Sensor", "last_name": "Collector",
                                       "email": email, "password": password})
        api.UpdatePerson(admin, person, {"enabled": True})
        api.AddPersonToSite(admin, person, site)
        api.AddRoleToPerson(admin, "user", person)

        async def learn(pw: str, col: Collector | None = None) -> Collector:
            plc = {"url": srv.url, "username": email, "password": pw,
                   "auth_method": "password"}
            if col is None:
                store = await TSStore.open_path(str(work / "c.db"))
                col = Collector(Config(db="", node_port=3999, plc=plc,
                                       nodes=[NodeEntry("byhand.test", "192.0.2.1", 3100)]),
                                store)
            col.cfg.plc = plc
            await col.refresh_from_plc()
            return col

        async def go() -> None:
            col = await learn(password)
            got = {h: (st.entry.address, st.entry.port, st.entry.site)
                   for h, st in col.nodes.items()}
            assert got[hosts[0]] == ("10.9.8.7", 3999, login)
            assert got[hosts[1]] == (hosts[1], 3999, login)
            assert got["byhand.test"] == ("192.0.2.1", 3100, "")
            before = dict(col.nodes)
            await learn("wrong", col)           # refused: logged, list kept
            assert col.nodes == before
            await col.store.close()
        asyncio.run(go())
    finally:
        srv.stop()
        remove_workdir(work / "plc")
        shutil.rmtree(work, ignore_errors=True)
