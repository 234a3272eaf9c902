"""Issue 15: the agent's errors about PLC say what is wrong: a wrong node key (with
the hint to compare it with `plc node-key`), a plc_url that answers 404, an https://
plc_url served in plain HTTP; and a huge tag value does not flood the agent's log."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_node import LiveServer, Site, plc_server

from agent.plcclient import PLCClient, PLCError

PID = os.getpid()


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with plc_server(tmp_path_factory.mktemp(f"operator-plcclient-{PID}")) as srv:
        yield srv


async def _session_error(url: str, state: Path, key: str, node_id: int,
                         hostname: str) -> str:
    client = PLCClient(url, state, lambda: (node_id, key), timeout=10, hostname=hostname)
    with pytest.raises(PLCError) as info:
        await client.get_slivers_raw()
    return str(info.value)


async def test_wrong_node_key_says_to_compare_with_plc_node_key(
        plc: LiveServer, tmp_path: Path) -> None:
    site = Site(plc)
    plc.node_key(site.hostname)   # PLC has a key for it; the agent holds another
    text = await _session_error(plc.url, tmp_path, "not-the-key", site.node_id, site.hostname)
    assert "fault 103" in text
    assert f"compare it with what `plc node-key {site.hostname}` prints on PLC" in text


async def test_404_says_to_check_the_path(plc: LiveServer, tmp_path: Path) -> None:
    url = plc.url.replace("/PLCAPI/", "/api/")
    text = await _session_error(url, tmp_path, "k", 1, "h.example.org")
    assert f"at {url}: HTTP 404" in text and "check plc_url" in text, text


async def test_https_to_plain_http_says_so(plc: LiveServer, tmp_path: Path) -> None:
    url = plc.url.replace("http://", "https://")
    text = await _session_error(url, tmp_path, "k", 1, "h.example.org")
    assert "TLS failed" in text and "answers in plain HTTP, not HTTPS" in text, text


def test_huge_tag_value_does_not_flood_the_log(plc: LiveServer) -> None:
    from agent_node import cleanup_node, make_node

    site = Site(plc)
    name = site.add_slice("huge", ports="tcp:" + "9" * 200_000)
    node = make_node(plc, site.hostname)
    try:
        out = node.run_once()
        log = out.stdout + out.stderr
        assert "ports tag 'tcp:999" in log, log[-3000:]
        assert "(200004 characters)" in log
        assert len(log) < 20_000, len(log)
        assert name in log
    finally:
        cleanup_node(node)
