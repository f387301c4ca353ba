"""AgentCore.next_wakeup: when the runner and the simulator reconcile next."""

from __future__ import annotations

from support.links import RecordingLink
from support.recording import Clock
from tether.agent.core import FAST_INTERVAL, AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.store import MemoryStore
from tether.protocol import codec, topics
from tether.protocol.models import DesiredState, ServiceSpec, StackDefinition, StackRef, StackSpec
from tether.protocol.topics import DeviceTopic


def test_fast_while_a_start_is_watched_then_the_interval() -> None:
    """Idle: after reconcile_interval; at once when woken; every FAST_INTERVAL for a minute after an
    instance started (a crash is then reported at once); back to the interval afterwards."""
    clock = Clock()
    core = AgentCore(
        "d", {}, FakeDriver("d"), MemoryStore(), RecordingLink(), clock=clock, reconcile_interval=7.0
    )
    core.reconcile_once()
    now = clock()
    assert core.next_wakeup(now) == now + 7.0
    spec = StackSpec(services=(ServiceSpec(name="web", image="fake:1"),))
    core.handle(
        topics.device("d", DeviceTopic.DESIRED),
        codec.encode(
            DesiredState(
                device_id="d", generation=1, stacks=(StackRef(name="s", spec_hash=spec.spec_hash()),)
            )
        ),
    )
    core.handle(
        topics.stack(spec.spec_hash()), codec.encode(StackDefinition(spec_hash=spec.spec_hash(), spec=spec))
    )
    assert core.next_wakeup(now) == now  # woken: the new desired state is applied at once
    core.reconcile_once()
    assert core.next_wakeup(now) == now + FAST_INTERVAL
    clock.now += 61
    core.reconcile_once()
    assert core.next_wakeup(clock()) == clock() + 7.0
