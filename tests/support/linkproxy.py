"""A narrow, breakable link on loopback: a TCP proxy with a rate limit, a byte count and cuts.

Used between a registry and what pulls from it (the agent, or dockerd for the baseline) in
tests and in ``bench/update_over_weak_link.py``. The downstream (upstream server to client)
direction is limited to ``rate`` bytes/s with a token bucket shared by every connection, as
one link would be; :attr:`LinkProxy.down_bytes` counts what crossed it. :meth:`cut` resets
every open connection and refuses new ones (each is reset at once) until :meth:`heal`:
what a device sees when its uplink drops. It runs an asyncio loop on its own thread; bind
port 0, read :attr:`port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time


class LinkProxy:
    """``127.0.0.1:port`` -> ``upstream`` (host, port), shaped. Use as a context manager."""

    def __init__(self, upstream: tuple[str, int], rate: float | None = None, chunk: int = 16 * 1024) -> None:
        self.upstream = upstream
        self.rate = rate
        self.chunk = chunk
        self.port = 0
        self.down_bytes = 0
        self.up_bytes = 0
        self.connections = 0
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-proxy", daemon=True)
        self._tokens = 0.0
        self._at = time.monotonic()

    def __enter__(self) -> LinkProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                _reset(writer)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def cut(self) -> None:
        """The link drops: every connection reset, new ones refused until :meth:`heal`."""

        async def go() -> None:
            self._cut = True
            for writer in list(self._writers):
                _reset(writer)

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    def heal(self) -> None:
        self._cut = False

    async def _take(self, n: int) -> None:
        while self.rate:
            now = time.monotonic()
            burst = max(self.rate / 10, self.chunk)
            self._tokens = min(burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= n:
                self._tokens -= n
                return
            await asyncio.sleep((n - self._tokens) / self.rate)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _reset(writer)
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            try:
                while not self._cut:
                    data = await src.read(self.chunk)
                    if not data or self._cut:
                        break
                    if down:
                        await self._take(len(data))
                        if self._cut:
                            break
                        self.down_bytes += len(data)
                    else:
                        self.up_bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if self._cut:
                    _reset(dst)
                else:
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        finally:
            self._writers -= {writer, up_writer}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dropped link looks to the other end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
