"""PLCAPI faults (spec section 3).

Every fault carries the legacy code and base text; ``extra`` is appended after ": ".
The dispatcher later prefixes ``"<caller>: <Method>: "`` (spec 1.2).
"""

from __future__ import annotations

import xmlrpc.client


class PLCFault(xmlrpc.client.Fault):
    """Base class of every fault the API answers with."""

    code = 0
    base = "Fault"

    def __init__(self, extra: str | None = None, base: str | None = None) -> None:
        text = base if base is not None else self.base
        if extra:
            text = f"{text}: {extra}"
        super().__init__(self.code, text)


class PLCInvalidAPIMethod(PLCFault):
    code = 100

    def __init__(self, method: str, role: str | None = None, extra: str | None = None) -> None:
        base = f"Invalid method {method}"
        if role:
            base += f" for role {role}"
        super().__init__(extra, base)


class PLCInvalidArgumentCount(PLCFault):
    code = 101

    def __init__(self, got: int, min_args: int, max_args: int) -> None:
        if min_args == max_args:
            base = f"Expected {min_args} arguments, got {got}"
        else:
            base = f"Expected {min_args}-{max_args} arguments, got {got}"
        super().__init__(None, base)


class PLCInvalidArgument(PLCFault):
    code = 102
    base = "Invalid argument"

    def __init__(self, extra: str | None = None, name: str | None = None) -> None:
        super().__init__(extra, f"Invalid {name} value" if name else None)


class PLCAuthenticationFailure(PLCFault):
    code = 103
    base = "Failed to authenticate call"


class PLCDBError(PLCFault):
    code = 106
    base = "Database error"


class PLCPermissionDenied(PLCFault):
    code = 108
    base = "Permission denied"


class PLCNotImplemented(PLCFault):
    code = 109
    base = "Not fully implemented"


class PLCAPIError(PLCFault):
    code = 111
    base = "Internal API error"


#: multicall only (spec 1.3)
FAULT_UNEXPECTED = 1
FAULT_RECURSIVE_MULTICALL = -507
