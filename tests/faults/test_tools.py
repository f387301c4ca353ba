"""The fault tools themselves: the TCP fault proxy, the NFQUEUE delay daemon, the namespace lab."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.infra import wait_until

from . import nfq_delay
from .faultproxy import FaultProxy
from .netns import NFQ_DELAY, Lab, sh, unavailable_reason


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on loopback; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def proxy(echo: int) -> Iterator[FaultProxy]:
    p = FaultProxy(("127.0.0.1", echo))
    p.start()
    yield p
    p.stop()


def _client(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _round_trip(sock: socket.socket, data: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    assert got == data
    return time.monotonic() - started


def test_proxy_passes_delays_and_throttles(proxy: FaultProxy) -> None:
    """Bytes pass unchanged; a delay is added per direction; a rate limit slows bulk data."""
    with _client(proxy) as sock:
        assert _round_trip(sock) < 0.5
        proxy.set(up_delay_ms=100, down_delay_ms=100)
        assert 0.19 < _round_trip(sock) < 1.0
        proxy.set(up_delay_ms=0, down_delay_ms=0, down_rate_bps=20_000)
        assert _round_trip(sock, b"x" * 10_000) >= 0.45


def test_proxy_partition_holds_bytes_until_heal(proxy: FaultProxy) -> None:
    """A partition stalls open connections (bytes wait, like TCP retransmissions) and hangs
    new ones; healing delivers what waited and closes the hung connections."""
    with _client(proxy) as sock:
        _round_trip(sock)
        proxy.partition()
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        hung = _client(proxy)
        hung.sendall(b"nobody")
        assert proxy.state()["accept"] == "hang"
        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(10) == b"held"
        hung.settimeout(5)
        with pytest.raises(ConnectionResetError):  # closed at heal, never connected upstream
            hung.recv(10)
        hung.close()


def test_proxy_one_way_reset_refuse_and_stall(proxy: FaultProxy) -> None:
    """One direction pauses alone; reset and refuse close connections; an address change
    (stall_existing) silences open connections for good while new ones pass."""
    with _client(proxy) as sock:
        proxy.set(down_paused=True)
        sock.sendall(b"one-way")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.set(down_paused=False)
        sock.settimeout(5)
        assert sock.recv(10) == b"one-way"
        proxy.reset()
        with pytest.raises(OSError):
            for _ in range(50):
                _round_trip(sock)
    proxy.set(accept="refuse")
    with pytest.raises(OSError), _client(proxy) as refused:
        _round_trip(refused)
    proxy.set(accept="pass")
    with _client(proxy) as old:
        _round_trip(old)
        proxy.stall_existing()
        old.sendall(b"lost")
        old.settimeout(0.5)
        with pytest.raises(TimeoutError):
            old.recv(10)
        with _client(proxy) as new:
            assert _round_trip(new) < 1.0


def test_proxy_standalone_http_control(echo: int, tmp_path: Path) -> None:
    """``python3 faultproxy.py`` serves the same faults over an HTTP control port."""
    import urllib.request

    from support.infra import free_port

    listen, control = free_port(), free_port()
    script = Path(__file__).with_name("faultproxy.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--listen", f"127.0.0.1:{listen}", "--upstream", f"127.0.0.1:{echo}",
         "--control", f"127.0.0.1:{control}"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and b"listening" in proc.stdout.readline()

        def get(path: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{control}{path}", timeout=5) as r:
                return r.read().decode()

        assert '"up_delay_ms": 150.0' in get("/set?up_delay_ms=150")
        sock = socket.create_connection(("127.0.0.1", listen), timeout=5)
        with sock:
            assert _round_trip(sock) >= 0.14
        assert '"accept": "hang"' in get("/partition")
        assert '"accept": "pass"' in get("/heal")
    finally:
        proc.terminate()
        proc.wait(10)


def test_nfq_messages_round_trip() -> None:
    """The daemon's netlink framing: a verdict is well formed, a queued packet's id is read."""
    verdict = nfq_delay.verdict_message(7, 42, nfq_delay.NF_ACCEPT)
    length, kind, flags = struct.unpack_from("=IHH", verdict)
    assert length == len(verdict) and kind == (3 << 8) | 1 and flags == 1
    assert struct.unpack_from("!II", verdict, 24) == (nfq_delay.NF_ACCEPT, 42)
    hdr_attr = nfq_delay._attr(nfq_delay.NFQA_PACKET_HDR, struct.pack("!IHB", 99, 0x0800, 1))
    body = struct.pack("=BBH", 2, 0, socket.htons(7)) + hdr_attr
    packet = struct.pack("=IHHII", 16 + len(body), 3 << 8, 0, 0, 0) + body
    ack = struct.pack("=IHHIIi", 36, nfq_delay.NLMSG_ERROR, 0, 0, 0, 0) + b"\0" * 16
    assert nfq_delay.parse_messages(packet + ack) == [
        (nfq_delay.NFQNL_MSG_PACKET, 99),
        (nfq_delay.NLMSG_ERROR, 0),
    ]


def test_nfq_scheduler_keeps_order_and_drops_at_the_rate() -> None:
    """Held packets leave in arrival order even with jitter; loss drops about that share."""
    imp = nfq_delay.Impairment(delay=100, jitter=90, loss=0.0)
    sched = nfq_delay.Scheduler(imp, random.Random(1))
    for i in range(200):
        assert sched.admit(i, now=i * 0.001)
    released = sched.due(now=10.0)
    assert released == list(range(200))
    imp.update({"loss": 0.1, "jitter": 0})
    dropped = sum(not sched.admit(i, now=20.0) for i in range(2000))
    assert 150 < dropped < 250
    assert sched.due(now=20.05) == [] and sched.next_due() == pytest.approx(20.1)


@pytest.fixture
def netns() -> None:
    """Skip without network namespaces (fail instead with TETHER_REQUIRE_NETNS=1)."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("TETHER_REQUIRE_NETNS") == "1":
            pytest.fail(f"TETHER_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)


@pytest.mark.usefixtures("netns")
def test_lab_delays_real_packets_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """A lab with two devices: nfq_delay adds its delay to a TCP handshake between them, a
    partition silences one device; destroy removes namespaces, processes and the guard route."""
    lab = Lab().create()
    try:
        a, b = lab.add_device("a"), lab.add_device("b")
        server = lab.spawn(b.ns, [sys.executable, "-c", _ECHO_SERVER, b.addr], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        connect = [sys.executable, "-c", _CONNECT_TIME, b.addr]
        assert float(lab.ns_sh(a.ns, *connect)) < 0.1
        lab.impair("b", delay_ms=100, loss=0.0, log=tmp_path / "nfq.log")
        assert float(lab.ns_sh(a.ns, *connect)) >= 0.19
        lab.unimpair("b")
        lab.partition("b")
        assert lab.ns_sh(a.ns, *connect, check=False).strip() == "timeout"
        lab.heal("b")
        assert float(lab.ns_sh(a.ns, *connect)) < 0.1
        assert NFQ_DELAY.exists()
    finally:
        namespaces = list(lab.namespaces)
        lab.destroy()
    listed = sh("ip", "netns", "list")
    assert not any(ns in listed for ns in namespaces)
    assert f"{lab.subnet}.0/24" not in sh("ip", "route")
    wait_until(lambda: server.poll() is not None, 5)


_ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7777)); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
_CONNECT_TIME = """
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], 7777), timeout=1.5).close(); print(time.monotonic() - t)
except OSError:
    print("timeout")
"""
