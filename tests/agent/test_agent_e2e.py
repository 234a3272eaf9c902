"""The agent against a real `plc serve` and the real kernel.

One PLC for the module; each test has its own node (state dir, image, contexts) and
its own slices, and removes everything it made even when it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_node import (
    LiveServer,
    Node,
    Site,
    cleanup_node,
    make_node,
    plc_server,
    start_server,
    wait_for,
)

from agent.sliceapi import client

pytestmark = pytest.mark.kernel

PID = os.getpid()


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"agent-plc-{PID}")) as srv:
        # Tag types for the limits this agent adds to the original set (rspec.py).
        api = srv.proxy()
        for tag in ("pids_max", "mem_max", "cpu_cap", "ports"):
            if not api.GetTagTypes(srv.admin_auth, {"tagname": tag}):
                api.AddTagType(srv.admin_auth, {"tagname": tag, "category": "slice/rspec",
                                                "description": f"agent limit {tag}"})
        yield srv


@pytest.fixture
def site(plc: LiveServer) -> Site:
    return Site(plc)


@pytest.fixture
def node(plc: LiveServer, site: Site) -> Iterator[Node]:
    n = make_node(plc, site.hostname)
    agents: list[subprocess.Popen[bytes]] = []
    n.agents = agents  # type: ignore[attr-defined]
    try:
        yield n
    finally:
        cleanup_node(n, agents)


def status(node: Node) -> dict[str, Any]:
    out = subprocess.run(node.agent_argv("status", "--json"), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sliver(node: Node, name: str) -> dict[str, Any] | None:
    for s in status(node)["slivers"]:
        if s["name"] == name:
            return s
    return None


def context_state(node: Node, name: str) -> dict[str, Any]:
    """The sliver's state.json, once create() has filled it in (it makes it empty
    first: a CI run read it in between)."""
    from kernel.context import Context

    return wait_for(lambda: Context.read_state(node.contexts_dir, name), 30,
                    f"{name}'s state", node.log_text)


def nothing_left(node: Node, name: str) -> None:
    """No context, process, mount, layer or cgroup of sliver `name` remains."""
    from kernel.cgroups import SliverCgroup, detect_layout

    assert not (node.contexts_dir / name).exists()
    assert not (node.roots_dir / name).exists()
    with open("/proc/self/mountinfo") as f:
        assert str(node.roots_dir / name) not in f.read()
    for d in SliverCgroup(detect_layout(), name).dirs():
        assert not Path(d).exists(), d


def run_once(node: Node) -> subprocess.CompletedProcess[str]:
    out = node.run_once()
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_slice_lifecycle(site: Site, node: Node) -> None:
    """Added -> running sliver after one reconcile; tag change in place; removal."""
    name = site.add_slice("life", cpu_share="3")
    run_once(node)
    s = sliver(node, name)
    assert s is not None and s["state"] == "running" and s["live"], s
    assert s["rspec"]["cpu_share"] == 3
    assert s["usage"]["pids"] >= 1 and "cpu_usec" in s["usage"] and "mem_bytes" in s["usage"]
    init_pid = context_state(node, name)["init_pid"]
    assert context_state(node, name)["limits"]["cpu_share"] == 3
    # Keys of the slice's members are installed for root inside the sliver.
    root = Path(context_state(node, name)["root"])
    assert site.key in (root / "root/.ssh/authorized_keys").read_text()

    site.set_tag(name, "cpu_share", "7")
    site.set_tag(name, "pids_max", "321")
    run_once(node)
    st = context_state(node, name)
    assert st["init_pid"] == init_pid, "limits must change without a restart"
    assert st["limits"]["cpu_share"] == 7 and st["limits"]["pids_max"] == 321
    from kernel.cgroups import SliverCgroup, detect_layout

    cg = SliverCgroup(detect_layout(), name)
    pids_dir = next(Path(d) for d in cg.dirs() if "pids" in str(d) or
                    (Path(d) / "pids.max").exists())
    assert (pids_dir / "pids.max").read_text().strip() == "321"

    site.api.DeleteSliceFromNodes(site.admin, name, [site.node_id])
    run_once(node)
    assert sliver(node, name) is None
    nothing_left(node, name)


def test_slice_user_exists_inside_with_the_members_keys(site: Site, node: Node) -> None:
    """The slice's own user is in its sliver's /etc/passwd (uid 1000 or the next free
    one: this image has a `user` at 1000), holding the members' keys."""
    from kernel.context import Context

    name = site.add_slice("usr")
    run_once(node)
    st = context_state(node, name)
    root = Path(st["root"])
    entry = [ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()
             if ln.startswith(f"{name}:")]
    assert len(entry) == 1 and entry[0][2] == "1001" and entry[0][5] == f"/home/{name}"
    assert f"{name}:x:1001:" in (root / "etc/group").read_text()
    keys = root / "home" / name / ".ssh" / "authorized_keys"
    assert site.key in keys.read_text() and keys.stat().st_uid == st["uid_base"] + 1001
    rc, out, err = Context.adopt(node.contexts_dir, name).output(
        ["/bin/sh", "-c", "id -un; id -u; echo $HOME"], user=name, timeout=30)
    assert rc == 0 and out.split() == [name.encode(), b"1001", f"/home/{name}".encode()], err
    site.set_tag(name, "cpu_share", "2")
    run_once(node)   # keys again: the user is not added twice
    assert [ln.split(":")[0] for ln in (root / "etc/passwd").read_text().splitlines()
            ].count(name) == 1


def test_names_plc_allows_make_slivers(site: Site, node: Node) -> None:
    """PLC's slice names may have capitals and dots after the site's prefix."""
    name = site.add_slice("Mixed.Case")
    run_once(node)
    s = sliver(node, name)
    assert s is not None and s["state"] == "running" and s["live"], s
    site.api.DeleteSliceFromNodes(site.admin, name, [site.node_id])
    run_once(node)
    nothing_left(node, name)


def test_rlimit_change_restarts_the_sliver_keeping_its_files(site: Site, node: Node) -> None:
    """rlimits and capabilities are fixed for a process tree's life: a change restarts
    the sliver in a new context on the same root instead of failing it."""
    name = site.add_slice("rlim", initscript_code="#!/bin/sh\necho \"$1\" >> /tmp/init.log\n")
    run_once(node)
    st = context_state(node, name)
    root, init_pid = Path(st["root"]), st["init_pid"]
    (root / "root" / "mine").write_text("kept")
    site.set_tag(name, "nofile_soft", "333")
    site.set_tag(name, "nofile_hard", "444")
    site.set_tag(name, "cpu_share", "5")
    out = run_once(node)
    s = sliver(node, name)
    assert s is not None and s["state"] == "running" and s["live"], (s, out.stderr)
    st = context_state(node, name)
    assert st["init_pid"] != init_pid, "a new context"
    assert st["limits"]["rlimits"]["nofile"] == [333, 444] and st["limits"]["cpu_share"] == 5
    assert (Path(st["root"]) / "root" / "mine").read_text() == "kept"
    # the initscript was told: stop in the old context, start in the new one
    assert (Path(st["root"]) / "tmp" / "init.log").read_text() == "start\nstop\nstart\n"
    with open(f"/proc/{st['init_pid']}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    assert line.split()[3:5] == ["333", "444"], line
    assert not Path(f"/proc/{init_pid}").exists() or \
        Path(f"/proc/{init_pid}/stat").read_text().split()[2] == "Z"
    # unchanged rlimits afterwards: in place again
    site.set_tag(name, "cpu_share", "6")
    run_once(node)
    assert context_state(node, name)["init_pid"] == st["init_pid"]
    site.api.DeleteSliceFromNodes(site.admin, name, [site.node_id])
    run_once(node)
    nothing_left(node, name)


def test_kill_and_restart_adopts(site: Site, node: Node) -> None:
    script = "#!/bin/sh\nsleep 1\necho \"$1\" >> /tmp/ran\n"
    names = [site.add_slice("k0", initscript_code=script), site.add_slice("k1")]
    agent = node.start_agent()
    node.agents.append(agent)  # type: ignore[attr-defined]
    # state.json appears part-way through a creation; "create done" is logged at its end.
    wait_for(lambda: all(f"{n}: create done" in node.log_text() for n in names), 60,
             "slivers to be created", node.log_text)
    pids = {n: context_state(node, n)["init_pid"] for n in names}
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(10)
    for n in names:   # the slivers outlive the agent
        os.kill(pids[n], 0)
    again = node.start_agent()
    node.agents.append(again)  # type: ignore[attr-defined]
    sock = str(node.cfg.socket_path)
    wait_for(lambda: Path(sock).exists(), 30, "the restarted agent's socket", node.log_text)
    time.sleep(3)  # at least one poll (poll_interval 2 s)
    assert {n: context_state(node, n)["init_pid"] for n in names} == pids
    st = status(node)
    assert sorted(s["name"] for s in st["slivers"]) == sorted(names)
    assert all(s["state"] == "running" for s in st["slivers"])
    log = node.log_text()
    assert log.count(f"{names[0]}: create done") == 1, log
    # The initscript ran in the background of the first agent, and not again on adoption.
    ran = Path(context_state(node, names[0])["root"]) / "tmp" / "ran"
    wait_for(lambda: ran.exists(), 30, "the initscript", node.log_text)
    assert ran.read_text() == "start\n"


def test_sigusr1_polls_at_once(site: Site, node: Node) -> None:
    """An operator who changed something at PLC need not wait for the next poll."""
    text = node.cfg_path.read_text()
    node.cfg_path.write_text(re.sub(r"(?m)^poll_interval = .*$", "poll_interval = 600", text))
    agent = node.start_agent()
    node.agents.append(agent)  # type: ignore[attr-defined]
    wait_for(lambda: status(node)["node"].get("last_poll_ok"), 30, "the first poll",
             node.log_text)
    name = site.add_slice("usr1")
    os.kill(agent.pid, signal.SIGUSR1)
    wait_for(lambda: f"{name}: create done" in node.log_text(), 30,
             "the sliver after SIGUSR1", node.log_text)


def test_plc_down_keeps_and_restores_slivers(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "plc")
    n = None
    try:
        s = Site(srv)
        name = s.add_slice("down")
        n = make_node(srv, s.hostname)
        run_once(n)
        pid = context_state(n, name)["init_pid"]
        srv.stop()
        out = n.run_once()
        assert out.returncode == 1   # the poll failed...
        assert context_state(n, name)["init_pid"] == pid  # ...and nothing changed
        os.kill(pid, 0)
        # A lost context (say, a reboot) is brought back from state while PLC is down.
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the init to die")
        out = n.run_once()
        assert out.returncode == 1
        new_pid = context_state(n, name)["init_pid"]
        assert new_pid != pid and Path(f"/proc/{new_pid}").exists()
        s_after = sliver(n, name)
        assert s_after is not None and s_after["state"] == "running"
    finally:
        srv.stop()
        if n is not None:
            cleanup_node(n)


def test_sliver_sees_its_own_rspec_over_the_socket(site: Site, node: Node) -> None:
    a = site.add_slice("sa", cpu_share="4")
    b = site.add_slice("sb", cpu_share="9")
    agent = node.start_agent()
    node.agents.append(agent)  # type: ignore[attr-defined]
    wait_for(lambda: all((node.contexts_dir / n / "state.json").exists() for n in (a, b)) and
             Path(node.cfg.socket_path).exists(), 60, "slivers and socket", node.log_text)
    time.sleep(0.5)
    from kernel.context import Context

    # From inside sliver a, through the socket at its fixed path, with a forged name in
    # the arguments: a sees its own rspec. The client is a tiny static C program built
    # here and dropped into the sliver (the busybox image has no unix-socket client).
    ctx = Context.adopt(node.contexts_dir, a)
    tool = node.base / "uclient"
    src = node.base / "uclient.c"
    src.write_text(UCLIENT_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(tool), str(src)], check=True,
                   timeout=120)
    dest = Path(context_state(node, a)["root"]) / "tmp" / "uclient"
    dest.write_bytes(tool.read_bytes())
    dest.chmod(0o755)
    req = xmlrpc.client.dumps((b,), "GetRSpec")
    http = (f"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {len(req)}\r\n"
            f"\r\n{req}")
    code, out, err = ctx.output(["/tmp/uclient", "/run/planetlab/agent.sock"],
                                input=http.encode(), timeout=30)
    assert code == 0, (out, err)
    body = out.split(b"\r\n\r\n", 1)[-1]
    (rspec,), _ = xmlrpc.client.loads(body)
    assert isinstance(rspec, dict) and rspec["cpu_share"] == 4
    # The host's admin may name any sliver.
    theirs: Any = client(str(node.cfg.socket_path)).GetRSpec(b)
    assert theirs["cpu_share"] == 9


UCLIENT_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char buf[65536];
    ssize_t n;
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (argc != 2 || s < 0) return 2;
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); return 1; }
    while ((n = read(0, buf, sizeof buf)) > 0) write(s, buf, n);
    shutdown(s, SHUT_WR);
    while ((n = read(s, buf, sizeof buf)) > 0) write(1, buf, n);
    return 0;
}
"""


MALFORMED: list[Any] = [
    "not a struct",
    {"timestamp": 1},                                         # keys missing
    {"timestamp": "x", "node_id": 1, "hostname": "h", "initscripts": [], "accounts": [],
     "slivers": []},                                          # wrong type
    {"timestamp": 2**31 - 1, "node_id": 1, "hostname": "h", "initscripts": [],
     "accounts": [], "slivers": [{"name": "BAD NAME"}]},      # bad sliver
    {"timestamp": 2**31 - 1, "node_id": 1, "hostname": "h", "initscripts": [],
     "accounts": [], "slivers": {}},                          # slivers not a list
]


def test_malformed_replies_change_nothing(site: Site, node: Node) -> None:
    """A PLC that answers GetSlivers with malformed replies: every poll is rejected
    whole, the sliver keeps running unchanged, its record stays."""
    import threading
    from xmlrpc.server import SimpleXMLRPCServer

    name = site.add_slice("mal", cpu_share="5")
    run_once(node)
    before = context_state(node, name)
    replies = iter(MALFORMED)
    server = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
    server.register_function(lambda auth, *a: "session-x", "GetSession")
    server.register_function(lambda auth, *a: next(replies), "GetSlivers")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg_text = node.cfg_path.read_text().replace(
            node.cfg.plc_url, f"http://127.0.0.1:{server.server_address[1]}/RPC2")
        node.cfg_path.write_text(cfg_text)
        for _ in MALFORMED:
            out = node.run_once()
            assert out.returncode == 1, out.stderr
            assert "GetSlivers reply" in out.stderr
        after = context_state(node, name)
        assert after["init_pid"] == before["init_pid"] and after["limits"] == before["limits"]
        s = sliver(node, name)
        assert s is not None and s["state"] == "running" and s["rspec"]["cpu_share"] == 5
        assert "GetSlivers reply" in status(node)["node"]["last_poll_error"]
    finally:
        server.shutdown()
        server.server_close()


def test_initscript_runs_inside_at_start(site: Site, node: Node) -> None:
    script = "#!/bin/sh\necho \"$1 $2 $(hostname)\" > /tmp/initscript.out\necho initscript-said-hi\n"
    name = site.add_slice("init", initscript_code=script)
    out = run_once(node)
    root = Path(context_state(node, name)["root"])
    assert (root / "tmp/initscript.out").read_text() == f"start {name} {name}\n"
    assert f"sliver {name} initscript: initscript-said-hi" in out.stderr
    assert f"sliver {name}: initscript start exited with 0" in out.stderr


def test_initscript_lifecycle(site: Site, node: Node) -> None:
    """nodemanager spec §2.8: a sliver made disabled runs its script when enabled; a
    changed script runs `restart` on a running sliver; an unchanged one does not run
    again; `stop` runs before the sliver goes."""
    log = "/tmp/initscript.log"
    script = f"#!/bin/sh\necho \"v1 $1 $2\" >> {log}\n"
    name = site.add_slice("initl", initscript_code=script, enabled="0")
    run_once(node)
    root = Path(context_state(node, name)["root"])
    assert not (root / log[1:]).exists()          # disabled: not started
    site.set_tag(name, "enabled", "1")
    run_once(node)
    assert (root / log[1:]).read_text() == f"v1 start {name}\n"
    run_once(node)                                  # unchanged: not run again
    assert (root / log[1:]).read_text() == f"v1 start {name}\n"
    site.set_tag(name, "initscript_code", script.replace("v1", "v2"))
    out = run_once(node)
    assert (root / log[1:]).read_text() == f"v1 start {name}\nv2 restart {name}\n", out.stderr
    # no script any more: the file goes (nothing to run)
    tag = site.api.GetSliceTags(site.admin, {"name": name, "tagname": "initscript_code"})
    site.api.DeleteSliceTag(site.admin, tag[0]["slice_tag_id"])
    run_once(node)
    assert not (root / "etc/planetlab/initscript").exists()
    # stop runs before the sliver is destroyed: its output is in the agent's log
    site.set_tag(name, "initscript_code", "#!/bin/sh\necho \"bye $1\"\n")
    run_once(node)
    site.api.DeleteSliceFromNodes(site.admin, name, [site.node_id])
    out = run_once(node)
    assert f"sliver {name} initscript: bye stop" in out.stderr, out.stderr
    nothing_left(node, name)


def test_dead_sliver_comes_back_between_polls(site: Site, node: Node) -> None:
    """The local reconciler brings back a sliver whose init died, without a poll."""
    name = site.add_slice("back")
    text = node.cfg_path.read_text()
    text = text.replace("poll_interval = 2", "poll_interval = 3600")
    text = text.replace("reconcile_interval = 60", "reconcile_interval = 1")
    node.cfg_path.write_text(text)
    agent = node.start_agent()
    node.agents.append(agent)  # type: ignore[attr-defined]
    wait_for(lambda: (node.contexts_dir / name / "state.json").exists(), 60, "the sliver",
             node.log_text)
    pid = context_state(node, name)["init_pid"]
    os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        try:
            new = context_state(node, name)["init_pid"]
        except (FileNotFoundError, ValueError):
            return False
        return new != pid and Path(f"/proc/{new}").exists()

    wait_for(replaced, 30, "the sliver to come back", node.log_text)
    # The reconciler writes the new init into state.json before it logs its outcome.
    wait_for(lambda: "local reconcile: 1 done" in node.log_text(), 30,
             "the reconciler's report", node.log_text)


BINDTEST_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    struct sockaddr_in sa = {.sin_family = AF_INET};
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (argc != 2 || s < 0) return 2;
    sa.sin_port = htons(atoi(argv[1]));
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    printf("bind %d\n", bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 ? errno : 0);
    return 0;
}
"""


def test_guard_enforces_port_tags(site: Site, node: Node) -> None:
    """Slivers run under the guard: a port in slice A's `ports` tag binds in A and is
    refused in B [F1]."""
    from kernel.context import Context

    port = 20000 + PID % 10000
    a = site.add_slice("pa", ports=f"tcp:{port}")
    b = site.add_slice("pb")
    agent = node.start_agent()   # the guard's supervisor runs in the long-lived agent
    node.agents.append(agent)  # type: ignore[attr-defined]
    wait_for(lambda: all((node.contexts_dir / n / "state.json").exists() for n in (a, b)),
             60, "the slivers", node.log_text)
    tool = node.base / "bindtest"
    src = node.base / "bindtest.c"
    src.write_text(BINDTEST_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(tool), str(src)], check=True,
                   timeout=120)
    results = {}
    for name in (a, b):
        assert context_state(node, name)["guard"] is True
        dest = Path(context_state(node, name)["root"]) / "tmp" / "bindtest"
        dest.write_bytes(tool.read_bytes())
        dest.chmod(0o755)
        code, out, err = Context.adopt(node.contexts_dir, name).output(
            ["/tmp/bindtest", str(port)], timeout=30)
        results[name] = out.decode().strip()
    assert results[a] == "bind 0", results
    assert results[b] != "bind 0" and results[b].startswith("bind "), results
    # operators see who owns what
    owned = (sliver(node, a) or {}).get("ports", [])
    assert owned and all(p.startswith(f"tcp:{port}@") and p.endswith("(tag)") for p in owned)
    assert (sliver(node, b) or {}).get("ports") == []
    # A restart in a new context (an rlimit changed) keeps the ports and the guard.
    old_init = context_state(node, a)["init_pid"]
    site.set_tag(a, "nproc_hard", "5000")

    def restarted() -> bool:
        try:   # the state file is away for a moment during the restart
            new_init = context_state(node, a)["init_pid"]
        except (OSError, ValueError):
            return False
        return new_init != old_init and f"sliver {a}: update done" in node.log_text()

    wait_for(restarted, 60, "the restart", node.log_text)
    code, out, err = Context.adopt(node.contexts_dir, a).output(["/tmp/bindtest", str(port)],
                                                                 timeout=30)
    assert out.decode().strip() == "bind 0", (code, out, err)


def test_missing_image_keeps_the_sliver_pending(site: Site, node: Node) -> None:
    bad = site.add_slice("noimg", vref=f"nosuch{PID}")
    good = site.add_slice("okimg")
    run_once(node)
    s_bad, s_good = sliver(node, bad), sliver(node, good)
    assert s_bad is not None and s_bad["state"] == "pending" and not s_bad["live"]
    assert f"nosuch{PID}" in s_bad["message"] and "image import" in s_bad["message"]
    assert s_good is not None and s_good["state"] == "running" and s_good["live"]
    text = subprocess.run(node.agent_argv("status"), capture_output=True, text=True,
                          timeout=60).stdout
    assert f"image import nosuch{PID}" in text


def _remove_cgroup_parent(parent: str) -> None:
    """rmdir the node-wide group `parent` in every hierarchy (a test's own parent)."""
    from kernel.cgroups import SliverCgroup, detect_layout

    for d in {Path(d).parent for d in SliverCgroup(detect_layout(), "x", parent).dirs()}:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass


def test_cgroup_parent_is_the_configured_one(plc: LiveServer, site: Site) -> None:
    """[F2] An agent with cgroup_parent = P puts its slivers' groups at P/NAME of each
    hierarchy, none at the default planetlab/NAME; adopting and destroying use P too."""
    from kernel.cgroups import SliverCgroup, detect_layout

    parent = f"pltest{PID}"
    n = make_node(plc, site.hostname, cgroup_parent=parent)
    try:
        name = site.add_slice("cgp")
        run_once(n)
        assert context_state(n, name)["cgroup_parent"] == parent
        ours = SliverCgroup(detect_layout(), name, parent).dirs()
        assert ours and all(Path(d).is_dir() for d in ours), ours
        init_pid = context_state(n, name)["init_pid"]
        assert all(str(init_pid) in (Path(d) / "cgroup.procs").read_text().split()
                   for d in ours)
        for d in SliverCgroup(detect_layout(), name).dirs():
            assert not Path(d).exists(), d
        # A second run adopts the running sliver (through its state) and keeps it.
        run_once(n)
        assert context_state(n, name)["init_pid"] == init_pid
        site.api.DeleteSliceFromNodes(site.admin, name, [site.node_id])
        run_once(n)
        assert sliver(n, name) is None
        assert not any(Path(d).exists() for d in ours)
    finally:
        cleanup_node(n)
        _remove_cgroup_parent(parent)


# The agent, one cycle, printing its peak RSS (VmHWM, kB) on stderr at the end.
_HWM_ARGV = ("import sys; from agent.cli import main; rc = main(); "
             "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]; "
             "print('AGENT-' + hwm[0].strip(), file=sys.stderr); sys.exit(rc)")


def _run_once_hwm(node: Node) -> tuple[str, int]:
    """`run --once` of `node`'s agent: (its stderr, its peak RSS in kB)."""
    import sys

    out = subprocess.run([sys.executable, "-c", _HWM_ARGV, "--config", str(node.cfg_path),
                          "run", "--once"], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    hwm = [ln for ln in out.stderr.splitlines() if ln.startswith("AGENT-VmHWM:")]
    assert hwm, out.stderr[-4000:]
    return out.stderr, int(hwm[-1].split()[1])


def test_initscript_output_is_not_buffered_whole(site: Site, node: Node) -> None:
    """[F21] An initscript writing 100 MB: the agent keeps a bounded tail, so its peak
    RSS stays near an idle cycle's; the tail and the count of dropped bytes are logged,
    and the sliver runs."""
    quiet = site.add_slice("initq", initscript_code="#!/bin/sh\necho quiet\n")
    _, base_kb = _run_once_hwm(node)
    big = 100_000_000
    script = (f"#!/bin/sh\nyes 0123456789abcdef0123456789abcdef | head -c {big}\n"
              "echo; echo last-line-$1\n")
    name = site.add_slice("initbig", initscript_code=script)
    err, big_kb = _run_once_hwm(node)
    # Buffering the output whole took 4x its size (440 MB peak, against 36 MB for the
    # first cycle); a bounded tail takes nothing visible.
    assert big_kb - base_kb < 30 * 1024, (base_kb, big_kb)
    assert f"sliver {name} initscript: last-line-start" in err
    assert f"sliver {name}: initscript start exited with 0" in err
    dropped = [ln for ln in err.splitlines()
               if f"sliver {name}: initscript output:" in ln and "bytes dropped" in ln]
    assert dropped, err[-3000:]
    n = int(dropped[0].split("output: ")[1].split()[0])
    assert big - 128 * 1024 <= n <= big, n      # all but the tail (64 KiB) were dropped
    logged = [ln for ln in err.splitlines() if f"sliver {name} initscript: " in ln]
    assert 1 < len(logged) <= 200
    # Buffering the output whole took 4x its size; a bounded tail takes nothing visible.
    print("HWM", base_kb, big_kb)
    assert big_kb - base_kb < 30 * 1024, (base_kb, big_kb)
    s = sliver(node, name)
    assert s is not None and s["state"] == "running" and s["live"], s
    assert sliver(node, quiet) is not None


def test_initscript_daemon_holding_its_output_does_not_hold_the_agent(
        site: Site, node: Node) -> None:
    """[F21] An initscript that leaves a daemon with its stdout open: the agent stops
    reading when the script exits, not when the daemon closes the pipe."""
    script = "#!/bin/sh\nsleep 40 &\necho daemon-started\n"
    name = site.add_slice("initd", initscript_code=script)
    t0 = time.monotonic()
    out = run_once(node)
    assert time.monotonic() - t0 < 25, out.stderr[-3000:]
    assert f"sliver {name} initscript: daemon-started" in out.stderr
    assert f"sliver {name}: initscript start exited with 0" in out.stderr


def test_a_bad_name_from_plc_leaves_no_uid_range_behind(plc: LiveServer, site: Site,
                                                        node: Node) -> None:
    """Issue 9 item 9: a slice name with a trailing newline (an older PLC took it) made
    the creation fail and left a uid-range entry that outlived DeleteSlice, so a later
    slice on the node collided with it forever. Whatever PLC sends, a failed creation
    reserves nothing; the next good slice gets the first range and runs."""
    import sqlite3

    bad = site.add_slice("nl")
    db = sqlite3.connect(plc.db)   # what the API now refuses, written as an old PLC did
    try:
        with db:
            db.execute("UPDATE slices SET name = ? WHERE name = ?", (bad + "\n", bad))
    finally:
        db.close()
    run_once(node)
    assert sliver(node, bad + "\n") is None and sliver(node, bad) is None
    index = node.contexts_dir / ".uid-ranges"
    assert not index.exists() or index.read_text() == ""
    bad_id = site.api.GetSlices(site.admin, {"name": bad + "\n"}, ["slice_id"])[0]["slice_id"]
    site.api.DeleteSlice(site.admin, bad_id)
    run_once(node)
    good = site.add_slice("good")
    run_once(node)
    s = sliver(node, good)
    assert s is not None and s["state"] == "running", s
    assert [line.split(" ", 2)[2] for line in index.read_text().splitlines()] == [good]
