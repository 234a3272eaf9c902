"""Background tasks asked for before the nursery that runs them exists.

A part built by `agent.main.build` (say, Accounts for initscripts) is given a
`BackgroundTasks` at construction; the agent's run starts `serve` in its nursery. No
part is handed a nursery after it is built."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("agent.tasks")

QUEUE = 4096   # tasks asked for and not yet started; more are refused (logged)


class BackgroundTasks:
    def __init__(self, queue: int = QUEUE) -> None:
        self._send, self._recv = trio.open_memory_channel[
            tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], str]](queue)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        """Run `fn(*args)` as a task of `serve`'s nursery; never blocks."""
        try:
            self._send.send_nowait((fn, args, name))
        except trio.WouldBlock:
            log.error("background task %s refused: %d tasks already wait", name,
                      self._send.statistics().current_buffer_used)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for fn, args, name in self._recv:
                nursery.start_soon(fn, *args, name=name)
