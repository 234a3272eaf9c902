"""The slice API's rcap and loan calls (docs/rcaps.md): AcquireRcap, SplitRcap,
BindRcap, ReleaseRcap, GetRcap, SetLoans, GetLoans, GetEffectiveRSpec.

An rcap string is the authority: whoever presents it may split, bind or release it. A
sliver acquires from its own holdings; the node admin from the node's free pool.
Every change is written to the state before it is applied, and applied before the
call answers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from agent.faults import (
    FAULT_ARG_COUNT,
    FAULT_BAD_TARGET,
    FAULT_ERROR,
    FAULT_PERMISSION,
    APIFault,
)
from agent.rcaps.model import (
    MAX_AMOUNT,
    NO_PORTS,
    PORTS,
    LedgerError,
    format_ports,
    ports_of,
    request_of,
    token_id,
)
from agent.rcaps.service import RcapService
from agent.sliceapi.identity import Caller
from agent.state import HAS_SLIVER, State

RCAP_RE = re.compile(r"[0-9a-f]{32}")
MAX_RCAPS_PER_SLICE = 1024     # rcaps a slice may have acquired and not released
MAX_LOANS = 256                # loans in one SetLoans (per lender)

# LedgerError.kind -> fault code (docs/rcaps.md, "Errors").
FAULTS = {"unknown_rcap": FAULT_BAD_TARGET, "unknown_slice": FAULT_BAD_TARGET,
          "plc_rcap": FAULT_PERMISSION, "bound": FAULT_PERMISSION,
          "bad_request": FAULT_ARG_COUNT}


class RcapCalls:
    def __init__(self, service: RcapService, state: State) -> None:
        self.service = service
        self.state = state

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {"AcquireRcap": self.AcquireRcap, "SplitRcap": self.SplitRcap,
                "BindRcap": self.BindRcap, "ReleaseRcap": self.ReleaseRcap,
                "GetRcap": self.GetRcap, "SetLoans": self.SetLoans, "GetLoans": self.GetLoans,
                "GetEffectiveRSpec": self.GetEffectiveRSpec}

    # -- helpers ------------------------------------------------------------------------

    def _who(self, caller: Caller) -> str | None:
        """The caller's slice (None: the node admin)."""
        if caller.kind in ("sliver", "account"):
            return caller.name
        if caller.kind == "admin":
            return None
        raise APIFault(FAULT_PERMISSION, "only slivers and the node admin hold rcaps")

    def _slice_arg(self, caller: Caller, args: tuple[Any, ...], method: str) -> str:
        who = self._who(caller)
        if who is not None:
            return who          # a sliver always means itself
        if not args or not isinstance(args[0], str):
            raise APIFault(FAULT_ARG_COUNT, f"{method}: the node admin names a slice first")
        self._live(args[0], method)
        return args[0]

    def _live(self, name: str, method: str) -> None:
        rec = self.state.get_sliver(name)
        if rec is None or rec.state not in HAS_SLIVER:
            raise APIFault(FAULT_BAD_TARGET, f"{method}: no sliver {name[:64]!r} on this node")

    @staticmethod
    def _rcap(value: Any, method: str) -> str:
        if not isinstance(value, str) or not RCAP_RE.fullmatch(value):
            raise APIFault(FAULT_ARG_COUNT, f"{method}: an rcap is 32 lowercase hex digits")
        return token_id(value)

    @staticmethod
    def _fault(method: str, exc: LedgerError) -> APIFault:
        return APIFault(FAULTS.get(exc.kind, FAULT_ERROR), f"{method}: {exc}")

    async def _apply(self, touched: set[str], method: str) -> None:
        failed = await self.service.apply(touched)
        if failed:
            raise APIFault(FAULT_ERROR, f"{method}: recorded, but applying it to "
                           f"{', '.join(failed)} failed; the agent retries")

    # -- rcaps --------------------------------------------------------------------------

    async def AcquireRcap(self, caller: Caller, *args: Any) -> str:
        """AcquireRcap(rspec) -> rcap: a new rcap of `rspec` ({resource: amount}); a
        sliver's comes from its own holdings, the node admin's from the free pool."""
        if len(args) != 1:
            raise APIFault(FAULT_ARG_COUNT, "AcquireRcap(rspec): one argument")
        who = self._who(caller)
        if who is not None and self.service.led.held_count(who) >= MAX_RCAPS_PER_SLICE:
            raise APIFault(FAULT_ERROR, f"AcquireRcap: {who} holds {MAX_RCAPS_PER_SLICE} "
                           "rcaps already; release some")
        try:
            want, ports = request_of(args[0])
            if who is None:
                self.service.check_pool_ports(ports)
            token, touched = self.service.led.acquire(want, who or "", from_slice=who,
                                                      now=self.service.clock(), ports=ports)
        except LedgerError as exc:
            raise self._fault("AcquireRcap", exc) from None
        await self._apply(touched, "AcquireRcap")
        return token

    async def SplitRcap(self, caller: Caller, *args: Any) -> str:
        """SplitRcap(rcap, rspec) -> rcap: a new rcap of `rspec` taken from `rcap`'s
        remainder (if `rcap` is bound, its slice holds that much less)."""
        if len(args) != 2:
            raise APIFault(FAULT_ARG_COUNT, "SplitRcap(rcap, rspec): two arguments")
        who = self._who(caller)
        rid = self._rcap(args[0], "SplitRcap")
        if who is not None and self.service.led.held_count(who) >= MAX_RCAPS_PER_SLICE:
            raise APIFault(FAULT_ERROR, f"SplitRcap: {who} holds {MAX_RCAPS_PER_SLICE} "
                           "rcaps already; release some")
        try:
            want, ports = request_of(args[1])
            token, touched = self.service.led.split(rid, want, who or "",
                                                    now=self.service.clock(), ports=ports)
        except LedgerError as exc:
            raise self._fault("SplitRcap", exc) from None
        await self._apply(touched, "SplitRcap")
        return token

    async def BindRcap(self, caller: Caller, *args: Any) -> int:
        """BindRcap(slice, rcap): the slice holds the rcap's remainder from now on."""
        if len(args) != 2 or not isinstance(args[0], str):
            raise APIFault(FAULT_ARG_COUNT, "BindRcap(slice, rcap): two arguments")
        self._who(caller)
        self._live(args[0], "BindRcap")
        rid = self._rcap(args[1], "BindRcap")
        try:
            touched = self.service.led.bind(rid, args[0])
        except LedgerError as exc:
            raise self._fault("BindRcap", exc) from None
        await self._apply(touched, "BindRcap")
        return 1

    async def ReleaseRcap(self, caller: Caller, *args: Any) -> int:
        """ReleaseRcap(rcap): the rcap and everything split off it end; the amounts go
        back to where they came from."""
        if len(args) != 1:
            raise APIFault(FAULT_ARG_COUNT, "ReleaseRcap(rcap): one argument")
        self._who(caller)
        rid = self._rcap(args[0], "ReleaseRcap")
        try:
            touched = self.service.led.release(rid)
        except LedgerError as exc:
            raise self._fault("ReleaseRcap", exc) from None
        await self._apply(touched, "ReleaseRcap")
        return 1

    def GetRcap(self, caller: Caller, *args: Any) -> dict[str, Any]:
        """GetRcap(rcap) -> {amounts, remainder, bound, origin}."""
        if len(args) != 1:
            raise APIFault(FAULT_ARG_COUNT, "GetRcap(rcap): one argument")
        self._who(caller)
        rid = self._rcap(args[0], "GetRcap")
        led = self.service.led
        try:
            r = led.get(rid)
        except LedgerError as exc:
            raise self._fault("GetRcap", exc) from None
        return {"amounts": _wire({**r.amounts, PORTS: format_ports(r.ports)}),
                "remainder": _wire({**led.remainder(rid),
                                    PORTS: format_ports(led.remainder_ports(rid))}),
                "bound": r.bound or "", "origin": r.origin}

    # -- loans --------------------------------------------------------------------------

    async def SetLoans(self, caller: Caller, *args: Any) -> int:
        """SetLoans([name,] loans): replace the sliver's loans; each loan is [recipient,
        resource, amount] with optional expires (unix time, 0: none) and relend (bool:
        the recipient may lend on it), or a struct with those keys. All or nothing."""
        if caller.kind == "admin" or len(args) == 2:
            name = self._slice_arg(caller, args, "SetLoans")
            args = args[1:]
        else:
            name = self._slice_arg(caller, args, "SetLoans")
        if len(args) != 1 or not isinstance(args[0], list):
            raise APIFault(FAULT_ARG_COUNT, "SetLoans([name,] loans): loans is a list")
        if len(args[0]) > MAX_LOANS:
            raise APIFault(FAULT_ARG_COUNT, f"SetLoans: at most {MAX_LOANS} loans")
        try:
            wanted = [_loan(item, i) for i, item in enumerate(args[0])]
        except LedgerError as exc:
            raise self._fault("SetLoans", exc) from None
        for recipient, *_ in wanted:
            self._live(recipient, "SetLoans")
        try:
            touched = self.service.led.set_loans(name, wanted, self.service.clock())
        except LedgerError as exc:
            raise self._fault("SetLoans", exc) from None
        self.service.loan_changed()
        await self._apply(touched, "SetLoans")
        return 1

    def GetLoans(self, caller: Caller, *args: Any) -> list[list[Any]]:
        """GetLoans([name]) -> [[recipient, resource, amount, expires, relend], ...]: the
        loans the sliver has made."""
        name = self._slice_arg(caller, args, "GetLoans")
        return [_wire(loan.wire()) for loan in self.service.led.loans_of(name)]

    def GetEffectiveRSpec(self, caller: Caller, *args: Any) -> dict[str, Any]:
        """GetEffectiveRSpec([name]): the rspec after rcaps and loans given and received."""
        name = self._slice_arg(caller, args, "GetEffectiveRSpec")
        rec = self.state.get_sliver(name)
        if rec is None:
            raise APIFault(FAULT_BAD_TARGET, f"no sliver {name!r} on this node")
        return _wire(self.service.effective_rspec(rec))


def _loan(item: Any, index: int) -> tuple[str, str, int, float, bool, Any]:
    where = f"SetLoans: loan {index}"
    if isinstance(item, dict):
        item = [item.get("recipient", item.get("to")), item.get("resource"),
                item.get("amount"), item.get("expires", 0), item.get("relend", False)]
    if not isinstance(item, list) or not 3 <= len(item) <= 5:
        raise APIFault(FAULT_ARG_COUNT, f"{where}: [recipient, resource, amount"
                       "[, expires[, relend]]]")
    recipient, resource, amount = item[0], item[1], item[2]
    expires = item[3] if len(item) > 3 else 0
    relend = item[4] if len(item) > 4 else False
    ports = NO_PORTS
    if resource == PORTS:        # the amount of a loan of ports is the ports it lends
        ports = ports_of(amount)
        amount = len(ports)
    if isinstance(amount, str) and amount.isdigit():
        amount = int(amount)
    if not isinstance(recipient, str) or not isinstance(resource, str):
        raise APIFault(FAULT_ARG_COUNT, f"{where}: recipient and resource are strings")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_AMOUNT:
        raise APIFault(FAULT_ARG_COUNT, f"{where}: {resource[:40]}: amount must be a "
                       "positive integer")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool) or expires < 0:
        raise APIFault(FAULT_ARG_COUNT, f"{where}: expires is a unix time (0: none)")
    return recipient, resource, amount, float(expires), bool(relend), ports


def _wire(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31:
        return str(value)
    return value
