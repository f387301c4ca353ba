"""A controller and two agent cores on the in-memory broker: a whole deploy, in-process, in seconds."""

from __future__ import annotations

import time
from pathlib import Path

from support.memory_broker import MemoryBroker, MemoryTransport
from tether.agent.core import AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.request_gate import subscription_qos
from tether.agent.store import MemoryStore
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.controller.variables import SecretsKey
from tether.protocol.commands import (
    DeploymentsStatus,
    DevicesList,
    GroupsCreate,
    RolloutStrategy,
    StacksDeploy,
)
from tether.protocol.mqtt import BrokerAddress
from tether.protocol.principals import INTERNAL
from tether.protocol.results import DeploymentView


def device(broker: MemoryBroker, device_id: str) -> tuple[AgentCore, MemoryTransport]:
    """An agent core wired to its transport as agent/runner.py wires it to paho."""
    transport = broker.client(f"tether-{device_id}")
    core = AgentCore(device_id, {"role": "web"}, FakeDriver(device_id), MemoryStore(), transport)
    transport.will = core.make_will
    transport.on_connect = core.on_connected
    transport.on_message = lambda topic, payload, retained: core.handle(topic, payload)
    for topic_filter in core.subscriptions():
        transport.subscribe(topic_filter, subscription_qos(topic_filter))
    transport.start()
    return core, transport


def test_a_deploy_reaches_agent_cores_through_the_transport_seam(tmp_path: Path) -> None:
    """The controller (its worker thread, its real SQLite store) and two agent cores talk only
    through Transports on one in-memory broker: a selector group fills from presence, deploys
    publish definitions and desired states, the cores run the stack and report, and each
    deployment succeeds with every device on its version; the update rolls one device at a time."""
    broker = MemoryBroker()
    store = Store(tmp_path / "tether.db")
    controller = Controller(store, secrets=SecretsKey.load_or_create(tmp_path))
    controller.start(BrokerAddress("memory", 0), fresh_broker=True, transport=broker.client("controller"))
    try:
        cores = [device(broker, f"dev-{i}") for i in range(2)]

        def online() -> list[str]:
            found = controller.submit(DevicesList(), INTERNAL).result(10)
            return sorted(d.id for d in found.devices if d.status == "online")

        deadline = time.monotonic() + 30
        while online() != ["dev-0", "dev-1"]:  # their presence, through the broker
            assert time.monotonic() < deadline, f"online: {online()}"
            broker.pump()
            time.sleep(0.05)
        controller.submit(
            GroupsCreate(name="web", selector="role=web", trust_device_labels=True), INTERNAL
        ).result(10)
        strategy = RolloutStrategy(kind="rolling", max_parallel=1, min_healthy_time_s=0)

        def converge(deployment_id: int) -> DeploymentView:
            deadline = time.monotonic() + 30
            while True:
                view = controller.submit(DeploymentsStatus(id=deployment_id), INTERNAL).result(10).deployment
                if view.state == "succeeded":
                    return view
                assert time.monotonic() < deadline, f"deployment {deployment_id} still {view.state}"
                broker.pump()
                for core, _transport in cores:
                    core.reconcile_once()
                broker.pump()
                time.sleep(0.05)  # the controller's worker handles what was pumped to it

        for deployment_id, image in ((1, "fake:1"), (2, "fake:2")):
            compose = f"services:\n  web:\n    image: {image}\n"
            controller.submit(
                StacksDeploy(name="site", group="web", compose=compose, strategy=strategy), INTERNAL
            ).result(10)
            view = converge(deployment_id)
            rows = view.devices or {}
            assert {d: r["state"] for d, r in rows.items()} == {"dev-0": "healthy", "dev-1": "healthy"}
            for core, _transport in cores:
                assert core.desired is not None and [r.name for r in core.desired.stacks] == ["site"]
                running = [i for i in core.driver.observe() if i.state == "running"]
                assert [i.service for i in running] == ["web"]
                spec = core.specs[core.desired.stacks[0].spec_hash]
                assert (
                    spec.services[0].image == image and running[0].spec_hash == spec.services[0].spec_hash()
                )
        assert sorted(r["batch"] for r in rows.values()) == [1, 2]  # the update rolled one device at a time
    finally:
        controller.stop()
        store.close()
