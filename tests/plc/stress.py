"""A stress run of the PLC API in the shape of legacy PLCAPI's plcsh stress test.

The same sequence of calls as that test (written anew here): add sites, persons, keys,
nodes, tag types, slices, slice members, slice nodes, slice tags and sliver tags;
update every object; move every slice off some of its nodes and back again (with
DeleteSliceFromNodes, UpdateSlice(nodes=...) and AddSliceToNodes) and then update every
slice and sliver tag (the step that failed with "No such slice tag" while leaving a node
dropped the slice's sliver tags); delete everything. With ``check`` every object is read
back after each phase and compared with what the run expects.

Used by tests/plc/test_plc_stress.py (small size, in ``make test``) and
bench/plc_stress.py (large size: 200 sites, 1000 persons, 400 nodes, 2000 slices).
"""

from __future__ import annotations

import base64
import random
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sizes:
    sites: int
    persons_per_site: int
    nodes_per_site: int
    slices_per_site: int
    tags_per_slice: int       # slice-wide tags of the run's tag types
    nodes_per_slice: int
    keys_per_person: int = 1

    @property
    def totals(self) -> str:
        s = self.sites
        return (f"{s} sites, {s * self.persons_per_site} persons, "
                f"{s * self.nodes_per_site} nodes, {s * self.slices_per_site} slices")


DEFAULT = Sizes(sites=10, persons_per_site=4, nodes_per_site=4, slices_per_site=4,
                tags_per_slice=2, nodes_per_slice=3)
LARGE = Sizes(sites=200, persons_per_site=5, nodes_per_site=2, slices_per_site=10,
              tags_per_slice=2, nodes_per_slice=3)


class Mismatch(AssertionError):
    pass


@dataclass
class Expected:
    sites: dict[int, dict[str, Any]] = field(default_factory=dict)
    persons: dict[int, dict[str, Any]] = field(default_factory=dict)
    keys: dict[int, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[int, dict[str, Any]] = field(default_factory=dict)
    slices: dict[int, dict[str, Any]] = field(default_factory=dict)
    slice_tags: dict[int, dict[str, Any]] = field(default_factory=dict)


def _key(rng: random.Random, comment: str) -> str:
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + rng.randbytes(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


class Stress:
    """One run against ``api`` (an XML-RPC proxy) with the ``admin`` auth struct."""

    def __init__(self, api: Any, admin: dict[str, Any], sizes: Sizes, seed: int = 1,
                 check: bool = True, tag: str = "st") -> None:
        self.api, self.admin, self.sizes, self.check_enabled = api, admin, sizes, check
        self.rng = random.Random(seed)
        self.tag = tag          # makes names unique per run
        self.x = Expected()
        self.tagnames: list[str] = []
        self.calls = 0
        self.phases: list[tuple[str, float]] = []

    def call(self, method: str, *args: Any) -> Any:
        self.calls += 1
        return getattr(self.api, method)(self.admin, *args)

    # -- the run ------------------------------------------------------------------
    def run(self) -> None:
        for name, step in (("add", self.add), ("update", self.update),
                           ("leave and rejoin nodes", self.churn), ("delete", self.delete)):
            started = time.monotonic()
            step()
            if self.check_enabled:
                self.check(name)
            self.phases.append((name, time.monotonic() - started))

    def add(self) -> None:
        a, x, s = self.call, self.x, self.sizes
        for i in range(s.tags_per_slice + 1):
            name = f"{self.tag}tag{i}"
            a("AddTagType", {"tagname": name, "category": "slice/stress",
                             "description": f"stress tag {i}"})
            self.tagnames.append(name)
        for i in range(s.sites):
            login_base = f"{self.tag}{i}"
            fields = {"name": f"Stress site {i}", "abbreviated_name": f"S{i}",
                      "login_base": login_base, "max_slices": s.slices_per_site}
            site_id = a("AddSite", fields)
            x.sites[site_id] = {**fields, "person_ids": set(), "node_ids": set(),
                                "slice_ids": set()}
            for j in range(s.persons_per_site):
                email = f"p{j}@{login_base}.stress.example.org"
                pf = {"first_name": f"P{j}", "last_name": f"Site{i}", "email": email,
                      "password": f"pw-{i}-{j}"}
                pid = a("AddPerson", pf)
                a("UpdatePerson", pid, {"enabled": True})
                a("AddRoleToPerson", "user", pid)
                a("AddPersonToSite", pid, site_id)
                x.persons[pid] = {"first_name": pf["first_name"], "last_name": pf["last_name"],
                                  "email": email, "enabled": True, "site_ids": {site_id},
                                  "key_ids": set(), "slice_ids": set()}
                x.sites[site_id]["person_ids"].add(pid)
                for k in range(s.keys_per_person):
                    key = _key(self.rng, f"{email}#{k}")
                    kid = a("AddPersonKey", pid, {"key_type": "ssh", "key": key})
                    x.keys[kid] = {"key": key, "person_id": pid}
                    x.persons[pid]["key_ids"].add(kid)
            for j in range(s.nodes_per_site):
                hostname = f"n{j}.{login_base}.stress.example.org"
                nid = a("AddNode", site_id, {"hostname": hostname, "model": "stress-1"})
                x.nodes[nid] = {"hostname": hostname, "site_id": site_id, "model": "stress-1",
                                "slice_ids": set()}
                x.sites[site_id]["node_ids"].add(nid)
        node_ids = sorted(x.nodes)
        for site_id in sorted(x.sites):
            members = sorted(x.sites[site_id]["person_ids"])
            for j in range(s.slices_per_site):
                name = f"{x.sites[site_id]['login_base']}_slice{j}"
                sf = {"name": name, "url": f"http://{name}.example.org/",
                      "description": f"stress slice {j}", "max_nodes": 100}
                sid = a("AddSlice", sf)
                x.slices[sid] = {**sf, "site_id": site_id, "node_ids": set(),
                                 "person_ids": set(), "tag_ids": set()}
                x.sites[site_id]["slice_ids"].add(sid)
                pid = self.rng.choice(members)
                a("AddPersonToSlice", pid, sid)
                self._member(sid, pid)
                self._join(sid, self.rng.sample(node_ids, min(s.nodes_per_slice,
                                                              len(node_ids))))
                for t in range(s.tags_per_slice):
                    self._add_tag(sid, self.tagnames[t], f"v{t}", None)
                # a sliver tag on every node of the slice (a per-node override)
                for nid in sorted(x.slices[sid]["node_ids"]):
                    self._add_tag(sid, self.tagnames[-1], f"sliver{nid}", nid)

    def update(self) -> None:
        a, x = self.call, self.x
        for site_id, site in x.sites.items():
            site["name"] = site["name"] + " (updated)"
            a("UpdateSite", site_id, {"name": site["name"], "latitude": 45.5,
                                      "longitude": -73.25})
            site["latitude"], site["longitude"] = 45.5, -73.25
        for pid, p in x.persons.items():
            p["first_name"] = p["first_name"] + "u"
            a("UpdatePerson", pid, {"first_name": p["first_name"]})
        for nid, n in x.nodes.items():
            n["model"] = "stress-2"
            a("UpdateNode", nid, {"model": "stress-2"})
        for sid, sl in x.slices.items():
            sl["description"] = sl["description"] + " (updated)"
            sl["max_nodes"] = 50
            a("UpdateSlice", sid, {"description": sl["description"], "max_nodes": 50})
        for tid, t in x.slice_tags.items():
            t["value"] = t["value"] + "u"
            a("UpdateSliceTag", tid, t["value"])

    def churn(self) -> None:
        """Every slice leaves some nodes and comes back: its sliver tags must stay."""
        a, x = self.call, self.x
        all_nodes = sorted(x.nodes)
        for sid, sl in x.slices.items():
            current = sorted(sl["node_ids"])
            if not current:
                continue
            gone = current[: max(1, len(current) // 2)]
            a("DeleteSliceFromNodes", sid, gone)
            self._leave(sid, gone)
            # UpdateSlice(nodes=...) drops the rest and adds another node
            others = [n for n in all_nodes if n not in current]
            wanted = ([self.rng.choice(others)] if others else [])
            a("UpdateSlice", sid, {"nodes": wanted})
            self._leave(sid, [n for n in sl["node_ids"] if n not in wanted])
            self._join(sid, wanted, call=False)
            a("AddSliceToNodes", sid, current)     # back on every node it had
            self._join(sid, current, call=False)
            for tid in sorted(sl["tag_ids"]):       # sliver tags of nodes it left too
                t = x.slice_tags[tid]
                t["value"] = t["value"] + "c"
                a("UpdateSliceTag", tid, t["value"])

    def delete(self) -> None:
        a, x = self.call, self.x
        for tid in sorted(x.slice_tags)[::2]:
            a("DeleteSliceTag", tid)
            x.slices[x.slice_tags[tid]["slice_id"]]["tag_ids"].discard(tid)
            del x.slice_tags[tid]
        self.deleted: dict[str, list[int]] = {"slices": sorted(x.slices),
                                              "nodes": sorted(x.nodes),
                                              "keys": sorted(x.keys),
                                              "persons": sorted(x.persons),
                                              "sites": sorted(x.sites)}
        for sid in sorted(x.slices):
            a("DeleteSlice", sid)
        for nid in sorted(x.nodes):
            a("DeleteNode", nid)
        for kid in sorted(x.keys):
            a("DeleteKey", kid)
        for pid in sorted(x.persons):
            a("DeletePerson", pid)
        for site_id in sorted(x.sites):
            a("DeleteSite", site_id)
        x.slices.clear()
        x.slice_tags.clear()
        x.nodes.clear()
        x.keys.clear()
        x.persons.clear()
        x.sites.clear()

    # -- bookkeeping --------------------------------------------------------------
    def _member(self, sid: int, pid: int) -> None:
        self.x.slices[sid]["person_ids"].add(pid)
        self.x.persons[pid]["slice_ids"].add(sid)

    def _join(self, sid: int, nids: list[int], call: bool = True) -> None:
        if call and nids:
            self.call("AddSliceToNodes", sid, nids)
        for nid in nids:
            self.x.slices[sid]["node_ids"].add(nid)
            self.x.nodes[nid]["slice_ids"].add(sid)

    def _leave(self, sid: int, nids: list[int]) -> None:
        for nid in nids:
            self.x.slices[sid]["node_ids"].discard(nid)
            self.x.nodes[nid]["slice_ids"].discard(sid)

    def _add_tag(self, sid: int, tagname: str, value: str, nid: int | None) -> None:
        args: list[Any] = [sid, tagname, value] + ([nid] if nid is not None else [])
        tid = self.call("AddSliceTag", *args)
        self.x.slice_tags[tid] = {"slice_id": sid, "tagname": tagname, "value": value,
                                  "node_id": nid}
        self.x.slices[sid]["tag_ids"].add(tid)

    # -- checks -------------------------------------------------------------------
    def _get(self, method: str, ids: list[int], fields: list[str]) -> dict[int, dict]:
        if not ids:
            return {}
        pk = fields[0]
        rows = getattr(self.api, method)(self.admin, ids, fields)
        return {r[pk]: r for r in rows}

    def _compare(self, phase: str, what: str, expected: dict[int, dict[str, Any]],
                 got: dict[int, dict[str, Any]], fields: list[str]) -> None:
        if set(got) != set(expected):
            raise Mismatch(f"{phase}: {what}: ids differ: missing "
                           f"{sorted(set(expected) - set(got))[:10]}, extra "
                           f"{sorted(set(got) - set(expected))[:10]}")
        for oid, exp in expected.items():
            row = got[oid]
            for f in fields:
                want, have = exp[f], row[f]
                if isinstance(want, set):
                    have = set(have)
                if want != have:
                    raise Mismatch(f"{phase}: {what} {oid}: {f} is {have!r}, "
                                   f"expected {want!r}")

    def check(self, phase: str) -> None:
        x = self.x
        if phase == "delete":
            for method, pk in (("GetSlices", "slice_id"), ("GetNodes", "node_id"),
                               ("GetKeys", "key_id"), ("GetPersons", "person_id"),
                               ("GetSites", "site_id")):
                ids = self.deleted[method[3:].lower()]
                left = self._get(method, ids, [pk])
                if left:
                    raise Mismatch(f"{phase}: {method} still returns {sorted(left)[:10]}")
            return
        site_f = ["name", "abbreviated_name", "login_base", "max_slices", "person_ids",
                  "node_ids", "slice_ids"] + (["latitude", "longitude"]
                                              if phase != "add" else [])
        self._compare(phase, "site", x.sites,
                      self._get("GetSites", sorted(x.sites), ["site_id"] + site_f), site_f)
        person_f = ["first_name", "last_name", "email", "enabled", "site_ids", "key_ids",
                    "slice_ids"]
        self._compare(phase, "person", x.persons,
                      self._get("GetPersons", sorted(x.persons), ["person_id"] + person_f),
                      person_f)
        key_f = ["key", "person_id"]
        self._compare(phase, "key", x.keys,
                      self._get("GetKeys", sorted(x.keys), ["key_id"] + key_f), key_f)
        node_f = ["hostname", "site_id", "model", "slice_ids"]
        self._compare(phase, "node", x.nodes,
                      self._get("GetNodes", sorted(x.nodes), ["node_id"] + node_f), node_f)
        slice_f = ["name", "url", "description", "max_nodes", "site_id", "node_ids",
                   "person_ids"]
        got = self._get("GetSlices", sorted(x.slices), ["slice_id", "slice_tag_ids"] + slice_f)
        self._compare(phase, "slice", x.slices, got, slice_f)
        for sid, sl in x.slices.items():
            missing = sl["tag_ids"] - set(got[sid]["slice_tag_ids"])
            if missing:
                raise Mismatch(f"{phase}: slice {sid} lost its tags {sorted(missing)}")
        tag_f = ["slice_id", "tagname", "value", "node_id"]
        self._compare(phase, "slice tag", x.slice_tags,
                      self._get("GetSliceTags", sorted(x.slice_tags),
                                ["slice_tag_id"] + tag_f), tag_f)
