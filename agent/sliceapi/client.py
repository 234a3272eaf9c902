"""The slice API's client side: xmlrpc.client over the agent's Unix socket (used by
the CLI, the tests, and any Python program inside a sliver)."""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from typing import Any


class UnixTransport(xmlrpc.client.Transport):
    """xmlrpc.client over a Unix socket: `ServerProxy('http://agent/', UnixTransport(path))`."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> Any:
        path, timeout = self._path, self._timeout

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                s.connect(path)
                self.sock = s

        return _Conn("localhost")


def client(path: str) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy("http://agent/", transport=UnixTransport(path),
                                     allow_none=True)
