"""The simulator's shortcuts leave the bytes its devices send unchanged (fixed seed and clock)."""

from __future__ import annotations

import asyncio
import time

from tether.protocol import codec, topics
from tether.protocol.models import DesiredState, ServiceSpec, StackDefinition, StackRef, StackSpec
from tether.sim import Fleet, FleetConfig, hashcache
from tether.sim.mqtt import CONNACK, publish_packet


class Recording:
    """Stands for a socket: keeps every byte written."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def is_closing(self) -> bool:
        return False


def _stack(version: int) -> StackSpec:
    return StackSpec(
        services=(
            ServiceSpec(name="web", image=f"nginx:1.{version}", environment={"V": str(version)}),
            ServiceSpec(name="worker", command=("sleep", "1000"), restart="always"),
        )
    )


async def _run(devices: int) -> list[bytes]:
    """Connect ``devices`` simulated devices to recording transports, deliver two deploys
    (desired state, then its stack definition, as a controller publishes them), and return
    what each device wrote: its CONNECT, subscriptions, presence, events and reports."""
    fleet = Fleet(
        FleetConfig(broker="mqtt://127.0.0.1:1", devices=devices, seed=7, start_delay=0, start_jitter=0)
    )
    ticks = iter(range(1_000_000))
    fleet.clock = lambda: 1_700_000_000.0 + next(ticks)
    fleet.prepare()
    wires = []
    for device in fleet.devices:
        wire = Recording()
        wires.append(wire)
        wire.write(device.session.connect_packet())
        device.session.connection_made(wire)  # type: ignore[arg-type]
        device.session.data_received(bytes((CONNACK, 2, 0, 0)))
        device.kick()

    async def settle(done: object) -> None:
        deadline = time.monotonic() + 20
        while not done():  # type: ignore[operator]
            assert time.monotonic() < deadline, "the simulated devices did not settle in 20 s"
            await asyncio.sleep(0.01)

    await settle(lambda: fleet.counters.messages_out >= 2 * devices)
    assert fleet.connected() == devices
    for generation in (1, 2):
        spec = _stack(generation)
        definition = codec.encode(StackDefinition(spec_hash=spec.spec_hash(), spec=spec))
        for device in fleet.devices:
            desired = DesiredState(
                device_id=device.device_id,
                generation=generation,
                stacks=(StackRef(name="app", spec_hash=spec.spec_hash()),),
            )
            topic = topics.device(device.device_id, topics.DeviceTopic.DESIRED)
            device.session.data_received(publish_packet(topic, codec.encode(desired), 1, True, 1))
            device.session.data_received(
                publish_packet(topics.stack(spec.spec_hash()), definition, 1, True, 2)
            )
        await settle(lambda g=generation: all(d.done_at(g) is not None for d in fleet.devices))
    for device in fleet.devices:
        device.stop()
    assert fleet.connected() == 0
    await asyncio.sleep(0)
    return [bytes(w.written) for w in wires]


def test_simulated_devices_send_the_same_bytes_with_and_without_the_shortcuts() -> None:
    """Stack definitions decoded once per payload (hashcache) change no byte a device sends."""
    was = hashcache.installed()
    try:
        hashcache.install()
        fast = asyncio.run(_run(3))
        hashcache.uninstall()
        assert not hashcache.installed()
        plain = asyncio.run(_run(3))
    finally:
        (hashcache.install if was else hashcache.uninstall)()
    assert all(w.count(b"desired.accepted") == 2 and b"service.created" in w for w in plain)  # both applied
    assert len({w[:40] for w in plain}) == 3  # each device its own CONNECT
    assert fast == plain
