"""Delegated instantiation on the slice API (docs/tickets.md; nodemanager spec §2.2,
§4.2, §4.3, §4.6): `Ticket`, `Create`, `Destroy`, `Start`, `Stop`.

Authority over a sliver: the node admin; the slice itself; a slice its `delegations`
tag names (a comma-separated list of slice names, parsed: the original compared the
raw string, so only a one-name list ever matched). The tag is the target's, set at PLC
by whoever may tag the target: a slice cannot give itself authority over another.

Instantiation types: `plc-instantiated` slivers are PLC's (made and removed by the
reconciler from GetSlivers; Create/Destroy refuse them, Start/Stop work for self and
delegates); `delegated` slivers are made only by a ticket or a delegate's Create, never
by a poll alone, and a poll refreshes them afterwards ("PLC overrides ticket") and
removes them when PLC no longer lists the slice; `nm-controller` slices have no sliver
(their host account calls these methods on behalf of the slice).

A redeemed ticket's nonce and the record it admits are written in one transaction;
the sliver is then made by the reconciler (agent/reconcile.py), the only place
slivers are made.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent import getslivers, tickets
from agent.config import AgentConfig
from agent.faults import (
    FAULT_ARG_COUNT,
    FAULT_BAD_TARGET,
    FAULT_ERROR,
    FAULT_PERMISSION,
    APIFault,
)
from agent.reconcile import Action, Reconciler, admit, plan
from agent.sliceapi.identity import Caller
from agent.state import SliverRecord, SliverState, State

log = logging.getLogger("agent.sliceapi")

FAULT_TICKET = FAULT_BAD_TARGET    # the original's "Ticket error: ..." (Fault 102)
MANAGERS = ("sliver", "account", "controller")


def delegates(attributes: Mapping[str, Any]) -> set[str]:
    """The slices a sliver's `delegations` tag names."""
    value = attributes.get("delegations", "")
    return {n.strip() for n in str(value).split(",") if n.strip()}


class Management:
    """The calls that make, remove, start and stop slivers on behalf of slices."""

    def __init__(self, cfg: AgentConfig, state: State, reconciler: Reconciler,
                 keys: tickets.TicketKeys, node: Callable[[], tuple[int | None, str]],
                 clock: Callable[[], float] = time.time) -> None:
        """`node`: this node's (node_id or None, hostname), as PLC knows it."""
        self.cfg = cfg
        self.state = state
        self.reconciler = reconciler
        self.keys = keys
        self.node = node
        self.clock = clock
        self.nonces = tickets.Nonces(state)

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {"Ticket": self.Ticket, "Create": self.Create, "Destroy": self.Destroy,
                "Start": self.Start, "Stop": self.Stop}

    # -- who and what ---------------------------------------------------------------------

    def _name(self, caller: Caller, args: tuple[Any, ...], method: str) -> str:
        if args:
            if not isinstance(args[0], str):
                raise APIFault(FAULT_ARG_COUNT, f"{method}: expected a slice name")
            return args[0]
        if caller.kind in ("sliver", "account"):
            return caller.name
        raise APIFault(FAULT_ARG_COUNT, f"{method}: expected a slice name")

    def _authorize(self, caller: Caller, name: str, attributes: Mapping[str, Any],
                   method: str) -> None:
        if caller.kind == "admin":
            return
        if caller.kind in MANAGERS and (caller.name == name or
                                        caller.name in delegates(attributes)):
            return
        raise APIFault(FAULT_PERMISSION, f"{method}: {caller.name} has no delegation rights "
                       f"over {name} (its delegations tag does not name {caller.name})")

    def _reply_entry(self, name: str) -> tuple[getslivers.SliverSpec | None, dict[str, str],
                                               dict[str, str], int]:
        """(the last good GetSlivers reply's entry for `name` or None, its initscripts,
        the `<prefix>_default` overrides, its timestamp)."""
        reply = self.state.last_reply() or {}
        try:
            ts = int(self.state.get_meta("last_timestamp") or 0)
        except ValueError:
            ts = 0
        initscripts = _initscripts(reply.get("initscripts", []))
        found, overrides = None, {}
        for i, item in enumerate(reply.get("slivers", [])):
            if not isinstance(item, dict):
                continue
            if item.get("name") == name:
                found = getslivers.parse_sliver(item, f"slivers[{i}]")
            elif item.get("name") == f"{self.cfg.slice_prefix}_default":
                overrides = getslivers.parse_sliver(item, f"slivers[{i}]").attributes
        return found, initscripts, overrides, ts

    async def _bring(self, name: str, why: str) -> None:
        """The reconciler's plan for this one sliver, executed."""
        summary = self.state.summaries().get(name)
        if summary is None:
            return
        live = await self.reconciler.live()
        self.reconciler.sync_grants()
        actions = plan({name: summary}, live, self.reconciler.adopted, [], self.clock(),
                       have_reply=False)
        outcome = await self.reconciler.execute(actions)
        if outcome.failed:
            raise APIFault(FAULT_ERROR, f"{why}: {outcome.failed[0][1]} (the record stays; "
                           "the agent retries)")

    def _delegated(self, rec: SliverRecord | getslivers.SliverSpec, method: str) -> None:
        if rec.instantiation == "delegated":
            return
        if rec.instantiation == "nm-controller":
            raise APIFault(FAULT_BAD_TARGET, f"{method}: {rec.name} is an nm-controller slice: "
                           "it has no sliver")
        raise APIFault(FAULT_BAD_TARGET, f"{method}: {rec.name} is {rec.instantiation}: PLC "
                       "decides where its slivers are (only delegated slivers are created "
                       "and destroyed by call)")

    # -- calls ----------------------------------------------------------------------------

    async def Ticket(self, caller: Caller, *args: Any) -> int:
        """Ticket(ticket): redeem a PLC-signed ticket once: its delegated sliver is
        created on this node (or refreshed). Refused: forged, replayed, expired, for
        other nodes, or not for a delegated slice."""
        if len(args) != 1:
            raise APIFault(FAULT_ARG_COUNT, "Ticket: expected one argument, the ticket")
        try:
            payload, _sig = tickets.split(args[0])
            key = await self.keys.trusted(tickets.claimed_key_id(payload))
            node_id, hostname = self.node()
            now = self.clock()
            ticket = tickets.check(args[0], key, node_id, hostname, now,
                                   self.cfg.plc_clock_skew)
        except tickets.TicketError as exc:
            log.warning("Ticket from %s refused (%s): %s", caller.name, exc.reason, exc)
            raise APIFault(FAULT_TICKET, f"Ticket error: {exc.reason}: {exc}") from None
        spent = self.nonces.redeemed_at(ticket.nonce)
        if spent is not None:
            log.warning("Ticket from %s refused (replayed): nonce of %s redeemed at %s",
                        caller.name, ticket.slice, tickets._when(spent))
            raise APIFault(FAULT_TICKET, f"Ticket error: replayed: this ticket for "
                           f"{ticket.slice} was redeemed at {tickets._when(spent)}")
        spec, initscripts, overrides, reply_ts = self._ticket_spec(ticket)
        self._delegated(spec, "Ticket")
        existing = self.state.get_sliver(spec.name)
        if existing is not None:
            self._delegated(existing, "Ticket")
        try:
            with self.state.transaction() as db:
                self.nonces.record(db, ticket, now)
                admit(self.state, spec, initscripts, self.cfg.default_image, now,
                      self.cfg.sliver_defaults, overrides)
        except sqlite3.IntegrityError:   # redeemed meanwhile by a concurrent call
            raise APIFault(FAULT_TICKET, f"Ticket error: replayed: this ticket for "
                           f"{ticket.slice} was just redeemed") from None
        log.info("Ticket for %s redeemed by %s (nonce %s…, expiry %s)", spec.name, caller.name,
                 ticket.nonce[:8], tickets._when(ticket.expiry))
        self.nonces.collect(now)
        await self._bring(spec.name, f"Ticket: create {spec.name}")
        return 1

    def _ticket_spec(self, ticket: tickets.Ticket) -> tuple[getslivers.SliverSpec,
                                                              dict[str, str], dict[str, str],
                                                              int]:
        body = ticket.body
        items = [s for s in body["slivers"] if isinstance(s, dict)]
        if len(items) != 1 or items[0].get("name") != ticket.slice:
            raise APIFault(FAULT_TICKET, "Ticket error: malformed: a ticket carries the one "
                           "sliver it names")
        try:
            spec = getslivers.parse_sliver(items[0], "ticket.slivers[0]")
        except getslivers.InvalidReply as exc:
            raise APIFault(FAULT_TICKET, f"Ticket error: malformed: {exc}") from None
        initscripts = _initscripts(body["initscripts"])
        newer, reply_scripts, overrides, reply_ts = self._reply_entry(spec.name)
        if ticket.issued < reply_ts:
            # PLC's later word wins over an older ticket's content (spec §4.3 timestamps).
            if newer is None:
                raise APIFault(FAULT_TICKET, f"Ticket error: stale: PLC's reply of "
                               f"{tickets._when(reply_ts)}, newer than this ticket, no longer "
                               f"lists {spec.name}")
            spec, initscripts = newer, reply_scripts
        return spec, initscripts, overrides, reply_ts

    async def Create(self, caller: Caller, *args: Any) -> int:
        """Create(name): instantiate a delegated sliver PLC lists for this node (self,
        a slice its delegations tag names, or the node admin)."""
        name = self._name(caller, args, "Create")
        rec = self.state.get_sliver(name)
        if rec is not None:
            self._delegated(rec, "Create")
            self._authorize(caller, name, rec.spec.get("attributes", {}), "Create")
        else:
            spec, initscripts, overrides, _ts = self._reply_entry(name)
            if spec is None:
                raise APIFault(FAULT_BAD_TARGET, f"Create: PLC's last reply lists no slice "
                               f"{name} for this node (redeem a ticket, or wait for the "
                               "next poll)")
            self._delegated(spec, "Create")
            self._authorize(caller, name, spec.attributes, "Create")
            with self.state.transaction():
                admit(self.state, spec, initscripts, self.cfg.default_image, self.clock(),
                      self.cfg.sliver_defaults, overrides)
        log.info("Create %s by %s", name, caller.name)
        await self._bring(name, f"Create {name}")
        return 1

    async def Destroy(self, caller: Caller, *args: Any) -> int:
        """Destroy(name): remove a delegated sliver (self, delegate or node admin); a
        poll does not make it again."""
        name = self._name(caller, args, "Destroy")
        rec = self._record(name, "Destroy")
        self._delegated(rec, "Destroy")
        self._authorize(caller, name, rec.spec.get("attributes", {}), "Destroy")
        log.info("Destroy %s by %s", name, caller.name)
        outcome = await self.reconciler.execute([Action("destroy", name,
                                                        f"Destroy by {caller.name}")])
        if outcome.failed:
            raise APIFault(FAULT_ERROR, f"Destroy {name}: {outcome.failed[0][1]}")
        return 1

    async def Start(self, caller: Caller, *args: Any) -> int:
        """Start(name): start (thaw) a sliver held by Stop (self, delegate or admin)."""
        return await self._start_stop(caller, args, "start")

    async def Stop(self, caller: Caller, *args: Any) -> int:
        """Stop(name): freeze a sliver until Start (self, delegate or admin)."""
        return await self._start_stop(caller, args, "stop")

    def _record(self, name: str, method: str) -> SliverRecord:
        rec = self.state.get_sliver(name)
        if rec is None:
            raise APIFault(FAULT_BAD_TARGET, f"{method}: no sliver {name!r} on this node")
        return rec

    async def _start_stop(self, caller: Caller, args: tuple[Any, ...], kind: str) -> int:
        method = kind.title()
        name = self._name(caller, args, method)
        rec = self._record(name, method)
        if rec.state == SliverState.CONTROLLER:
            raise APIFault(FAULT_BAD_TARGET, f"{method}: {name} is an nm-controller slice: "
                           "it has no sliver")
        self._authorize(caller, name, rec.spec.get("attributes", {}), method)
        # Held stopped until Start: the reconciles in between must not start it again.
        self.state.set_held(name, kind == "stop")
        outcome = await self.reconciler.execute(
            [Action(kind, name, "stopped by the slice API's Stop until Start"
                    if kind == "stop" else "slice API")])
        if outcome.failed:
            raise APIFault(FAULT_ERROR, f"{kind} {name}: failed; see the agent's log")
        return 1


def _initscripts(items: Any) -> dict[str, str]:
    """GetSlivers' `initscripts` list as name -> script; malformed entries left out."""
    if not isinstance(items, list):
        return {}
    return {i["name"]: i["script"] for i in items if isinstance(i, dict)
            and isinstance(i.get("name"), str) and isinstance(i.get("script"), str)}
