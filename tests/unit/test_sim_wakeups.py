"""A simulated device with nothing waiting on the clock stays out of the fleet's wake-up heap, and
still reconciles when its agent would: at the time it had due if woken before, else from then."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tether.protocol import topics
from tether.sim import Fleet, FleetConfig
from tether.sim.mqtt import CONNACK, publish_packet


class Sink:
    """Stands for a socket: what is written goes nowhere."""

    def write(self, data: bytes) -> None:
        return None

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def is_closing(self) -> bool:
        return False


async def _until(done: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _scenario() -> None:
    fleet = Fleet(FleetConfig(broker="mqtt://127.0.0.1:1", devices=1, reconcile_interval=0.6, seed=3))
    fleet.prepare()
    device = fleet.devices[0]
    device.session.connection_made(Sink())  # type: ignore[arg-type]
    device.session.data_received(bytes((CONNACK, 2, 0, 0)))
    device.kick()
    await _until(lambda: fleet.counters.messages_out >= 2, "the connect messages")
    await _until(lambda: device._parked, "the device parked")
    # Idle after its first reconcile: parked at once, its next reconcile kept, not in the heap.
    assert fleet._wakeups == []
    due = device._idle_due
    assert due is not None and due > fleet.loop.time()
    reconciles = fleet.reconciles

    # A message that asks for no reconcile, before that time: the reconcile due goes into the
    # heap (at the same time) after the loop's round, and happens then (its input changed).
    acked = topics.device(device.device_id, topics.DeviceTopic.ACKED)
    device.session.data_received(publish_packet(acked, b"", 1, False, 1))
    assert not device._parked and fleet._wakeups == []
    await asyncio.sleep(0)
    assert [w[0] for w in fleet._wakeups] == [due] and device._due == due
    await _until(lambda: fleet.reconciles > reconciles, "the reconcile that was due")
    assert fleet.loop.time() >= due - 0.001
    await _until(lambda: device._parked, "the device parked again")
    assert fleet.reconciles == reconciles + 1
    assert fleet._wakeups == [] or all(w[2]._due != w[0] for w in fleet._wakeups)  # only stale ones

    # After the time it had due: scheduled from the message on, as the agent's next round.
    await _until(lambda: fleet.loop.time() > (device._idle_due or 0), "the parked device's due time")
    before = fleet.loop.time()
    device.session.data_received(publish_packet(acked, b"", 1, False, 2))
    assert (
        device._due is not None and before + 0.5 <= device._due <= fleet.loop.time() + 0.7
    )  # interval 0.6 +-10 %
    await _until(lambda: fleet.reconciles > reconciles + 1, "the reconcile after the late message")

    # A kick in the same round supersedes what was due: no entry for it in the heap.
    await _until(lambda: device._parked, "the device parked a third time")
    assert device._idle_due is not None and device._idle_due > fleet.loop.time()
    heap_before = list(fleet._wakeups)
    device.session.data_received(publish_packet(acked, b"", 1, False, 3))
    device.kick()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fleet._wakeups == heap_before or all(w[2]._due != w[0] for w in fleet._wakeups)
    await _until(lambda: device._parked, "the kicked device idle again")
    device.stop()


def test_idle_simulated_device_stays_out_of_the_heap_and_reconciles_when_due() -> None:
    """Parked at once when idle; a message before its due time reconciles it then, after it from then on."""
    asyncio.run(_scenario())
