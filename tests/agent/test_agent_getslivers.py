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
    (("slivers", 0, "name"), "x" * 300, "300 characters long"),
    (("slivers", 0, "expires"), "soon", "slivers[0].expires must be int"),
    (("slivers", 0, "keys", 0, "key"), 5, "slivers[0].keys[0].key must be str"),
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


@pytest.mark.parametrize("name", ["Bad Name", "../etc", ".x_y", "a/b", "pl_" + "x" * 61, "",
                                  "pl_x\n", "pl_x\r\n"])
def test_a_name_this_node_cannot_use_skips_that_sliver_only(name: str) -> None:
    """PLC sends some slices to every node: one whose name cannot name a sliver here is
    skipped (and said why), the rest of the reply is applied."""
    reply = good_reply()
    other = copy.deepcopy(reply["slivers"][0])
    other["name"] = name
    reply["slivers"].insert(0, other)
    d = getslivers.parse(reply, expected_node_id=5)
    assert set(d.slivers) == {"pl_test"}
    assert "cannot name a sliver" in d.skipped[name]


@pytest.mark.parametrize("name", ["pl_Test", "princeton.cs_x", "3com_x", "pl_a.b-c"])
def test_names_plc_allows_are_accepted(name: str) -> None:
    reply = good_reply()
    reply["slivers"][0]["name"] = name
    d = getslivers.parse(reply, expected_node_id=5)
    assert set(d.slivers) == {name} and d.skipped == {}


def test_a_key_with_a_line_break_is_dropped_with_a_problem() -> None:
    reply = good_reply()
    reply["slivers"][0]["keys"].insert(0, {"key_type": "ssh", "key": "ssh-rsa A x\nssh-rsa B y"})
    s = getslivers.parse(reply, expected_node_id=5).slivers["pl_test"]
    assert s.keys == ("ssh-ed25519 AAAA u@x",)
    assert s.problems == ("keys[0] contains a line break; that key is not installed",)
