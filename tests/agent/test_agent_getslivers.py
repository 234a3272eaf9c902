"""GetSlivers replies are accepted whole or rejected whole, naming the bad path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent import getslivers


def good_reply() -> dict[str, Any]:
    return {
        "timestamp": 1_700_000_000, "node_id": 5, "hostname": "n1.example.org",
        "interfaces": [], "groups": [], "conf_files": [],
        "initscripts": [{"initscript_id": 1, "name": "hello", "enabled": True,
                         "script": "#!/bin/sh\n"}],
        "accounts": [{"name": "root", "keys": ["ssh-ed25519 AAAA root"]},
                     {"name": "site_admin", "keys": []}],
        "slivers": [{
            "name": "pl_test", "slice_id": 10, "instantiation": "plc-instantiated",
            "expires": 2**31 - 1, "keys": [{"key_type": "ssh", "key": "ssh-ed25519 AAAA u@x"}],
            "attributes": [{"tagname": "cpu_share", "value": "3"},
                           {"tagname": "vref", "value": "base"}],
            "GetSliceFamily": "planetlab-f8-x86_64",
        }],
        "xmpp": {"server": None}, "hrn": None, "reservation_policy": "none",
        "leases": None, "lease_granularity": 3600,
    }


def test_good_reply_parses() -> None:
    d = getslivers.parse(good_reply(), expected_node_id=5)
    assert d.node_id == 5 and d.timestamp == 1_700_000_000
    s = d.slivers["pl_test"]
    assert s.keys == ("ssh-ed25519 AAAA u@x",)
    assert s.attributes == {"cpu_share": "3", "vref": "base"}
    assert d.accounts["root"] == ("ssh-ed25519 AAAA root",)
    assert d.initscripts == {"hello": "#!/bin/sh\n"}
    assert getslivers.SliverSpec.from_wire(s.to_wire()) == s


def _set(reply: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = reply
    for part in path[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value


@pytest.mark.parametrize("path, value, words", [
    (("slivers",), KeyError, "lacks the key 'slivers'"),
    (("timestamp",), "now", "timestamp must be int"),
    (("node_id",), True, "node_id must be int, got boolean"),
    (("node_id",), 6, "not this node's id"),
    (("slivers",), {}, "slivers must be list"),
    (("slivers", 0, "name"), "Bad Name", "not a valid slice name"),
    (("slivers", 0, "name"), "../etc", "not a valid slice name"),
    (("slivers", 0, "expires"), "soon", "slivers[0].expires must be int"),
    (("slivers", 0, "keys", 0, "key"), 5, "slivers[0].keys[0].key must be str"),
    (("slivers", 0, "keys", 0, "key"), "a\nb", "line break"),
    (("slivers", 0, "attributes", 0), {"tagname": "x"}, "lacks the key 'value'"),
    (("slivers", 0, "attributes", 1, "value"), [1], "attributes[1].value must be string"),
    (("slivers", 0, "instantiation"), "magic", "instantiation"),
    (("accounts", 0, "keys"), "k", "accounts[0].keys must be list"),
    (("initscripts", 0, "script"), None, "initscripts[0].script must be str"),
])
def test_malformed_replies_rejected(path: tuple[Any, ...], value: Any, words: str) -> None:
    reply = copy.deepcopy(good_reply())
    _set(reply, path, value)
    with pytest.raises(getslivers.InvalidReply, match=None) as info:
        getslivers.parse(reply, expected_node_id=5)
    assert words in str(info.value)


def test_duplicate_slivers_rejected() -> None:
    reply = good_reply()
    reply["slivers"].append(copy.deepcopy(reply["slivers"][0]))
    with pytest.raises(getslivers.InvalidReply, match="repeats"):
        getslivers.parse(reply)


def test_not_a_dict() -> None:
    with pytest.raises(getslivers.InvalidReply, match="reply must be dict"):
        getslivers.parse([1, 2])


def test_int_tag_values_accepted_as_strings() -> None:
    reply = good_reply()
    reply["slivers"][0]["attributes"][0]["value"] = 3
    assert getslivers.parse(reply).slivers["pl_test"].attributes["cpu_share"] == "3"
