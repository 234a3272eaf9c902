"""Authentication of the first argument of every non-system call (spec section 2).

``Auth()`` is the parameter type of the auth struct (``Method.auth``): its
``authenticate`` is a step of its own, after the argument count and before any other
argument is type-checked (as legacy PLCAPI did, spec 1.2), and sets ``call.caller``, ``call.caller_kind`` ("person", "node" or None), ``call.roles``
and ``call.auth_type``. Unknown keys in the struct are ignored.
"""

from __future__ import annotations

import hashlib
import hmac as hmac_mod
from typing import TYPE_CHECKING, Any

from plc.faults import PLCAuthenticationFailure, PLCInvalidArgument, PLCPermissionDenied
from plc.params import _value_type
from plc.passwords import verify_password
from plc.throttle import Busy

if TYPE_CHECKING:
    from plc.api import Call

AUTH_METHODS = ("session", "password", "capability", "gpg", "hmac", "hmac_dummybox",
                "anonymous")
_REQUIRED = {
    "password": (("Username", str), ("AuthString", str)),
    "capability": (("Username", str), ("AuthString", str)),
    "session": (("session", str),),
    "hmac": (("node_id", int), ("value", str)),
    "hmac_dummybox": (("node_id", int), ("value", str)),
    "gpg": (("name", str), ("signature", str)),
    "anonymous": (),
}


def hmac_message(args: list[Any] | tuple[Any, ...]) -> str:
    """The string a node signs: sorted flattened values of the arguments (spec 2.4)."""
    out: list[str] = []
    stack: list[Any] = [list(args)]
    while stack:
        v = stack.pop()
        if isinstance(v, list | tuple):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        else:
            out.append(str(v))
    out.sort()
    return "[" + "".join(out) + "]"


def hmac_value(key: str, args: list[Any] | tuple[Any, ...]) -> str:
    return hmac_mod.new(key.encode("utf-8"), hmac_message(args).encode("utf-8"),
                        hashlib.sha1).hexdigest()


class Auth:
    """The auth struct; ``only`` restricts the accepted AuthMethods.

    ``Auth(only=("hmac",), strict_hmac=True)`` is BootAuth: the AuthMethod value is not
    looked at, any struct is checked as hmac (BootGetNodeDetails).
    """

    doc = "Authentication structure"
    nullok = False

    def __init__(self, only: tuple[str, ...] | None = None, force_hmac: bool = False) -> None:
        self.only = only
        self.force_hmac = force_hmac

    def xmlrpc_type(self) -> str:
        return "struct"

    def authenticate(self, value: Any, name: str, call: Call) -> None:
        """Authenticate the call with the auth struct ``value`` (argument ``name``):
        102 for a malformed struct, 103 for bad credentials, else ``call``'s caller."""
        if not isinstance(value, dict):
            raise PLCInvalidArgument(f"expected struct, got {_value_type(value)}", name)
        method = "hmac" if self.force_hmac else value.get("AuthMethod")
        allowed = self.only or AUTH_METHODS
        if method not in allowed:
            raise PLCInvalidArgument(
                "must be " + ", ".join(f"'{m}'" for m in allowed), "AuthMethod")
        for key, typ in _REQUIRED[method]:
            if key not in value:
                raise PLCInvalidArgument(f"Must specify {key} for AuthMethod '{method}'")
            v = value[key]
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise PLCInvalidArgument(
                    f"expected {'int' if typ is int else 'string'}, got {_value_type(v)}", key)
        call.auth_type = "hmac" if method == "hmac_dummybox" else method
        if method in ("password", "capability"):
            _password(call, value)
        elif method == "session":
            _session(call, value)
        elif method in ("hmac", "hmac_dummybox"):
            _hmac(call, value)
        elif method == "anonymous":
            if "anonymous" not in call.method.roles:
                raise PLCAuthenticationFailure(
                    "AnonymousAuth: method cannot be called anonymously")
            call.set_caller(None, None, ["anonymous"])
        else:
            raise PLCAuthenticationFailure("GPGAuth: GPG authentication is not supported")


def _person_roles(call: Call, person_id: int) -> list[str]:
    return [r["name"] for r in call.conn.query(
        "SELECT r.name FROM person_role x JOIN roles r ON r.role_id = x.role_id "
        "WHERE x.person_id = ? ORDER BY r.role_id", [person_id])]


def _role_mismatch(call: Call, who: str, email: str, roles: list[str]) -> str:
    # legacy text: "method X has roles [a,b] -- caller EMAIL has roles [c]"
    return (f"{who}: missing role, method {call.method.name} has roles "
            f"[{','.join(call.method.roles)}] -- caller {email} has roles [{','.join(roles)}]")


def _password(call: Call, auth: dict[str, Any]) -> None:
    username = auth["Username"]
    source = call.source[0] if call.source else None
    if call.api.password_failures.blocked(source):
        # no hashing, no lookup: a flood of guesses costs nothing (issue 9)
        raise PLCAuthenticationFailure("PasswordAuth: too many failed password checks "
                                       "from this address; retry in a minute")
    rows = call.conn.query(
        "SELECT person_id, email, password FROM persons WHERE email = ? AND enabled = 1 "
        "AND peer_id IS NULL AND deleted = 0", [username.lower()])
    if len(rows) != 1:
        call.api.password_failures.failed(source)
        raise PLCAuthenticationFailure("PasswordAuth: No such account")
    person = rows[0]
    cfg = call.api.config
    if username.lower() == cfg.api_maintenance_user.lower():
        sources = cfg.api_maintenance_sources.split()
        # an empty list admits nobody (legacy); only an unknown source skips the check
        if call.source and call.source[0] not in sources:
            raise PLCAuthenticationFailure("PasswordAuth: Not allowed to login to "
                                           "maintenance account from this address")
        expected = cfg.api_maintenance_password
        if not expected or not hmac_mod.compare_digest(
                expected.encode("utf-8", "surrogatepass"),
                auth["AuthString"].encode("utf-8", "surrogatepass")):
            call.api.password_failures.failed(source)
            raise PLCAuthenticationFailure("PasswordAuth: Maintenance account password "
                                           "verification failed")
    else:
        try:
            ok = verify_password(auth["AuthString"], person["password"], call.api.hash_gate)
        except Busy:
            raise PLCAuthenticationFailure("PasswordAuth: too many password checks at "
                                           "once; retry later") from None
        if not ok:
            call.api.password_failures.failed(source)
            raise PLCAuthenticationFailure("PasswordAuth: Password verification failed")
    roles = _person_roles(call, person["person_id"])
    if not set(roles) & set(call.method.roles):
        raise PLCAuthenticationFailure(_role_mismatch(call, "PasswordAuth", person["email"],
                                                      roles))
    call.set_caller("person", person["person_id"], roles)


def _session(call: Call, auth: dict[str, Any]) -> None:
    sid = auth["session"]
    try:
        _session_check(call, sid)
    except PLCAuthenticationFailure:
        # a failed session is deleted (spec 2.3); this is kept even though the call fails
        call.after_rollback.append(lambda conn: [
            conn.delete(t, {"session_id": sid})
            for t in ("person_session", "node_session", "sessions")])
        raise


def _session_check(call: Call, sid: str) -> None:
    # one statement: a session, its node or person, and the person's roles
    rows = call.conn.query(
        "SELECT s.expires, n.node_id, n.deleted AS node_deleted, n.peer_id AS node_peer, "
        "p.person_id, p.email, p.enabled, p.deleted, p.peer_id, (SELECT group_concat(r.name, ',') "
        "FROM (SELECT r.name FROM person_role pr JOIN roles r ON r.role_id = pr.role_id "
        "WHERE pr.person_id = p.person_id ORDER BY r.role_id) r) AS roles "
        "FROM sessions s LEFT JOIN node_session ns ON ns.session_id = s.session_id "
        "LEFT JOIN nodes n ON n.node_id = ns.node_id "
        "LEFT JOIN person_session ps ON ps.session_id = s.session_id "
        "LEFT JOIN persons p ON p.person_id = ps.person_id WHERE s.session_id = ?", [sid])
    if not rows:
        raise PLCAuthenticationFailure("SessionAuth: No such session")
    r = rows[0]
    if r["node_id"] is not None and not r["node_deleted"] and r["node_peer"] is None:
        if "node" not in call.method.roles:
            raise PLCPermissionDenied("SessionAuth: Not allowed to call method, "
                                      "missing 'node' role")
        call.set_caller("node", r["node_id"], ["node"])
        return
    if r["person_id"] is not None and r["expires"] is not None and r["expires"] > call.now:
        if not r["enabled"] or r["deleted"] or r["peer_id"] is not None:
            raise PLCAuthenticationFailure("SessionAuth: Account not enabled or deleted")
        roles = r["roles"].split(",") if r["roles"] else []
        if not set(roles) & set(call.method.roles):
            raise PLCPermissionDenied(_role_mismatch(call, "SessionAuth", r["email"], roles))
        call.set_caller("person", r["person_id"], roles)
        return
    raise PLCAuthenticationFailure("SessionAuth: Invalid session")


def _hmac(call: Call, auth: dict[str, Any]) -> None:
    if "node" not in call.method.roles:
        raise PLCAuthenticationFailure("BootAuth: Not allowed to call method, "
                                       "missing 'node' role")
    rows = call.conn.query(
        "SELECT node_id, key FROM nodes WHERE node_id = ? AND deleted = 0 AND peer_id IS NULL",
        [auth["node_id"]])
    if not rows:
        raise PLCAuthenticationFailure("BootAuth: No such node")
    key = rows[0]["key"]
    if not key:
        raise PLCAuthenticationFailure("BootAuth: No node key")
    expected = hmac_value(key, call.args[1:])
    if not hmac_mod.compare_digest(expected, auth["value"].encode("ascii", "replace").decode()):
        raise PLCAuthenticationFailure("BootAuth: Call could not be authenticated")
    call.set_caller("node", rows[0]["node_id"], ["node"])
