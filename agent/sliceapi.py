"""The slice API: XML-RPC over HTTP on a Unix stream socket (nodemanager spec §4.5-§4.7).

Who calls is read from the connection (SO_PEERCRED), never from the arguments: a
process whose uid lies in a sliver's uid range is that sliver; host root is the node
admin; any other host user may make only the calls open to anyone. A name given as an
argument by a sliver is ignored: a sliver always gets its own data.

Two listening sockets serve the same calls: `socket_path` for the host, and
`<run_dir>/api/agent.sock`, whose directory is bind-mounted into every sliver at
`sliver_socket_dir` (so a restarted agent's new socket is visible in running slivers).

Hostile input is bounded: request size, header count, a deadline per connection, a
cap on open connections, a token bucket per caller. Errors reach the client as XML-RPC
faults without any traceback.
"""

from __future__ import annotations

import http.client
import logging
import os
import pwd
import signal
import socket
import struct
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from agent.backend import Backend
from agent.config import AgentConfig
from agent.faults import (
    FAULT_ARG_COUNT,
    FAULT_BAD_TARGET,
    FAULT_ERROR,
    FAULT_PERMISSION,
    FAULT_RATE,
    FAULT_UNKNOWN_METHOD,
    FAULT_UNSUPPORTED,
    APIFault,
    FdReply,
)
from agent.reconcile import CONTROLLER, Action, Reconciler
from agent.state import State
from agent.tokenbucket import TokenBuckets

log = logging.getLogger("agent.sliceapi")

CONNECTION_DEADLINE = 10.0
FIRST_BYTE_DEADLINE = 2.0
PER_CALLER_CONNECTIONS = 8
ADMIN_CONNECTIONS = 32
SLIVER_MAX_REQUEST = 64 * 1024   # every call of the local API fits in far less
PARSE_IN_THREAD = 16 * 1024      # larger bodies are parsed off the trio thread
MAX_CONNECTIONS = 256
MAX_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class Caller:
    kind: str          # "sliver" | "admin" | "host"
    name: str          # slice name, "root", or "uid:<n>"
    pid: int
    uid: int


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def identify(pid: int, uid: int, ranges: dict[str, int], pool_start: int,
             range_size: int, account_shell: str | None = None,
             controller_shell: str | None = None,
             controllers: Callable[[], set[str]] = set) -> Caller:
    """A caller from its credentials: a sliver by uid range; a slice's host account
    (a local user named after a sliver whose login shell is the agent's vsh); a
    controller slice's account (named after a controller record, whose login shell is
    the agent's forwarder); root; or any other host user."""
    if uid >= pool_start:
        idx = (uid - pool_start) // range_size
        for name, i in ranges.items():
            if i == idx:
                return Caller("sliver", name, pid, uid)
    if uid == 0:
        return Caller("admin", "root", pid, uid)
    if account_shell:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            pw = None
        if pw is not None and pw.pw_shell == account_shell and pw.pw_name in ranges:
            return Caller("account", pw.pw_name, pid, uid)
        if pw is not None and controller_shell and pw.pw_shell == controller_shell and \
                pw.pw_name in controllers():
            return Caller("controller", pw.pw_name, pid, uid)
    return Caller("host", f"uid:{uid}", pid, uid)


class SliceAPI:
    """Calls, permissions and the socket servers."""

    PUBLIC = ("Help", "GetXIDs", "GetSSHKeys", "Ticket")

    def __init__(self, cfg: AgentConfig, state: State, reconciler: Reconciler,
                 backend: Backend, api_dir: Path,
                 guard_methods: Mapping[str, Callable[..., Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`api_dir`: the directory of the sliver-side socket (bind-mounted into every
        sliver); `guard_methods`: the guard's calls (GuardService.methods()), if any."""
        self.cfg = cfg
        self.state = state
        self.reconciler = reconciler
        self.backend = backend
        self.api_dir = api_dir
        self.buckets = TokenBuckets(cfg.api_rate, cfg.api_burst, clock)
        self.max_request = cfg.api_max_request
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._parse_limiter = trio.CapacityLimiter(2)
        self._admin_connections = trio.CapacityLimiter(ADMIN_CONNECTIONS)
        self._open: dict[str, int] = {}
        self.methods: dict[str, Callable[..., Any]] = {
            "Help": self.Help, "GetXIDs": self.GetXIDs, "GetSSHKeys": self.GetSSHKeys,
            "GetRSpec": self.GetRSpec, "GetEffectiveRSpec": self.GetEffectiveRSpec,
            "GetLoans": self.GetLoans, "GetRecord": self.GetRecord, "Ticket": self.Ticket,
            "Create": self.Create, "Destroy": self.Destroy, "Start": self.Start,
            "Stop": self.Stop,
        }
        # ReservePort, ReleasePort, GetPorts, OpenSniffer, OpenErrorSocket, RawSend
        self.guard_methods = dict(guard_methods or {})
        self.methods.update(self.guard_methods)

    # -- identity and targets -----------------------------------------------------------

    def caller_of(self, pid: int, uid: int) -> Caller:
        cfg = self.cfg
        return identify(pid, uid, self.state.uid_ranges(), cfg.uid_pool_start,
                        cfg.uid_range_size, cfg.shell_path if cfg.host_accounts else None,
                        cfg.controller_shell_path if cfg.host_accounts else None,
                        self._controllers)

    def _controllers(self) -> set[str]:
        return {name for name, rec in self.state.slivers().items()
                if rec.state == CONTROLLER}

    def _target(self, caller: Caller, args: tuple[Any, ...]) -> str:
        """The slice a call is about. A sliver always means itself, whatever it passes."""
        if caller.kind in ("sliver", "account"):
            return caller.name
        if caller.kind != "admin":
            raise APIFault(FAULT_PERMISSION, "only slivers and the node admin may call this")
        if not args or not isinstance(args[0], str):
            raise APIFault(FAULT_ARG_COUNT, "expected a slice name as the first argument")
        if self.state.get_sliver(args[0]) is None:
            raise APIFault(FAULT_BAD_TARGET, f"no sliver {args[0]!r} on this node")
        return args[0]

    # -- calls --------------------------------------------------------------------------

    def Help(self, caller: Caller, *args: Any) -> str:
        """Help(): the calls this socket offers."""
        return "\n\n".join(f"{name}: {(fn.__doc__ or '').strip()}"
                           for name, fn in sorted(self.methods.items()))

    def GetXIDs(self, caller: Caller, *args: Any) -> dict[str, int]:
        """GetXIDs(): {slice: first host uid of its range}."""
        cfg = self.cfg
        return {name: cfg.uid_pool_start + idx * cfg.uid_range_size
                for name, idx in self.state.uid_ranges().items()}

    def GetSSHKeys(self, caller: Caller, *args: Any) -> dict[str, str]:
        """GetSSHKeys(): {slice: its members' public keys, one per line}."""
        return {name: "\n".join(rec.spec.get("keys", []))
                for name, rec in self.state.slivers().items()}

    def GetRSpec(self, caller: Caller, *args: Any) -> dict[str, Any]:
        """GetRSpec([name]): the rspec PLC gave the caller's sliver (its own, always)."""
        rec = self.state.get_sliver(self._target(caller, args))
        assert rec is not None
        return _wire(rec.rspec)

    def GetEffectiveRSpec(self, caller: Caller, *args: Any) -> dict[str, Any]:
        """GetEffectiveRSpec([name]): the rspec after loans given and received."""
        name = self._target(caller, args)
        rec = self.state.get_sliver(name)
        assert rec is not None
        eff = dict(rec.rspec)
        for _recipient, resource, amount in self.state.loans_of(name):
            if resource in eff and isinstance(eff[resource], int):
                eff[resource] -= amount
        for lender in self.state.slivers():
            if lender == name:
                continue
            for recipient, resource, amount in self.state.loans_of(lender):
                if recipient == name and resource in eff and isinstance(eff[resource], int):
                    eff[resource] += amount
        return _wire(eff)

    def GetLoans(self, caller: Caller, *args: Any) -> list[list[Any]]:
        """GetLoans([name]): [[recipient, resource, amount], ...] the sliver has lent."""
        return self.state.loans_of(self._target(caller, args))

    def GetRecord(self, caller: Caller, *args: Any) -> dict[str, Any]:
        """GetRecord(): the caller's own sliver record."""
        if caller.kind not in ("sliver", "account"):
            raise APIFault(FAULT_BAD_TARGET, "GetRecord is for slivers only")
        rec = self.state.get_sliver(caller.name)
        assert rec is not None
        return _wire({"name": rec.name, "slice_id": rec.slice_id, "instantiation":
                      rec.instantiation, "expires": rec.expires, "image": rec.image,
                      "state": rec.state, "keys": "\n".join(rec.spec.get("keys", [])),
                      "attributes": rec.spec.get("attributes", {}), "rspec": rec.rspec})

    def Ticket(self, caller: Caller, *args: Any) -> int:
        """Ticket(ticket): redeem a PLC-signed ticket (delegated instantiation)."""
        raise APIFault(FAULT_UNSUPPORTED, "Ticket: not supported on this node yet "
                       "(delegated instantiation comes with signed tickets)")

    def Create(self, caller: Caller, *args: Any) -> int:
        """Create(name): instantiate a delegated sliver."""
        raise APIFault(FAULT_UNSUPPORTED, "Create: only delegated slivers may be created by "
                       "call, and this node does not redeem tickets yet")

    def Destroy(self, caller: Caller, *args: Any) -> int:
        """Destroy(name): remove a delegated sliver."""
        raise APIFault(FAULT_UNSUPPORTED, "Destroy: only delegated slivers may be destroyed "
                       "by call, and this node does not redeem tickets yet")

    async def Start(self, caller: Caller, *args: Any) -> int:
        """Start(name): thaw a sliver (node admin only for now)."""
        return await self._start_stop(caller, args, "start")

    async def Stop(self, caller: Caller, *args: Any) -> int:
        """Stop(name): freeze a sliver until Start (node admin only for now)."""
        return await self._start_stop(caller, args, "stop")

    async def _start_stop(self, caller: Caller, args: tuple[Any, ...], kind: str) -> int:
        if caller.kind != "admin":
            raise APIFault(FAULT_UNSUPPORTED, f"{kind.title()}: not supported for slivers "
                           "yet (needs delegations); the node admin may call it")
        name = self._target(caller, args)
        # Held stopped until Start: the reconciles in between must not start it again.
        self.state.set_held(name, kind == "stop")
        outcome = await self.reconciler.execute(
            [Action(kind, name, "stopped by the slice API's Stop until Start"
                    if kind == "stop" else "slice API")])
        if outcome.failed:
            raise APIFault(FAULT_ERROR, f"{kind} {name}: failed; see the agent's log")
        return 1

    # -- dispatch -----------------------------------------------------------------------

    async def dispatch(self, caller: Caller, body: bytes) -> bytes:
        """One XML-RPC request body -> one response body. Never raises."""
        response, socks = await self.dispatch_full(caller, body)
        for s in socks:
            s.close()
        return response

    async def dispatch_full(self, caller: Caller, body: bytes) -> tuple[bytes, list[Any]]:
        """One request body -> (response body, sockets to send with it). Never raises."""
        socks: list[Any] = []
        try:
            # The token first: a refused request costs no parsing [F7].
            if not self.buckets.take(caller.name):
                raise APIFault(FAULT_RATE, f"rate limit: at most {self.cfg.api_rate:g} "
                               f"calls a second for {caller.name}; retry later")
            try:
                if len(body) > PARSE_IN_THREAD:
                    args, method = await trio.to_thread.run_sync(
                        xmlrpc.client.loads, body, False, False, limiter=self._parse_limiter)
                else:
                    args, method = xmlrpc.client.loads(body, use_builtin_types=False)
            except Exception:  # noqa: BLE001 - any parse failure is the client's
                raise APIFault(FAULT_ERROR, "malformed XML-RPC request") from None
            fn = self.methods.get(method or "")
            if fn is None:
                raise APIFault(FAULT_UNKNOWN_METHOD, f"Invalid method {method!r}; valid: "
                               + ", ".join(sorted(self.methods)))
            if caller.kind in ("host", "controller") and method not in self.PUBLIC:
                raise APIFault(FAULT_PERMISSION, f"{method}: not allowed for {caller.name}")
            if len(args) > 4:
                raise APIFault(FAULT_ARG_COUNT, f"{method}: too many arguments ({len(args)})")
            if method in self.guard_methods and caller.kind == "account":
                # The guard's calls know slivers and the admin; an account is its sliver.
                caller = Caller("sliver", caller.name, caller.pid, caller.uid)
            result = fn(caller, *args)
            if hasattr(result, "__await__"):
                result = await result
            if isinstance(result, FdReply):
                socks = list(result.socks)
                result = result.value
            if result is None:
                result = 1
            return xmlrpc.client.dumps((result,), methodresponse=True,
                                       allow_none=True).encode(), socks
        except APIFault as fault:
            return xmlrpc.client.dumps(xmlrpc.client.Fault(fault.code, fault.message),
                                       methodresponse=True).encode(), socks
        except xmlrpc.client.Fault as fault:   # the guard's calls raise faults themselves
            return xmlrpc.client.dumps(fault, methodresponse=True).encode(), socks
        except Exception:  # noqa: BLE001 - boundary: log, answer without details
            log.exception("slice API: %s failed for %s", body[:64], caller.name)
            return xmlrpc.client.dumps(xmlrpc.client.Fault(FAULT_ERROR, "Error in call"),
                                       methodresponse=True).encode(), socks

    # -- transport ----------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection (see _handle). Whatever goes wrong in it (a bug, a locked
        state database) ends that connection only, never the agent."""
        try:
            await self._handle(stream)
        except Exception:   # noqa: BLE001 - boundary: one connection
            log.exception("slice API: connection failed")
            with trio.move_on_after(1):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection: one HTTP POST answered, or one ENTER session. The caller is
        known before anything shared is taken [F4]: at most PER_CALLER_CONNECTIONS open
        connections per caller (more are closed at once), the node admin has its own
        reserve, and a request has one deadline (a short one for its first byte)."""
        try:
            pid, uid, _ = peer_credentials(stream.socket)  # type: ignore[arg-type]
            caller = self.caller_of(pid, uid)
        except OSError:
            await stream.aclose()
            return
        if self._open.get(caller.name, 0) >= PER_CALLER_CONNECTIONS:
            await stream.aclose()
            return
        self._open[caller.name] = self._open.get(caller.name, 0) + 1
        limiter = self._admin_connections if caller.kind == "admin" else self._connections
        try:
            async with limiter:
                await self._serve_connection(stream, caller)
        finally:
            self._open[caller.name] -= 1
            if not self._open[caller.name]:
                del self._open[caller.name]
            with trio.move_on_after(1):
                await stream.aclose()

    async def _serve_connection(self, stream: trio.SocketStream, caller: Caller) -> None:
        fds: list[int] = []
        try:
            deadline = trio.current_time() + CONNECTION_DEADLINE
            first = b""
            with trio.move_on_after(FIRST_BYTE_DEADLINE):
                first, fds = await _receive_first(stream)
            if not first:
                return
            if first.startswith(b"ENTER1 "):
                await self.enter_session(stream, caller, first, fds)
                return
            _close_fds(fds)
            fds = []
            with trio.move_on_at(deadline):
                limit = (self.max_request if caller.kind == "admin"
                         else min(self.max_request, SLIVER_MAX_REQUEST))
                body = await _read_request(stream, limit, first)
                if body is None:
                    await _send(stream, 400, b"bad request\n", "text/plain")
                    return
                if isinstance(body, int):
                    await _send(stream, body, b"request too large\n", "text/plain")
                    return
                response, socks = await self.dispatch_full(caller, body)
                try:
                    await _send(stream, 200, response, "text/xml",
                                [s.fileno() for s in socks])
                finally:
                    for s in socks:
                        s.close()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            _close_fds(fds)

    async def enter_session(self, stream: trio.SocketStream, caller: Caller, first: bytes,
                            fds: list[int]) -> None:
        """`ssh SLICE@node`: the slice's host account's login shell (agent/native/vsh.c)
        asks for a session inside its sliver. Only that account may; the slice is the
        account's, never a name sent here."""
        async def refuse(message: str) -> None:
            await stream.send_all(f"{message}\n".encode())

        if caller.kind != "account":
            await refuse("ENTER: only a slice's host account may open a session")
            return
        if not self.buckets.take(caller.name):
            await refuse(f"ENTER: rate limit for {caller.name}; retry later")
            return
        with trio.move_on_after(CONNECTION_DEADLINE) as scope:
            request = await _read_enter(stream, first)
        if scope.cancelled_caught or request is None:
            await refuse("ENTER: malformed request")
            return
        tty, rows, cols, strings = request
        if not tty and len(fds) != 3:
            await refuse("ENTER: a session without a terminal must pass fds 0, 1 and 2")
            return
        if any(os.isatty(fd) for fd in fds):
            # A host terminal handed into a sliver can be read by any of its processes
            # (pidfd_getfd) after the session ends [F10]: terminals get a pty inside.
            await refuse("ENTER: a terminal is never passed into a sliver; ask for a pty")
            return
        rec = self.state.get_sliver(caller.name)
        if rec is None or rec.state != "running":
            await refuse(f"ENTER: the sliver {caller.name} is not running"
                         + (f" ({rec.state}: {rec.message})" if rec else ""))
            return
        term = strings[0] if strings else ""
        argv = ["/bin/sh", "-c", strings[1]] if len(strings) > 1 else []
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/sh"}
        if term and term.isprintable() and len(term) < 64:
            env["TERM"] = term
        try:
            proc = await trio.to_thread.run_sync(
                self.backend.enter, caller.name, argv, bool(tty), (rows, cols), env,
                (fds[0], fds[1], fds[2]) if not tty else None)
        except Exception as exc:  # noqa: BLE001 - boundary: tell the client, log
            log.warning("ENTER %s failed: %s", caller.name, exc)
            await refuse(f"ENTER: cannot start a session in {caller.name}")
            return
        finally:
            _close_fds(fds)
            fds.clear()
        log.info("session for %s started (pid %d inside, tty=%d)", caller.name, proc.pid, tty)
        try:
            if tty:
                master = proc.master
                try:
                    await stream.socket.sendmsg(  # type: ignore[attr-defined]
                        [b"PTY\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      struct.pack("i", master))])
                finally:
                    os.close(master)
                    proc.master = None
            code = await _wait_session(proc, stream)
            await stream.send_all(f"EXIT {code & 0xff if code >= 0 else 128 - code}\n".encode())
        finally:
            if proc.returncode is None:
                with _suppress():
                    proc.kill()
    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        paths = [Path(self.cfg.socket_path), self.api_dir / "agent.sock"]
        self.api_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.api_dir, 0o755)
        listeners = [await _unix_listener(p) for p in dict.fromkeys(paths)]
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(trio.serve_listeners, self.handle, [listener])
                task_status.started()
        finally:
            for p in dict.fromkeys(paths):
                with _suppress():
                    p.unlink()


async def _wait_session(proc: Any, stream: trio.SocketStream) -> int:
    """The session's exit code. If the client goes away first, the session is hung up
    (SIGHUP), then killed if it does not end within a few seconds."""
    async with trio.open_nursery() as nursery:
        async def client_gone() -> None:
            while True:
                data = await stream.receive_some(1024)
                if not data:
                    break
            with _suppress():
                proc.send_signal(signal.SIGHUP)
            await trio.sleep(5)
            with _suppress():
                proc.kill()

        nursery.start_soon(client_gone)
        while True:
            await trio.lowlevel.wait_readable(proc.fileno())
            code = proc.poll()
            if code is not None:
                nursery.cancel_scope.cancel()
                return int(code)


async def _receive_first(stream: trio.SocketStream) -> tuple[bytes, list[int]]:
    """The first bytes of a connection and any fds sent with them (SCM_RIGHTS)."""
    data, anc, _, _ = await stream.socket.recvmsg(  # type: ignore[attr-defined]
        65536, socket.CMSG_SPACE(3 * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds += list(struct.unpack(f"{n}i", payload[:4 * n]))
    return data, fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with _suppress():
            os.close(fd)


async def _read_enter(stream: trio.SocketStream,
                      first: bytes) -> tuple[int, int, int, list[str]] | None:
    """Parse "ENTER1 <tty> <rows> <cols> <n>\\n" + n NUL-terminated strings."""
    buf = bytearray(first)
    while b"\n" not in buf:
        if len(buf) > 256:
            return None
        more = await stream.receive_some(4096)
        if not more:
            return None
        buf += more
    head, _, rest = bytes(buf).partition(b"\n")
    try:
        _, tty, rows, cols, count = head.split(b" ")
        t, r, c, n = int(tty), int(rows), int(cols), int(count)
    except ValueError:
        return None
    if t not in (0, 1) or not 0 <= r < 10000 or not 0 <= c < 10000 or not 0 <= n <= 2:
        return None
    body = bytearray(rest)
    while body.count(b"\0") < n:
        if len(body) > 256 * 1024:
            return None
        more = await stream.receive_some(65536)
        if not more:
            return None
        body += more
    parts = bytes(body).split(b"\0")[:n]
    try:
        return t, r, c, [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError:
        return None


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


async def _unix_listener(path: Path) -> trio.SocketListener:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        await sock.bind(str(path))
        os.chmod(path, 0o666)  # anyone may connect; who they are comes from SO_PEERCRED
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _read_request(stream: trio.SocketStream, limit: int,
                        first: bytes = b"") -> bytes | int | None:
    """The body of one HTTP POST; None if malformed, 413 if too large."""
    buf = bytearray(first)
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEADER_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"POST "):
        return None
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
    if length is None or length < 0:
        return None
    if length > limit:
        return 413
    body = bytearray(rest)
    while len(body) < length:
        chunk = await stream.receive_some(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return bytes(body[:length])


async def _send(stream: trio.SocketStream, status: int, body: bytes, ctype: str,
                fds: list[int] | None = None) -> None:
    """The HTTP response; fds (SCM_RIGHTS) travel with its first chunk (docs/guard.md)."""
    reason = {200: "OK", 400: "Bad Request", 413: "Payload Too Large"}.get(status, "Error")
    head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    data = head + body
    if fds:
        sent = await stream.socket.sendmsg(  # type: ignore[attr-defined]
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        data = data[sent:]
    if data:
        await stream.send_all(data)


def _wire(value: Any) -> Any:
    """Make a value XML-RPC safe: ints beyond 32 bits become strings (as PLC clamps)."""
    if isinstance(value, dict):
        return {str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31:
        return str(value)
    return value


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
