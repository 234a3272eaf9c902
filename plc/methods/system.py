"""system.listMethods, methodHelp, methodSignature, multicall (spec 1.3)."""

from __future__ import annotations

import xmlrpc.client
from typing import TYPE_CHECKING, Any

from plc.faults import FAULT_RECURSIVE_MULTICALL, FAULT_UNEXPECTED, PLCInvalidAPIMethod
from plc.method import METHODS, make_method
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call


def list_methods(call: Call) -> list[str]:
    """Return an array of all available methods."""
    return list(METHODS)


def method_help(call: Call, method: str) -> str:
    """Return help text of a method."""
    m = METHODS.get(method)
    if m is None:
        raise PLCInvalidAPIMethod(method)
    return m.help()


def method_signature(call: Call, method: str) -> list[list[str]]:
    """Return the signatures of a method: [return type, argument types...] each."""
    m = METHODS.get(method)
    if m is None:
        raise PLCInvalidAPIMethod(method)
    return m.signatures()


#: calls one system.multicall may carry (issue 9: 30,000 wrong passwords fit in 16 MiB)
MAX_MULTICALL = 1000


def multicall(call: Call, calls: list[Any]) -> list[Any]:
    """Process an array of calls; each runs (and commits) on its own, in order."""
    from plc.api import InternalError

    results: list[Any] = []
    for sub in calls:
        if not isinstance(sub, dict) or not isinstance(sub.get("methodName"), str) or \
                not isinstance(sub.get("params", []), list):
            results.append({"faultCode": FAULT_UNEXPECTED,
                            "faultString": "TypeError:each call must be a struct with "
                                           "methodName (string) and params (array)"})
            continue
        name = sub["methodName"]
        if name == "system.multicall":
            results.append({"faultCode": FAULT_RECURSIVE_MULTICALL,
                            "faultString": "Recursive system.multicall forbidden"})
            continue
        try:
            results.append([call.api.run(call.conn, name, sub.get("params", []), call.source)])
        except xmlrpc.client.Fault as f:
            results.append({"faultCode": f.faultCode, "faultString": f.faultString})
        except InternalError:
            results.append({"faultCode": FAULT_UNEXPECTED,
                            "faultString": "InternalError:internal error, see the server log"})
    return results


make_method(list_methods, name="system.listMethods", roles=[], accepts=[],
            returns=Parameter(list, "List of methods"), transaction=False)
make_method(method_help, name="system.methodHelp", roles=[],
            accepts=[Parameter(str, "Method name")],
            returns=Parameter(str, "Method help"), transaction=False)
make_method(method_signature, name="system.methodSignature", roles=[],
            accepts=[Parameter(str, "Method name")],
            returns=Parameter([[str]], "Method signatures"), transaction=False)
make_method(multicall, name="system.multicall", roles=[],
            accepts=[Parameter([{"methodName": Parameter(str, "Method name"),
                                 "params": Parameter(list, "Method arguments")}],
                               "Array of calls", max=MAX_MULTICALL)],
            returns=Parameter(list, "Array of results"), transaction=False)
