"""An AgentCore on the in-memory broker: retained desired state, presence and the will, as on a real one."""

from __future__ import annotations

from support.memory_broker import MemoryBroker
from tether.agent.core import AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.store import MemoryStore
from tether.protocol import codec, topics
from tether.protocol.models import (
    DesiredState,
    Presence,
    ReportedState,
    ServiceSpec,
    StackDefinition,
    StackRef,
    StackSpec,
)
from tether.protocol.topics import DeviceTopic

DEVICE = "dev-1"


def test_a_core_follows_retained_state_published_before_it_connected() -> None:
    """Desired state and definition retained before the device connects reach its core on CONNACK;
    it runs the stack and reports retained; presence goes online, and the will marks it offline
    (with the session number of that connection) when it drops without DISCONNECT."""
    broker = MemoryBroker()
    controller = broker.client("controller")
    controller.start()
    spec = StackSpec(services=(ServiceSpec(name="app", image="fake:1"),))
    desired = DesiredState(
        device_id=DEVICE, generation=1, stacks=(StackRef(name="web", spec_hash=spec.spec_hash()),)
    )
    controller.publish(
        topics.stack(spec.spec_hash()),
        codec.encode(StackDefinition(spec_hash=spec.spec_hash(), spec=spec)),
        retain=True,
    )
    controller.publish(topics.device(DEVICE, DeviceTopic.DESIRED), codec.encode(desired), retain=True)

    transport = broker.client(f"tether-{DEVICE}")
    core = AgentCore(DEVICE, {}, FakeDriver(DEVICE), MemoryStore(), transport)
    transport.will = core.make_will
    transport.on_connect = core.on_connected
    transport.on_message = lambda topic, payload, retained: core.handle(topic, payload)
    for topic_filter in core.subscriptions():
        transport.subscribe(topic_filter)
    transport.start()
    broker.pump()
    assert core.desired is not None and core.desired.generation == 1
    core.reconcile_once()
    broker.pump()

    reported = codec.decode(broker.retained[topics.device(DEVICE, DeviceTopic.REPORTED)], ReportedState)
    assert reported.generation == 1 and reported.stacks["web"].state == "running"
    presence = codec.decode(broker.retained[topics.device(DEVICE, DeviceTopic.PRESENCE)], Presence)
    assert (presence.status, presence.session) == ("online", core.session)

    session = core.session
    transport.drop()
    broker.pump()
    presence = codec.decode(broker.retained[topics.device(DEVICE, DeviceTopic.PRESENCE)], Presence)
    assert (presence.status, presence.session) == ("offline", session)
    transport.start()  # reconnects: a new session, subscriptions renewed, online again
    broker.pump()
    presence = codec.decode(broker.retained[topics.device(DEVICE, DeviceTopic.PRESENCE)], Presence)
    assert (presence.status, presence.session) == ("online", session + 1)
