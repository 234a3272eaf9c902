"""What a slice API call may answer besides a plain value: the fault codes of the
original local API (nodemanager spec §4.5), `APIFault`, and `FdReply` (a result that
carries sockets). Every call's owner (agent/sliceapi/, agent/guard/) raises and
returns these; only the transport turns them into bytes."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

# Fault codes of the original local API (§4.5), plus one for rate limiting.
FAULT_UNKNOWN_METHOD = 100
FAULT_ARG_COUNT = 101
FAULT_BAD_TARGET = 102
FAULT_ERROR = 104
FAULT_RATE = 105
FAULT_UNSUPPORTED = 106
FAULT_PERMISSION = 108


class APIFault(Exception):
    """An XML-RPC fault with one of the codes above; its message reaches the caller."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class FdReply:
    """A slice API result that carries sockets: `value` goes in the XML-RPC reply,
    `socks` travel with it by SCM_RIGHTS (the API closes them once sent)."""

    value: object
    socks: list[socket.socket] = field(default_factory=list)
