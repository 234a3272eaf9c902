"""Declarative API methods: one definition drives dispatch, checks and introspection.

    from plc.method import api_method
    from plc.auth import Auth

    @api_method(roles=["admin", "pi"], accepts=[Auth(), Site.fields["name"].param],
                returns=Parameter(int, "1 if successful"))
    def DoSomething(call, auth, name):
        "Docstring: shown by system.methodHelp."
        ...

The function name is the method name (or ``name=``). Its Python signature gives the
argument count (arguments with defaults are optional, the auth struct counts); the
i-th entry of ``accepts`` types the i-th argument. A method with ``roles`` takes an
``Auth`` first (and only then): a call is counted (fault 101), then authenticated
(``Method.auth``), then its other arguments are type-checked (fault 102), as legacy
PLCAPI did (spec 1.2), so a caller that cannot authenticate learns nothing about them. ``writes`` (default: the name does
not start with Get/Resolve/Retrieve and is not system.*) selects a write transaction.
A write transaction is serialisable (on PostgreSQL; SQLite serialises writers anyway)
unless the method says ``serializable=False``: only for a method whose writes depend on
nothing it read (GetSlivers' ``last_contact``), which then runs READ COMMITTED, takes no
predicate locks and can neither lose nor cause a serialisation race.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plc.auth import Auth
from plc.params import Mixed, Parameter, describe, doc_of, xmlrpc_type

ALL_PERSON_ROLES = ["admin", "pi", "user", "tech"]
ALL_ROLES = ["admin", "pi", "user", "tech", "node"]


@dataclass
class Method:
    name: str
    func: Callable[..., Any]
    accepts: list[Any]
    returns: Any
    roles: list[str]
    doc: str
    writes: bool
    arg_names: list[str] = field(default_factory=list)
    min_args: int = 0
    max_args: int = 0
    transaction: bool = True   # system.* manage their own
    auth: Auth | None = None   # accepts[0] of a method with roles: authenticated first
    serializable: bool = True  # False: its writes depend on nothing it read (see above)

    def signatures(self) -> list[list[str]]:
        """[return_type, arg types...] per arg count and Mixed alternative (spec 1.3)."""
        ret = xmlrpc_type(self.returns)
        out: list[list[str]] = []
        for n in range(self.min_args, self.max_args + 1):
            combos: list[list[str]] = [[ret]]
            for spec in self.accepts[:n]:
                combos = [c + [t] for c in combos for t in _alternatives(spec)]
            out += combos
        return out

    def help(self) -> str:
        args = ", ".join(self.arg_names)
        lines = [f"{self.name}({args}) -> {xmlrpc_type(self.returns)}", "",
                 "Description:", "", "    " + (self.doc.strip() or "(undocumented)"), "",
                 "Allowed Roles:", "", "    " + (", ".join(self.roles) or "any"), "",
                 "Parameters:", ""]
        for name, spec in zip(self.arg_names, self.accepts, strict=False):
            lines += describe(spec, name, 4)
        lines += ["", "Returns:", ""] + describe(self.returns, "", 4)
        return "\n".join(lines) + "\n"


def _alternatives(spec: Any) -> list[str]:
    if hasattr(spec, "xmlrpc_types"):
        return list(spec.xmlrpc_types())
    if isinstance(spec, Mixed):
        out: list[str] = []
        for alt in spec.alternatives:
            out += [t for t in _alternatives(alt) if t not in out]
        return out
    if isinstance(spec, Parameter) and isinstance(spec.type, Mixed):
        return _alternatives(spec.type)
    return [xmlrpc_type(spec)]


METHODS: dict[str, Method] = {}


def register(m: Method) -> Method:
    if m.name in METHODS:
        raise ValueError(f"method {m.name} is defined twice")
    METHODS[m.name] = m
    return m


def api_method(*, roles: list[str], accepts: list[Any], returns: Any,
               name: str | None = None, writes: bool | None = None,
               doc: str | None = None, serializable: bool = True
               ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare and register an API method (see module docstring)."""

    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        make_method(func, roles=roles, accepts=accepts, returns=returns, name=name,
                    writes=writes, doc=doc, serializable=serializable)
        return func

    return deco


def make_method(func: Callable[..., Any], *, roles: list[str], accepts: list[Any],
                returns: Any, name: str | None = None, writes: bool | None = None,
                doc: str | None = None, transaction: bool = True,
                serializable: bool = True) -> Method:
    mname = name or func.__name__
    params = list(inspect.signature(func).parameters.values())[1:]  # skip `call`
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        raise TypeError(f"{mname}: API methods take positional arguments only")
    if len(params) != len(accepts):
        raise TypeError(f"{mname}: {len(params)} arguments but {len(accepts)} accepts entries")
    if writes is None:
        writes = not mname.startswith(("Get", "Resolve", "Retrieve", "system.", "AuthCheck",
                                       "BootCheckAuthentication"))
    auth = accepts[0] if accepts and isinstance(accepts[0], Auth) else None
    if bool(roles) != (auth is not None) or any(isinstance(a, Auth) for a in accepts[1:]):
        raise TypeError(f"{mname}: a method with roles takes an Auth first, and only then")
    if auth is not None and (not params or params[0].default is not inspect.Parameter.empty):
        raise TypeError(f"{mname}: the auth struct is a required argument")
    return register(Method(
        name=mname, func=func, accepts=list(accepts), returns=returns, roles=list(roles),
        doc=inspect.cleandoc(doc or func.__doc__ or ""), writes=writes,
        arg_names=[p.name for p in params],
        min_args=sum(1 for p in params if p.default is inspect.Parameter.empty),
        max_args=len(params), transaction=transaction, auth=auth,
        serializable=serializable))


__all__ = ["ALL_PERSON_ROLES", "ALL_ROLES", "METHODS", "Method", "api_method", "doc_of",
           "make_method"]
