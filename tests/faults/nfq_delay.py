"""Latency, jitter and loss for packets queued by an NFQUEUE rule (this kernel has no netem).

    ip netns exec NS python3 nfq_delay.py --queue 1 --delay 300 --jitter 0 --loss 0.1 [--ctl FILE] &
    ip netns exec NS iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 1 --queue-bypass
    ip netns exec NS iptables -A INPUT  -i eth0 -j NFQUEUE --queue-num 1 --queue-bypass

Theory of operation
-------------------
Pure standard library: it speaks nfnetlink_queue (``NETLINK_NETFILTER``, subsystem
``NFNL_SUBSYS_QUEUE``) itself. It binds one queue in copy-meta mode (only the packet id
travels to user space, never the payload), with ``NFQA_CFG_F_FAIL_OPEN`` so a full queue
lets packets through instead of dropping them. Each queued packet is either dropped at once
(with probability ``loss``: an ``NF_DROP`` verdict) or held until ``arrival + delay ±
jitter`` and then accepted. Verdicts are issued in arrival order (a due time is never
earlier than the previous one), so TCP sees delay, not reordering. Run it in the same
network namespace as the rule; use ``--queue-bypass`` on the rule so that traffic flows
unimpaired if the daemon dies.

``SIGUSR1`` re-reads ``--ctl`` (JSON with any of ``delay``, ``jitter`` in ms and ``loss``),
so the impairment can change without losing queued packets. ``SIGTERM`` accepts everything
still held, unbinds and exits. It prints ``ready`` on stdout once the queue is bound.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_DROP = 0
NF_ACCEPT = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
QUEUE_MAXLEN = 20000


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def nfq_message(msg_type: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    """One nfnetlink_queue request: nlmsghdr + nfgenmsg (AF_UNSPEC, v0, queue) + attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0)
    return header + body


def verdict_message(queue: int, packet_id: int, verdict: int) -> bytes:
    return nfq_message(
        NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
    )


def parse_messages(data: bytes) -> list[tuple[int, int | None]]:
    """Split a netlink datagram into (message type, packet id or error code) pairs.

    For ``NFQNL_MSG_PACKET`` the second item is the packet id; for ``NLMSG_ERROR`` it is the
    (negative) errno, 0 for an acknowledgement.
    """
    out: list[tuple[int, int | None]] = []
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        end = offset + length
        if msg_type == NLMSG_ERROR:
            out.append((NLMSG_ERROR, struct.unpack_from("=i", data, offset + 16)[0]))
        elif msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packet_id = None
            pos = offset + 16 + 4  # nlmsghdr + nfgenmsg
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if (akind & 0x3FFF) == NFQA_PACKET_HDR:
                    packet_id = struct.unpack_from("!I", data, pos + 4)[0]
                pos += (alen + 3) & ~3
            out.append((NFQNL_MSG_PACKET, packet_id))
        offset += (length + 3) & ~3
    return out


@dataclass
class Impairment:
    """What happens to each packet: dropped with ``loss``, else held ``delay`` ± ``jitter`` ms."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0

    def update(self, values: dict[str, float]) -> None:
        for key in ("delay", "jitter", "loss"):
            if key in values:
                setattr(self, key, float(values[key]))


class Scheduler:
    """Due times for held packets, in arrival order (pure: clock and randomness passed in)."""

    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self.impairment = impairment
        self.rng = rng
        self.held: collections.deque[tuple[float, int]] = collections.deque()
        self._last_due = 0.0

    def admit(self, packet_id: int, now: float) -> bool:
        """Queue ``packet_id``; False if it is to be dropped instead."""
        imp = self.impairment
        if imp.loss > 0 and self.rng.random() < imp.loss:
            return False
        delay = imp.delay + (self.rng.uniform(-imp.jitter, imp.jitter) if imp.jitter else 0.0)
        due = max(now + max(0.0, delay) / 1000.0, self._last_due)
        self._last_due = due
        self.held.append((due, packet_id))
        return True

    def due(self, now: float) -> list[int]:
        """Pop the ids whose time has come."""
        out = []
        while self.held and self.held[0][0] <= now:
            out.append(self.held.popleft()[1])
        return out

    def next_due(self) -> float | None:
        return self.held[0][0] if self.held else None


class NfQueue:
    """One bound nfnetlink queue."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 * 1024 * 1024)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._config(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
        )

    def _config(self, attrs: bytes) -> None:
        self.sock.send(nfq_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for kind, value in parse_messages(self.sock.recv(65536)):
                if kind == NLMSG_ERROR:
                    if value:
                        raise OSError(-value, f"nfnetlink_queue config: {os.strerror(-value)}")
                    return
        raise TimeoutError("nfnetlink_queue did not acknowledge the configuration")

    def receive(self) -> list[int]:
        """Packet ids from one datagram (non-blocking; [] if nothing is waiting)."""
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        return [v for kind, v in parse_messages(data) if kind == NFQNL_MSG_PACKET and v is not None]

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.sock.send(verdict_message(self.queue, packet_id, verdict))

    def close(self) -> None:
        try:
            self.sock.send(
                nfq_message(
                    NFQNL_MSG_CONFIG,
                    self.queue,
                    _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)),
                )
            )
        finally:
            self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number (--queue-num of the rule)")
    parser.add_argument("--delay", type=float, default=0.0, help="milliseconds each packet is held")
    parser.add_argument("--jitter", type=float, default=0.0, help="± milliseconds, uniform")
    parser.add_argument("--loss", type=float, default=0.0, help="probability of dropping a packet")
    parser.add_argument("--ctl", help="JSON file re-read on SIGUSR1")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    impairment = Impairment(args.delay, args.jitter, args.loss)
    scheduler = Scheduler(impairment, random.Random(args.seed))
    nfq = NfQueue(args.queue)
    state = {"stop": False, "reload": False}
    signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: state.update(stop=True))
    signal.signal(signal.SIGUSR1, lambda *_: state.update(reload=True))
    print("ready", flush=True)
    counts = {"accepted": 0, "dropped": 0}
    try:
        while not state["stop"]:
            if state["reload"] and args.ctl:
                state["reload"] = False
                try:
                    with open(args.ctl) as f:
                        impairment.update(json.load(f))
                except (OSError, ValueError) as exc:
                    print(f"cannot reload {args.ctl}: {exc}", file=sys.stderr, flush=True)
            now = time.monotonic()
            for packet_id in scheduler.due(now):
                nfq.verdict(packet_id, NF_ACCEPT)
                counts["accepted"] += 1
            nxt = scheduler.next_due()
            timeout = 0.2 if nxt is None else min(0.2, max(0.0, nxt - now))
            try:
                readable, _, _ = select.select([nfq.sock], [], [], timeout)
            except InterruptedError:
                continue
            if not readable:
                continue
            now = time.monotonic()
            while ids := nfq.receive():
                for packet_id in ids:
                    if not scheduler.admit(packet_id, now):
                        nfq.verdict(packet_id, NF_DROP)
                        counts["dropped"] += 1
    finally:
        for _due, packet_id in scheduler.held:
            nfq.verdict(packet_id, NF_ACCEPT)
        nfq.close()
        print(f"accepted {counts['accepted']} dropped {counts['dropped']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
