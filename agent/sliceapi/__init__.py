"""The slice API: XML-RPC over HTTP on a Unix stream socket (nodemanager spec §4.5-§4.7).

Rooms: `identity` (who calls, from SO_PEERCRED), `transport` (the sockets, HTTP by
h11, limits; `SliceAPI`), `enter` (the ENTER session of a slice's login shell),
`calls` (the calls, permissions, dispatch), `client` (xmlrpc.client over the socket).
Faults and FdReply are agent/faults.py's.
"""

from agent.sliceapi.client import UnixTransport, client
from agent.sliceapi.identity import Caller, identify, peer_credentials
from agent.sliceapi.transport import SliceAPI

__all__ = ["Caller", "SliceAPI", "UnixTransport", "client", "identify", "peer_credentials"]
