"""AuthCheck and sessions (spec 2.7)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCAPIError, PLCInvalidArgument
from plc.filters import FilterParam
from plc.method import ALL_ROLES, api_method
from plc.methods._util import new_session_id
from plc.model import Person, Session
from plc.params import Mixed, Parameter

if TYPE_CHECKING:
    from plc.api import Call

DAY = 24 * 3600


@api_method(roles=ALL_ROLES, accepts=[Auth()], returns=Parameter(int, "1 if successful"))
def AuthCheck(call: Call, auth: dict) -> int:
    """Returns 1 if the user or node authenticated successfully, faults otherwise."""
    return 1


@api_method(roles=ALL_ROLES, accepts=[Auth()], returns=Parameter(int, "1 if successful"))
def BootCheckAuthentication(call: Call, auth: dict) -> int:
    """Deprecated, see AuthCheck."""
    return 1


def _purge_expired(call: Call) -> None:
    expired = "SELECT session_id FROM sessions WHERE expires IS NOT NULL AND expires < ?"
    call.conn.execute(f"DELETE FROM person_session WHERE session_id IN ({expired})", [call.now])
    call.conn.execute("DELETE FROM sessions WHERE expires IS NOT NULL AND expires < ?",
                      [call.now])


def create_person_session(call: Call, person_id: int, lifetime: int) -> str:
    _purge_expired(call)
    sid = new_session_id()
    call.insert("sessions", {"session_id": sid, "expires": call.now + lifetime})
    call.insert("person_session", {"person_id": person_id, "session_id": sid})
    return sid


def create_node_session(call: Call, node_id: int) -> str:
    """A never-expiring node session; the node's previous link is dropped (spec 2.7)."""
    _purge_expired(call)
    call.delete("node_session", {"node_id": node_id})
    sid = new_session_id()
    call.insert("sessions", {"session_id": sid, "expires": None})
    call.insert("node_session", {"node_id": node_id, "session_id": sid})
    return sid


@api_method(roles=ALL_ROLES, accepts=[Auth(), Parameter(int, "Requested session lifetime in "
                                                        "seconds", nullok=True)],
            writes=True, returns=Parameter(str, "Session key"))
def GetSession(call: Call, auth: dict, expires: int | None = None) -> str:
    """Returns a new session key if a user or node authenticated successfully."""
    if "session" in auth and auth.get("AuthMethod") == "session":
        return auth["session"]
    if call.caller_kind == "node":
        return create_node_session(call, call.caller_ident)
    lifetime = DAY if expires is None else expires
    if lifetime <= 0:
        raise PLCInvalidArgument("session lifetime must be positive", "expires")
    return create_person_session(call, call.caller_ident, lifetime)


@api_method(roles=["admin"], accepts=[Auth(), Mixed(Person.fields["person_id"].param,
                                                    Person.fields["email"].param)],
            returns=Parameter(str, "Session key"))
def AddSession(call: Call, auth: dict, person_id_or_email: int | str) -> str:
    """Creates and returns a new session key for the specified user (admin only)."""
    person = call.one(Person, person_id_or_email, ["person_id", "peer_id"], what="person")
    if person["peer_id"] is not None:
        raise PLCInvalidArgument("Not a local account")
    return create_person_session(call, person["person_id"], DAY)


@api_method(roles=ALL_ROLES, accepts=[Auth(only=("session",))],
            returns=Parameter(int, "1 if successful"))
def DeleteSession(call: Call, auth: dict) -> int:
    """Invalidates the current session."""
    sid = auth["session"]
    rows = call.conn.query("SELECT session_id FROM sessions WHERE session_id = ? "
                           "AND expires IS NOT NULL", [sid])
    if not rows:
        raise PLCAPIError("No such session")  # [quirk] node sessions are never found
    for table in ("person_session", "node_session", "sessions"):
        call.delete(table, {"session_id": sid})
    return 1


@api_method(roles=["admin"], accepts=[Auth(), FilterParam(Session)],
            returns=Parameter([dict], "List of sessions"))
def GetSessions(call: Call, auth: dict, session_filter: Any = None) -> list:
    """Returns an array of structs containing details about live person sessions."""
    where = "o.expires > ?"
    params: list[int | str] = [call.now]
    if isinstance(session_filter, list):
        pids = [v for v in session_filter if isinstance(v, int)]
        sids = [v for v in session_filter if isinstance(v, str)]
        where += (" AND (o.session_id IN (SELECT session_id FROM person_session WHERE "
                  f"person_id IN ({', '.join('?' * len(pids)) or 'NULL'})) OR o.session_id "
                  f"IN ({', '.join('?' * len(sids)) or 'NULL'}))")
        params += [*pids, *sids]
        session_filter = None
    return call.get(Session, session_filter, None, where=where, params=params)
