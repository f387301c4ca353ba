"""A loopback TCP fault proxy: network faults for one client where namespaces are not available.

    python3 faultproxy.py --listen 127.0.0.1:21883 --upstream 127.0.0.1:1883 --control 127.0.0.1:28474
    curl 'http://127.0.0.1:28474/set?up_delay_ms=200&down_delay_ms=200'   # latency
    curl 'http://127.0.0.1:28474/partition'; curl 'http://127.0.0.1:28474/heal'

In tests it runs in-process: ``FaultProxy(upstream).start()`` returns the port to give the
client, and the methods below change the faults from any thread.

Theory of operation
-------------------
Every accepted connection gets its own connection upstream and two pumps, *up* (client to
upstream) and *down*. A pump reads chunks, stamps each with a due time (``delay ±
jitter``, never earlier than the previous chunk, so bytes stay in order) and delivers them
when due, no faster than ``rate_bps`` bytes per second, and not at all while its direction
is *paused*: bytes wait, as TCP would retransmit them across a cut, and flow again when
the pause ends. An end-of-stream is queued like data, so a close made during a cut reaches
the other side only once the cut heals. What the proxy models:

* ``partition()``: both directions paused, and new connections are accepted but never
  connected upstream (``accept="hang"``): on loopback the handshake always completes, so
  this is the nearest thing to unanswered SYNs. ``heal()`` closes those hung connections
  (as a connect timeout would) and resumes the paused ones.
* one-way: ``set(down_paused=True)`` (or ``up_paused``) plus ``accept="hang"``.
* ``stall_existing()``: every open connection goes silent for good (bytes and closes are
  swallowed both ways) while new connections pass: what a device sees when its address
  changes under an established TCP connection.
* ``reset()``: every open connection is reset; ``set(accept="refuse")``: new ones too.

What it cannot model: packet loss, a changed client address, DNS, carrier loss; use the
network namespaces (netns.py) for those.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, fields
from typing import Any

CHUNK = 16384


@dataclass
class Faults:
    """The proxy's current faults; the defaults are a perfect link."""

    up_delay_ms: float = 0.0
    down_delay_ms: float = 0.0
    up_jitter_ms: float = 0.0
    down_jitter_ms: float = 0.0
    up_rate_bps: float = 0.0
    """Bytes per second client to upstream; 0 means unlimited."""
    down_rate_bps: float = 0.0
    up_paused: bool = False
    down_paused: bool = False
    accept: str = "pass"
    """New connections: ``pass``, ``hang`` (accepted, never connected upstream) or ``refuse``."""

    def update(self, values: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in values:
                raw = values[f.name]
                if f.type in ("bool", bool):
                    value: Any = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
                elif f.type in ("float", float):
                    value = float(raw)
                else:
                    value = str(raw)
                    if f.name == "accept" and value not in ("pass", "hang", "refuse"):
                        raise ValueError(f"accept must be pass, hang or refuse, not {value!r}")
                setattr(self, f.name, value)


class _Pump:
    """One direction of one connection."""

    def __init__(self, proxy: FaultProxy, direction: str, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.direction = direction
        self.writer = writer
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.wakeup = asyncio.Event()
        self.last_due = 0.0
        self.dead = False

    def _faults(self) -> tuple[float, float, float, bool]:
        f = self.proxy.faults
        if self.direction == "up":
            return f.up_delay_ms, f.up_jitter_ms, f.up_rate_bps, f.up_paused
        return f.down_delay_ms, f.down_jitter_ms, f.down_rate_bps, f.down_paused

    def feed(self, data: bytes | None) -> None:
        if self.dead:
            return
        delay, jitter, _rate, _paused = self._faults()
        ms = delay + (self.proxy.rng.uniform(-jitter, jitter) if jitter else 0.0)
        due = max(time.monotonic() + max(0.0, ms) / 1000.0, self.last_due)
        self.last_due = due
        self.queue.append((due, data))
        self.wakeup.set()

    async def deliver(self) -> None:
        while not self.dead:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            due, data = self.queue[0]
            _delay, _jitter, rate, paused = self._faults()
            now = time.monotonic()
            if paused or due > now:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), 0.05 if paused else due - now)
                continue
            self.queue.popleft()
            if data is None:
                with contextlib.suppress(OSError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                return
            if rate > 0:
                for start in range(0, len(data), 512):
                    piece = data[start : start + 512]
                    await asyncio.sleep(len(piece) / rate)
                    self.writer.write(piece)
                    await self.writer.drain()
            else:
                self.writer.write(data)
                await self.writer.drain()


class _Connection:
    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.pumps: list[_Pump] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.hung = False

    def silence(self) -> None:
        for pump in self.pumps:
            pump.dead = True
            pump.queue.clear()
            pump.wakeup.set()

    def abort(self) -> None:
        """Reset both sides (RST rather than FIN)."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """A TCP proxy to ``upstream`` whose faults can be changed while it runs (thread-safe)."""

    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self.listen = listen
        self.faults = Faults()
        self.rng = random.Random()
        self.port = 0
        self.accepted = 0
        self._conns: set[_Connection] = set()
        """Connections the faults apply to (not the silenced ones)."""
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> int:
        """Start listening in a background thread; return the port."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self.port

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._open):
                conn.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _call(self, fn: Any) -> Any:
        """Run ``fn`` on the proxy's loop and return its result."""
        assert self._loop is not None

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    # --- faults ---

    def set(self, **values: Any) -> dict[str, Any]:
        """Change some faults (see :class:`Faults`); returns the new state."""
        return self._call(lambda: self._set(values))  # type: ignore[no-any-return]

    def partition(self) -> None:
        """Silence in both directions: open connections stall, new ones hang."""
        self._call(self._partition)

    def heal(self) -> None:
        """Back to a perfect link: stalled bytes flow, hung connections are closed."""
        self._call(self._heal)

    def reset(self) -> None:
        """Reset every open connection."""
        self._call(self._reset)

    def stall_existing(self) -> None:
        """Open connections go silent for good; new connections pass (an address change)."""
        self._call(self._stall_existing)

    def state(self) -> dict[str, Any]:
        return self._call(self._state)  # type: ignore[no-any-return]

    # The same, on the proxy's loop (the HTTP control calls these directly).

    def _set(self, values: dict[str, Any]) -> dict[str, Any]:
        self.faults.update(values)
        self._wake()
        return self._state()

    def _partition(self) -> None:
        self._set({"up_paused": True, "down_paused": True, "accept": "hang"})

    def _heal(self) -> None:
        self.faults = Faults()
        for conn in list(self._conns):
            if conn.hung:
                conn.abort()
                self._conns.discard(conn)
        self._wake()

    def _reset(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()

    def _stall_existing(self) -> None:
        for conn in list(self._conns):
            conn.silence()
        self._conns.clear()

    def _state(self) -> dict[str, Any]:
        return {**asdict(self.faults), "connections": len(self._conns), "accepted": self.accepted}

    def _wake(self) -> None:
        for conn in self._conns:
            for pump in conn.pumps:
                pump.wakeup.set()

    # --- connections ---

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Connection(self, writer)
        if self.faults.accept == "refuse":
            conn.abort()
            return
        self._conns.add(conn)
        self._open.add(conn)
        if self.faults.accept == "hang":
            conn.hung = True
            with contextlib.suppress(OSError):
                while await reader.read(CHUNK):
                    pass
            self._open.discard(conn)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            conn.abort()
            self._conns.discard(conn)
            self._open.discard(conn)
            return
        conn.upstream = up_writer
        up = _Pump(self, "up", up_writer)
        down = _Pump(self, "down", writer)
        conn.pumps = [up, down]
        loop = asyncio.get_running_loop()
        conn.tasks = [
            loop.create_task(self._read(reader, up)),
            loop.create_task(self._read(up_reader, down)),
            loop.create_task(up.deliver()),
            loop.create_task(down.deliver()),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            self._open.discard(conn)
            for w in (writer, up_writer):
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()

    async def _read(self, reader: asyncio.StreamReader, pump: _Pump) -> None:
        try:
            while data := await reader.read(CHUNK):
                pump.feed(data)
        except OSError:
            pass
        pump.feed(None)


# --- standalone, with an HTTP control port ---------------------------------------------


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _control(proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = (await reader.readline()).decode(errors="replace").split()
        while (await reader.readline()).strip():
            pass
        url = urllib.parse.urlsplit(request[1] if len(request) > 1 else "/")
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        actions = {
            "/set": lambda: proxy._set(params),
            "/partition": proxy._partition,
            "/heal": proxy._heal,
            "/reset": proxy._reset,
            "/stall_existing": proxy._stall_existing,
            "/state": proxy._state,
        }
        if url.path not in actions:
            raise ValueError(f"unknown path {url.path}")
        actions[url.path]()
        body, status = json.dumps(proxy._state()) + "\n", "200 OK"
    except (ValueError, IndexError) as exc:
        body, status = f"{exc}\n", "400 Bad Request"
    writer.write(
        f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to accept clients on")
    parser.add_argument("--upstream", required=True, help="host:port of the real server")
    parser.add_argument("--control", required=True, help="host:port of the HTTP control endpoint")
    args = parser.parse_args(argv)
    proxy = FaultProxy(_addr(args.upstream), _addr(args.listen))

    async def serve() -> None:
        proxy._loop = asyncio.get_running_loop()
        await proxy._start()
        host, port = _addr(args.control)
        await asyncio.start_server(lambda r, w: _control(proxy, r, w), host, port)
        print(f"listening on {proxy.listen[0]}:{proxy.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
