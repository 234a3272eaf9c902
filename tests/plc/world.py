"""A small PlanetLab world for method tests, built once through the API and copied
per test (a SQLite file copy is much faster than building it again)."""

from __future__ import annotations

import base64
import os
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Any

NODE_KEY = "0123456789abcdef"
PASSWORD = "pw-of-everyone"


def ssh_blob(key_type: str, body: bytes) -> str:
    """Base64 of an OpenSSH public key blob: the length-prefixed type string (which PLC
    checks against the declared type), then ``body`` standing in for the key material."""
    return base64.b64encode(len(key_type).to_bytes(4, "big") + key_type.encode()
                            + body).decode()


def ssh_key(seed: str, key_type: str = "ssh-rsa") -> str:
    return f"{key_type} {ssh_blob(key_type, seed.encode() * 20)} {seed}"


@dataclass
class World:
    ids: dict[str, int] = field(default_factory=dict)
    auth: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        ids = self.__dict__.get("ids", {})
        if name in ids:
            return ids[name]
        raise AttributeError(name)

    @property
    def A(self) -> Any:  # noqa: N802  (w.A.user: the auth struct of "user")
        from types import SimpleNamespace

        return SimpleNamespace(**self.auth)


def pw(email: str) -> dict[str, Any]:
    return {"AuthMethod": "password", "Username": email, "AuthString": PASSWORD,
            "Role": "ignored"}  # legacy clients send extra keys (spec 2)


def build(api: xmlrpc.client.ServerProxy, admin: dict[str, Any]) -> World:
    w = World()
    w.auth["admin"] = admin
    w.auth["anon"] = {"AuthMethod": "anonymous"}
    ids = w.ids
    ids["site"] = api.AddSite(admin, {"name": "Test University", "abbreviated_name": "TU",
                                      "login_base": "tu", "max_slices": 10})
    ids["other_site"] = api.AddSite(admin, {"name": "Other", "abbreviated_name": "OT",
                                            "login_base": "ot", "max_slices": 10})
    for who, role, site in (("pi", "pi", "site"), ("user", "user", "site"),
                            ("tech", "tech", "site"), ("outsider", "user", "other_site"),
                            ("other_pi", "pi", "other_site")):
        email = f"{who}@{'tu' if site == 'site' else 'ot'}.example.org"
        pid = api.AddPerson(admin, {"first_name": who.title(), "last_name": "Tester",
                                    "email": email, "password": PASSWORD})
        api.UpdatePerson(admin, pid, {"enabled": True})
        api.AddRoleToPerson(admin, role, pid)
        api.AddPersonToSite(admin, pid, ids[site])
        ids[who] = pid
        w.auth[who] = pw(email)
    ids["user_key"] = api.AddPersonKey(admin, ids["user"], {"key_type": "ssh",
                                                            "key": ssh_key("user")})
    ids["pi_key"] = api.AddPersonKey(admin, ids["pi"], {"key_type": "ssh", "key": ssh_key("pi")})
    ids["node"] = api.AddNode(admin, ids["site"], {"hostname": "n1.tu.example.org"})
    ids["other_node"] = api.AddNode(admin, ids["other_site"], {"hostname": "n2.ot.example.org"})
    ids["rnode"] = api.AddNode(admin, ids["site"], {"hostname": "r1.tu.example.org",
                                                    "node_type": "reservable"})
    api.UpdateNode(admin, ids["node"], {"key": NODE_KEY})
    ids["interface"] = api.AddInterface(admin, ids["node"], {
        "type": "ipv4", "method": "static", "ip": "10.1.0.10", "network": "10.1.0.0",
        "netmask": "255.255.255.0", "broadcast": "10.1.0.255", "gateway": "10.1.0.1",
        "dns1": "10.1.0.2"})
    ids["slice"] = api.AddSlice(admin, {"name": "tu_one", "url": "http://tu.example.org/",
                                        "description": "first slice"})
    ids["other_slice"] = api.AddSlice(admin, {"name": "ot_two", "url": "http://ot/",
                                              "description": "other"})
    api.AddPersonToSlice(admin, ids["user"], ids["slice"])
    api.AddSliceToNodes(admin, ids["slice"], [ids["node"]])
    ids["slice_tag"] = api.AddSliceTag(admin, ids["slice"], "vref", "bookworm")
    ids["node_tag"] = api.AddNodeTag(admin, ids["node"], "deployment", "alpha")
    ids["nodegroup"] = api.AddNodeGroup(admin, "alphas", "deployment", "alpha")
    w.auth["node"] = {"AuthMethod": "session", "session": api.GetSession(
        {"AuthMethod": "hmac", "node_id": ids["node"], "value": hmac_of(NODE_KEY)})}
    return w


def hmac_of(key: str, *args: Any) -> str:
    import hashlib
    import hmac

    def flat(v: Any) -> list[str]:
        if isinstance(v, list | tuple):
            return [s for x in v for s in flat(x)]
        if isinstance(v, dict):
            return [s for x in v.values() for s in flat(x)]
        return [str(v)]

    msg = "[" + "".join(sorted(flat(list(args)))) + "]"
    return hmac.new(key.encode(), msg.encode(), hashlib.sha1).hexdigest()


PID = os.getpid()
