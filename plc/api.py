"""The dispatcher: one call = lookup, argument count, type checks (auth first), roles,
the method, its event, all in one transaction on the caller thread's connection.

``API.run(conn, name, params, source)`` returns the result or raises a PLCFault
(already prefixed ``"<caller>: <Method>: "``); any other exception is an internal
error (``InternalError``, fault 111 at the server) and changes nothing.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from plc import query
from plc.config import Config
from plc.faultlog import FaultLog
from plc.faults import (
    PLCAPIError,
    PLCDBError,
    PLCFault,
    PLCInvalidAPIMethod,
    PLCInvalidArgument,
    PLCInvalidArgumentCount,
    PLCPermissionDenied,
)
from plc.method import METHODS, Method
from plc.model import ObjClass
from plc.params import MAX_DEPTH, check, depth
from plc.store.base import Connection, DBError, RetryError, Store
from plc.throttle import Failures, HashGate

log = logging.getLogger("plc.api")

#: runs of a call whose transaction keeps losing serialisation races (PostgreSQL)
RETRIES = 30

REDACTED = "Removed by API"
SECRET_KEYS = ("AuthString", "session", "password")
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class InternalError(Exception):
    """A bug or unexpected condition; the client gets fault 111 and no details."""


def redact(value: Any) -> Any:
    """A copy with the secrets of any struct replaced (spec 10)."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_KEYS else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def clean_text(text: str) -> str:
    """``text`` with the characters XML cannot carry replaced by '?' (spec 1.1)."""
    # isprintable() is a fast C check that rules out every character the regex looks for
    if text.isprintable() or not _ILLEGAL_XML.search(text):
        return text
    return _ILLEGAL_XML.sub("?", text)


class Call:
    """What a method sees: the connection, the caller and helpers (see docs/dev/plc-internals.md)."""

    def __init__(self, api: API, conn: Connection, method: Method, args: Sequence[Any],
                 source: tuple[str, int] | None, parent: Call | None = None) -> None:
        self.api = api
        self.conn = conn
        self.method = method
        self.args = list(args)
        self.source = source
        self.parent = parent
        self.now = int(time.time())
        self.caller: dict[str, Any] | None = None
        self.caller_kind: str | None = None
        self.caller_id: int | None = None
        self.roles: list[str] = []
        self.auth_type: str | None = None
        self.auth: dict[str, Any] | None = None
        self.message: str | None = None
        self.event_objects: dict[str, list[int]] = {}
        self.after_rollback: list[Callable[[Connection], Any]] = (
            parent.after_rollback if parent else [])

    # -- caller ---------------------------------------------------------------------
    def set_caller(self, kind: str | None, ident: int | None, roles: list[str]) -> None:
        self.caller_kind, self.caller_id, self.roles = kind, ident, roles
        if kind == "person":
            self.caller = {"person_id": ident, "roles": roles}
        elif kind == "node":
            self.caller = {"node_id": ident}
        else:
            self.caller = None

    @property
    def person_id(self) -> int | None:
        return self.caller_id if self.caller_kind == "person" else None

    @property
    def node_id(self) -> int | None:
        return self.caller_id if self.caller_kind == "node" else None

    @property
    def caller_ident(self) -> int:
        """The id of the authenticated person or node (for a method whose roles admit
        no anonymous caller: authentication has set it before the method runs)."""
        if self.caller_id is None:
            raise PLCAPIError(f"method {self.method.name} has no authenticated caller")
        return self.caller_id

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles and self.caller_kind == "person"

    def has_role(self, *roles: str) -> bool:
        return bool(set(roles) & set(self.roles))

    def caller_site_ids(self) -> list[int]:
        """Sites of the calling person (primary first), or the calling node's site."""
        if self.caller_kind == "person":
            return [r["site_id"] for r in self.conn.query(
                "SELECT site_id FROM person_site WHERE person_id = ? "
                "ORDER BY is_primary DESC, site_id", [self.caller_id])]
        if self.caller_kind == "node":
            return [r["site_id"] for r in self.conn.query(
                "SELECT site_id FROM nodes WHERE node_id = ?", [self.caller_id])]
        return []

    @property
    def config(self) -> Config:
        return self.api.config

    # -- store ------------------------------------------------------------------------
    def get(self, cls: ObjClass, flt: Any = None, return_fields: Sequence[str] | None = None,
            **kw: Any) -> list[dict[str, Any]]:
        return query.get(self.conn, cls, flt, return_fields, **kw)

    def one(self, cls: ObjClass, id_or_name: Any, return_fields: Sequence[str] | None = None,
            what: str | None = None) -> dict[str, Any]:
        return query.get_one(self.conn, cls, id_or_name, return_fields, what)

    def insert(self, table: str, values: dict[str, Any]) -> int:
        return self.conn.insert(table, values)

    def update(self, table: str, where: dict[str, Any], values: dict[str, Any]) -> int:
        return self.conn.update(table, where, values)

    def delete(self, table: str, where: dict[str, Any]) -> int:
        return self.conn.delete(table, where)

    # -- events -----------------------------------------------------------------------
    def log(self, message: str, **objects: int | list[int]) -> None:
        """Record an event for this call (written when it succeeds), e.g.
        ``call.log(f"Site {site_id} added", Site=site_id)``."""
        self.message = message
        for kind, ids in objects.items():
            self.event_objects.setdefault(kind, []).extend(
                ids if isinstance(ids, list) else [ids])

    # -- nested calls -----------------------------------------------------------------
    def invoke(self, name: str, *args: Any) -> Any:
        """Call another method with this call's auth, in the same transaction."""
        return self.api.invoke(self, name, args)

    def require(self, ok: bool, text: str) -> None:
        """Fault 108 unless ``ok``."""
        if not ok:
            raise PLCPermissionDenied(text)


#: The longest piece of a caller's input a log line carries.
LOG_VALUE_MAX = 200


def log_text(value: Any, limit: int = LOG_VALUE_MAX) -> str:
    """A caller's text for one log line: control characters escaped, cut at `limit`
    characters with the length said (a huge value never floods the log)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


def _caller_text(params: Sequence[Any]) -> str:
    """Who called, from the auth struct as sent (the fault may be that it is wrong)."""
    auth = params[0] if params and isinstance(params[0], dict) else None
    if not auth:
        return "anonymous"
    method = auth.get("AuthMethod")
    for key in ("Username", "node_id", "name"):   # never a password, session or key
        if key in auth:
            return log_text(f"{method} {auth[key]}", 80)
    return log_text(f"{method}", 80)


def _address_text(source: tuple[str, int] | None) -> str:
    return f"{source[0]}:{source[1]}" if source else "(no address)"


class API:
    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config
        self.started = int(time.time())
        self.hash_gate = HashGate(config.api_password_checks)
        self.password_failures = Failures(config.api_password_failures)
        self.fault_log = FaultLog(log)
        self.retries = 0  # transactions run again after a serialisation failure
        import plc.methods  # noqa: F401  (registers every method module)
        self.methods = METHODS

    def lookup(self, name: str) -> Method:
        m = self.methods.get(name) if isinstance(name, str) else None
        if m is None:
            raise PLCInvalidAPIMethod(str(name))
        return m

    def run(self, conn: Connection, name: str, params: Sequence[Any],
            source: tuple[str, int] | None = None) -> Any:
        """One top-level call in its own transaction (system.* run without one). A
        transaction that lost a race with another front end's (PostgreSQL's
        serialisation failure: nothing of it was committed) is run again from the
        start, up to RETRIES times with a short random pause; clients never see it.
        Every fault is logged with its caller, address and message (issue 15)."""
        try:
            for attempt in range(RETRIES):
                try:
                    return self._run_once(conn, name, params, source)
                except RetryError as e:
                    conn.rollback()
                    self.retries += 1  # (a lost increment under threads is harmless)
                    log.debug("%s: serialisation failure, attempt %d: %s", name, attempt + 1, e)
                    time.sleep(random.uniform(0, 0.002 * (2 ** min(attempt, 6))))
            return self._run_once(conn, name, params, source, last=True)
        except PLCFault as fault:
            text = fault.faultString
            self.fault_log.fault(source[0] if source else "", _address_text(source),
                                 fault.faultCode, lambda: _caller_text(params),
                                 lambda: log_text(text))
            raise

    def _run_once(self, conn: Connection, name: str, params: Sequence[Any],
                  source: tuple[str, int] | None, last: bool = False) -> Any:
        m = self.lookup(name)
        if depth(list(params)) > MAX_DEPTH:
            raise PLCInvalidArgument(f"arguments nested deeper than {MAX_DEPTH} levels")
        if not m.transaction:
            call = Call(self, conn, m, params, source)
            return self._execute(call)
        started = time.monotonic()
        call = Call(self, conn, m, params, source)
        # A read-only call runs its statements in autocommit mode (there is nothing to
        # roll back, and BEGIN/COMMIT would double its round trips to SQLite); every
        # call that may write runs in one transaction.
        transactional = m.writes or self.config.api_debug
        if transactional:
            conn.begin(write=True, serializable=m.serializable)
        try:
            result = self._execute(call)
            if call.message is not None or (self.config.api_debug and m.name != "ReportRunlevel"):
                self._record(call, 0, call.message, time.monotonic() - started)
            conn.commit()
            return result
        except PLCFault as fault:
            conn.rollback()
            self._after_rollback(conn, call)
            if self.config.api_debug and m.name != "ReportRunlevel":
                self._record_apart(conn, call, fault, time.monotonic() - started)
            raise
        except DBError as e:
            conn.rollback()
            if isinstance(e, RetryError) and not last:
                raise
            ref = uuid.uuid4()
            log.error("database error in %s (reference %s): %s", m.name, ref, e)
            db_fault = PLCDBError(f"Please contact {self.config.plc_name} Support "
                                  f"<{self.config.mail_support_address}> and reference {ref}")
            db_fault.faultString = self._prefix(call) + db_fault.faultString
            raise db_fault from None
        except Exception as e:
            conn.rollback()
            log.exception("internal error in %s", m.name)
            raise InternalError(m.name) from e

    def invoke(self, parent: Call, name: str, args: Sequence[Any]) -> Any:
        m = self.lookup(name)
        call = Call(self, parent.conn, m, [parent.auth, *args], parent.source, parent)
        return self._execute(call)

    # -- internals ------------------------------------------------------------------
    @staticmethod
    def _prefix(call: Call) -> str:
        who = {"person": "person_id", "node": "node_id"}.get(call.caller_kind or "")
        caller = f"{who} {call.caller_id}" if who else ""
        return f"{caller}: {call.method.name}: "

    def _execute(self, call: Call) -> Any:
        m = call.method
        try:
            n = len(call.args)
            if not m.min_args <= n <= m.max_args:
                raise PLCInvalidArgumentCount(n, m.min_args, m.max_args)
            first = 0
            if m.auth is not None:  # legacy order: count, authentication, then types
                call.auth = call.args[0]
                m.auth.authenticate(call.args[0], m.arg_names[0], call)
                first = 1
            for i in range(first, n):
                check(m.accepts[i], call.args[i], m.arg_names[i], call)
            if m.roles and call.caller_kind is None and call.roles != ["anonymous"]:
                raise PLCAPIError(f"method {m.name} did not authenticate its caller")
            return m.func(call, *call.args)
        except PLCFault as fault:
            if m.transaction:
                fault.faultString = self._prefix(call) + fault.faultString
            raise

    def _after_rollback(self, conn: Connection, call: Call) -> None:
        if not call.after_rollback:
            return
        try:
            conn.begin(write=True)
            for hook in call.after_rollback:
                hook(conn)
            conn.commit()
        except DBError:
            conn.rollback()

    def _record(self, call: Call, fault_code: int, message: str | None, runtime: float) -> None:
        args = [call.method.name] + [redact(a) for a in call.args]
        text = f"{call.method.name}{tuple(args[1:])!r}"
        event_id = call.conn.insert("events", {
            "person_id": call.person_id, "node_id": call.node_id,
            "auth_type": call.auth_type, "fault_code": fault_code,
            "call_name": call.method.name, "call": text, "message": message,
            "runtime": round(runtime, 6), "time": call.now})
        for kind, ids in call.event_objects.items():
            for object_id in dict.fromkeys(ids):
                call.conn.insert("event_object", {"event_id": event_id, "object_id": object_id,
                                                  "object_type": kind})

    def _record_apart(self, conn: Connection, call: Call, fault: PLCFault,
                      runtime: float) -> None:
        try:
            conn.begin(write=True)
            call.event_objects = {}
            self._record(call, fault.faultCode, fault.faultString, runtime)
            conn.commit()
        except DBError:
            conn.rollback()
