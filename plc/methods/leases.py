"""Leases of reservable nodes (spec 4.4, 5.12, 6.3)."""

from __future__ import annotations

import calendar
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCFault, PLCInvalidArgument
from plc.filters import FilterParam, ReturnFields
from plc.method import ALL_ROLES, api_method
from plc.methods._util import id_or_name
from plc.methods.slices import slice_for_update
from plc.model import Lease, Node, Slice
from plc.params import Mixed, Parameter
from plc.store.base import DBError

if TYPE_CHECKING:
    from plc.api import Call

TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S UTC", "%Y-%m-%dT%H:%M:%S",
                "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M UTC")
TIME = Mixed(Parameter(int, "seconds since the epoch"),
             Parameter(str, "YYYY-MM-DD HH:MM[:SS] (UTC)"))


def to_epoch(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        for fmt in TIME_FORMATS:
            try:
                return calendar.timegm(time.strptime(value.strip(), fmt))
            except ValueError:
                continue
    raise PLCInvalidArgument(f"cannot parse time {value!r}", name)


def round_up(t: int, g: int) -> int:
    return -(-t // g) * g


def round_down(t: int, g: int) -> int:
    return (t // g) * g


class LeaseFilterParam(FilterParam):
    """Lease filters also take alive / clip / day (spec 4.4)."""

    EXTRA = ("alive", "clip", "day")

    def check(self, value: Any, name: str, ctx: Any = None) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            return
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k.lstrip("~") not in self.EXTRA}
        super().check(value, name, ctx)

    def xmlrpc_types(self) -> list[str]:
        return ["int", "array", "struct"]


def _interval(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise PLCInvalidArgument(f"{key} takes a time or a (from, until) pair")
        return to_epoch(value[0], key), to_epoch(value[1], key)
    t = to_epoch(value, key)
    return t, t


def lease_extras(flt: dict[str, Any], now: int) -> tuple[dict[str, Any], str, list[Any]]:
    """Split alive/clip/day out of a struct filter into SQL."""
    rest = dict(flt)
    conds: list[str] = []
    params: list[Any] = []
    keys = [k for k in flt if k.lstrip("~") in LeaseFilterParam.EXTRA]
    if any(k.lstrip("~") == "day" for k in keys) and any(k.lstrip("~") == "clip" for k in keys):
        raise PLCInvalidArgument("day and clip cannot be combined")
    for key in keys:
        value = rest.pop(key)
        negate = key.startswith("~")
        kind = key.lstrip("~")
        if kind == "day":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PLCInvalidArgument("day must be a non-negative int", "day")
            today = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0,
                                                        microsecond=0).timestamp()
            kind, value = "clip", ((int(today), int(today) + value * 86400) if value
                                   else int(today))
        if kind == "alive":
            t1, t2 = _interval(value, key)
            cond = "(o.t_from <= ? AND o.t_until >= ?)"
            params += [t2, t1]
        else:  # clip
            if isinstance(value, list | tuple):
                t1, t2 = _interval(value, key)
                cond = "(o.t_until >= ? AND o.t_from <= ?)"
                params += [t1, t2]
            else:
                cond = "o.t_until >= ?"
                params.append(to_epoch(value, key))
        conds.append(f"NOT {cond}" if negate else cond)
    return rest, " AND ".join(conds), params


@api_method(roles=["admin", "pi", "user", "node", "anonymous"],
            accepts=[Auth(), LeaseFilterParam(Lease, scalars=True), ReturnFields()],
            returns=Parameter([dict], "List of leases"))
def GetLeases(call: Call, auth: dict, lease_filter: Any = None,
              return_fields: list | None = None) -> list:
    """Returns an array of structs containing details about leases. The struct filter
    also takes alive (a time or interval the lease is active in), clip (leases ending
    after a time, or overlapping an interval) and day (0: from today, N: N days)."""
    where: str = ""
    params: list[Any] = []
    if isinstance(lease_filter, dict):
        lease_filter, where, params = lease_extras(lease_filter, call.now)
    return call.get(Lease, lease_filter, return_fields, where=where, params=params)


@api_method(roles=ALL_ROLES + ["anonymous"], accepts=[Auth()],
            returns=Parameter(int, "the granularity in seconds for the reservation system"))
def GetLeaseGranularity(call: Call, auth: dict) -> int:
    """Returns the granularity in seconds for the reservation system."""
    return call.config.reservation_granularity


_NODES = Mixed(Node.fields["node_id"].param, Node.fields["hostname"].param,
               Parameter([Mixed(Node.fields["node_id"].param, Node.fields["hostname"].param)]))


@api_method(roles=["admin", "pi", "user"],
            accepts=[Auth(), _NODES, id_or_name(Slice), TIME, TIME],
            returns=Parameter(dict, "new_ids and errors"))
def AddLeases(call: Call, auth: dict, node_id_or_hostname_list: Any,
              slice_id_or_name: int | str, t_from: int | str, t_until: int | str) -> dict:
    """Adds a new lease for each node: the slice has the node from t_from (rounded up
    to the granularity) until t_until (rounded down). Busy timeslots and foreign nodes
    are reported in errors."""
    values = node_id_or_hostname_list if isinstance(node_id_or_hostname_list, list) else \
        [node_id_or_hostname_list]
    values = [v.lower() if isinstance(v, str) else v for v in values]
    nodes = call.get(Node, values, ["node_id", "hostname", "node_type", "peer_id"])
    if len(nodes) != len(set(values)):
        raise PLCInvalidArgument("Some nodes do not exist", "nodes")
    for n in nodes:
        if n["node_type"] != "reservable":
            raise PLCInvalidArgument(f"Node {n['hostname']} is not reservable")
    s = slice_for_update(call, slice_id_or_name)
    g = call.config.reservation_granularity
    tf = round_up(to_epoch(t_from, "t_from"), g)
    tu = round_down(to_epoch(t_until, "t_until"), g)
    new_ids: list[int] = []
    errors: list[str] = []
    for n in nodes:
        if n["peer_id"] is not None:
            errors.append(f"Cannot set lease on remote node {n['node_id']}")
            continue
        try:
            new_ids.append(call.insert("leases", {"t_from": tf, "t_until": tu,
                                                  "node_id": n["node_id"],
                                                  "slice_id": s["slice_id"]}))
        except DBError:
            errors.append(f"Timeslot busy - could not create overlapping lease on node "
                          f"{n['node_id']} for slice {s['slice_id']} from {tf} until {tu}")
    if new_ids:
        call.log(f"New leases {new_ids} on nodes {[n['node_id'] for n in nodes]}",
                 Node=[n["node_id"] for n in nodes], Slice=s["slice_id"], Lease=new_ids)
    return {"new_ids": new_ids, "errors": errors}


_LEASE_IDS = Mixed(Lease.fields["lease_id"].param, Parameter([Lease.fields["lease_id"].param]))


def _leases(call: Call, lease_ids: Any) -> list[dict[str, Any]]:
    ids = lease_ids if isinstance(lease_ids, list) else [lease_ids]
    leases = call.get(Lease, ids, ["lease_id", "slice_id", "t_from", "t_until"])
    missing = set(ids) - {le["lease_id"] for le in leases}
    if missing:
        raise PLCInvalidArgument(f"No such leases {sorted(missing)}")
    return leases


@api_method(roles=["admin", "pi", "tech", "user"],
            accepts=[Auth(), _LEASE_IDS, {"t_from": TIME, "t_until": TIME,
                                          "duration": Parameter(int, "seconds")}],
            returns=Parameter(dict, "updated_ids and errors"))
def UpdateLeases(call: Call, auth: dict, lease_ids: Any, input_fields: dict) -> dict:
    """Updates the time bounds of leases: t_from and/or t_until, or one of them with a
    duration (0 keeps the current one). Per-lease failures are reported in errors."""
    keys = [k for k in ("t_from", "t_until", "duration") if k in input_fields]
    if len(keys) == 3:
        raise PLCInvalidArgument("Cannot set t_from, t_until and duration at once")
    if not keys:
        raise PLCInvalidArgument("Nothing to update: give t_from, t_until or duration")
    g = call.config.reservation_granularity
    updated: list[int] = []
    errors: list[str] = []
    for lease in _leases(call, lease_ids):
        try:
            slice_for_update(call, lease["slice_id"])
        except PLCFault as e:  # permission / missing slice: reported per lease
            errors.append(f"Lease {lease['lease_id']}: {getattr(e, 'faultString', e)}")
            continue
        tf, tu = lease["t_from"], lease["t_until"]
        duration = input_fields.get("duration") or (tu - tf)
        if "t_from" in input_fields:
            tf = round_up(to_epoch(input_fields["t_from"], "t_from"), g)
            tu = tf + duration if "t_until" not in input_fields else tu
        if "t_until" in input_fields:
            tu = round_down(to_epoch(input_fields["t_until"], "t_until"), g)
            if "t_from" not in input_fields and "duration" in input_fields:
                tf = tu - duration
        if keys == ["duration"]:
            tu = tf + duration
        try:
            call.update("leases", {"lease_id": lease["lease_id"]},
                        {"t_from": tf, "t_until": tu})
            updated.append(lease["lease_id"])
        except DBError:
            errors.append(f"Timeslot busy - could not update lease {lease['lease_id']} "
                          f"from {tf} until {tu}")
    if updated:
        call.log(f"Leases {updated} updated", Lease=updated)
    return {"updated_ids": updated, "errors": errors}


@api_method(roles=["admin", "pi", "tech", "user"], accepts=[Auth(), _LEASE_IDS],
            returns=Parameter(int, "1 if successful"))
def DeleteLeases(call: Call, auth: dict, lease_ids: Any) -> int:
    """Deletes leases. Non-admins must be members of the lease's slice or PIs of its
    site."""
    leases = _leases(call, lease_ids)
    for lease in leases:
        slice_for_update(call, lease["slice_id"])
    ids = [le["lease_id"] for le in leases]
    call.delete("leases", {"lease_id": ids})
    call.log(f"Leases {ids} deleted", Lease=ids)
    return 1


