"""The fleet event bus (controller/fleet_events.py) as server-sent events.

Each subscriber gets a thread of its own that waits on its bounded subscription and hands
events to the asyncio loop, so a waiting stream holds neither the event loop nor a worker
of a shared thread pool (FastAPI's runs the blocking authentication). An overflow reaches
the client as an ``events.lost`` event: it must re-read state.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Collection
from typing import Any

from fastapi import Request
from fastapi.sse import format_sse_event
from tether.controller.fleet_events import EventBus, FleetEvent

KEEPALIVE_S = 15.0
"""A comment line this often keeps proxies from closing a quiet stream (and finds a gone client)."""
MAX_STREAMS = 64
"""Event streams open at once, at most (each holds a thread and a queue)."""
QUEUE_SIZE = 1000
"""Events kept for a slow client before the oldest are dropped (it is told: ``events.lost``)."""

_open = 0
_open_lock = threading.Lock()


class TooManyStreams(Exception):
    pass


async def fleet_stream(
    request: Request, bus: EventBus, kinds: Collection[str] | None = None
) -> AsyncIterator[bytes]:
    """``bus``'s events from now on (of ``kinds``, or all) as SSE bytes, until the client goes.

    Raises :class:`TooManyStreams` (before anything is sent) past :data:`MAX_STREAMS`. The
    subscription and its thread exist only while the stream is iterated (a response that is
    never sent leaves nothing behind)."""
    with _open_lock:
        if _open >= MAX_STREAMS:
            raise TooManyStreams(f"{MAX_STREAMS} event streams are open already")

    async def stream() -> AsyncIterator[bytes]:
        global _open
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[FleetEvent | None] = asyncio.Queue()
        with _open_lock:
            _open += 1
        subscription = bus.subscribe(maxsize=QUEUE_SIZE, kinds=kinds)

        def pump() -> None:
            while not subscription.closed:
                event = subscription.get(KEEPALIVE_S)
                if subscription.closed:
                    return
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # the loop is closed: the server stopped
                    return

        try:
            threading.Thread(target=pump, name="http-events", daemon=True).start()
            yield format_sse_event(retry=2000, comment="tether fleet events")
            while not await request.is_disconnected():
                event = await queue.get()
                if event is None:
                    yield format_sse_event(comment="keep-alive")
                    continue
                data: dict[str, Any] = event.to_json()
                yield format_sse_event(
                    data_str=json.dumps(data, separators=(",", ":")),
                    event=event.kind,
                    id=str(event.seq) if event.seq else None,
                )
        finally:
            bus.unsubscribe(subscription)  # closes it: the pump returns within KEEPALIVE_S
            with _open_lock:
                _open -= 1

    return stream()
