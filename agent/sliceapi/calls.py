"""The slice API's calls (nodemanager spec §4.5-§4.7), who may make them, and the
dispatch of one XML-RPC request body to one response body.

A name given as an argument by a sliver is ignored: a sliver always gets its own data.
Errors reach the client as XML-RPC faults without any traceback.
"""

from __future__ import annotations

import logging
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from typing import Any

import trio

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
from agent.reconcile import Reconciler
from agent.sliceapi.delegation import Management
from agent.sliceapi.identity import Caller, identify
from agent.sliceapi.rcaps import RcapCalls
from agent.state import SliverState, State
from agent.tickets import TicketKeys
from agent.tokenbucket import TokenBuckets

log = logging.getLogger("agent.sliceapi")

PARSE_IN_THREAD = 16 * 1024      # larger bodies are parsed off the trio thread


class Calls:
    """The calls, their permissions, and the dispatch of one request."""

    PUBLIC = ("Help", "GetXIDs", "GetSSHKeys", "Ticket")
    # What a controller slice's account may call besides: on the slivers its
    # delegations name (agent/sliceapi/delegation.py checks that).
    CONTROLLER = ("Create", "Destroy", "Start", "Stop")

    def __init__(self, cfg: AgentConfig, state: State, reconciler: Reconciler,
                 guard_methods: Mapping[str, Callable[..., Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic, bandwidth: Any = None,
                 management: Management | None = None, rcaps: Any = None) -> None:
        """`guard_methods`: the guard's calls (GuardService.methods()), if any;
        `bandwidth`: agent.bwservice.BandwidthService, if shaping is on; `management`:
        Ticket, Create, Destroy, Start, Stop (default: tickets checked with agent.toml's
        plc_ticket_key only); `rcaps`: agent.rcaps.RcapService (its calls,
        agent/sliceapi/rcaps.py, replace GetLoans and GetEffectiveRSpec here and add
        SetLoans and the rcap calls)."""
        self.cfg = cfg
        self.state = state
        self.reconciler = reconciler
        self.buckets = TokenBuckets(cfg.api_rate, cfg.api_burst, clock)
        self._parse_limiter = trio.CapacityLimiter(2)
        self.methods: dict[str, Callable[..., Any]] = {
            "Help": self.Help, "GetXIDs": self.GetXIDs, "GetSSHKeys": self.GetSSHKeys,
            "GetRSpec": self.GetRSpec, "GetEffectiveRSpec": self.GetEffectiveRSpec,
            "GetLoans": self.GetLoans, "GetRecord": self.GetRecord,
            "GetBandwidth": self.GetBandwidth,
        }
        if management is None:
            management = Management(cfg, state, reconciler,
                                    TicketKeys(cfg.plc_ticket_key, state),
                                    lambda: (cfg.node_id or None, cfg.effective_hostname))
        self.management = management
        self.methods.update(management.methods())
        self.bandwidth = bandwidth
        # ReservePort, ReleasePort, GetPorts, OpenSniffer, OpenErrorSocket, RawSend
        self.guard_methods = dict(guard_methods or {})
        self.methods.update(self.guard_methods)
        if rcaps is not None:
            self.methods.update(RcapCalls(rcaps, state).methods())

    # -- identity and targets -----------------------------------------------------------

    def caller_of(self, pid: int, uid: int) -> Caller:
        cfg = self.cfg
        return identify(pid, uid, self.state.uid_ranges(), cfg.uid_pool_start,
                        cfg.uid_range_size, cfg.shell_path if cfg.host_accounts else None,
                        cfg.controller_shell_path if cfg.host_accounts else None,
                        self._controllers)

    def _controllers(self) -> set[str]:
        return {name for name, rec in self.state.slivers().items()
                if rec.state == SliverState.CONTROLLER}

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
                      "state": rec.state.value, "keys": "\n".join(rec.spec.get("keys", [])),
                      "attributes": rec.spec.get("attributes", {}), "rspec": rec.rspec})

    async def GetBandwidth(self, caller: Caller, *args: Any) -> dict[str, Any]:
        """GetBandwidth([name]): the caller's own bytes, packets, budget left, current
        ceilings (bit/s), drops and backlog in this window (as of the last accounting
        pass); the admin names a slice."""
        name = self._target(caller, args)
        if self.bandwidth is None:
            raise APIFault(FAULT_UNSUPPORTED, "bandwidth shaping is off on this node "
                           "(agent.toml [bandwidth] interfaces is empty)")
        try:
            report = await trio.to_thread.run_sync(self.bandwidth.report, name)
        except KeyError:
            raise APIFault(FAULT_BAD_TARGET, f"no bandwidth ledger for {name!r} yet") from None
        return _wire({k: v for k, v in report.items() if v is not None})

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
            if caller.kind in ("host", "controller") and method not in self.PUBLIC and not (
                    caller.kind == "controller" and method in self.CONTROLLER):
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


def _wire(value: Any) -> Any:
    """Make a value XML-RPC safe: ints beyond 32 bits become strings (as PLC clamps)."""
    if isinstance(value, dict):
        return {str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31:
        return str(value)
    return value
