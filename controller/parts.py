"""The controller's parts, wired together once: :func:`build_context`.

The :class:`~.service.Controller` builds its :class:`~.context.Context` with it, and so do the
fast unit tests (tests/unit/conftest.py), which call handlers on the same parts without a
controller: a real store, a transport that records, a clock moved by hand. What the
controller alone has (its inbox, its MQTT session, whether it leads) comes in as callables
and the ``leading`` event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from tether.protocol.credentials import CredentialTable
from tether.protocol.transport import Transport

from .context import Context
from .deploying import Deployer
from .fleet_events import DueEvents
from .ingesting import MAX_METRICS_DEVICES
from .metrics_history import MetricsHistory
from .notify import Notifier
from .observability import Metrics
from .publishing import Publisher
from .registries import RegistryCredentials
from .scheduling import Scheduler
from .security import BrokerAccess
from .store import Store
from .variables import SecretsKey, VariableBindings


def build_context(
    store: Store,
    *,
    clock: Callable[[], float],
    client: Callable[[], Transport | None],
    leading: threading.Event,
    metrics: Metrics | None = None,
    secrets: SecretsKey | None = None,
    table: CredentialTable | None = None,
    busy: Callable[[], bool] = lambda: False,
) -> Context:
    """The parts a controller's command handlers use, on ``store``.

    ``client``: the MQTT session now (None before it starts); ``leading``: set while this
    controller leads (only the leader schedules and publishes); ``metrics``: where the
    publisher counts (a fresh registry without one); ``secrets``: the key pair secrets are
    sealed to (None: secrets are refused); ``table``: the embedded broker's credentials, kept
    in sync; ``busy``: whether device messages are queued (the publisher defers its repairs)."""
    variables = VariableBindings(store, secrets)
    registries = RegistryCredentials(store, secrets)
    access = BrokerAccess(table)
    events = DueEvents(clock)
    scheduler = Scheduler(store, clock=clock, leading=leading, variables=variables, registries=registries)
    context: Context  # the publisher and the deployer sync through it, once built
    publisher = Publisher(
        store,
        clock=clock,
        metrics=Metrics() if metrics is None else metrics,
        access=access,
        client=client,
        leading=leading,
        fleet_view=scheduler.fleet_view,
        busy=busy,
        recompute=lambda: context.sync_now(),
    )
    deployer = Deployer(
        store, clock=clock, scheduler=scheduler, sync=lambda: context.sync(), note=events.deployment
    )
    device_metrics: dict[str, dict[str, Any]] = {}
    context = Context(
        store=store,
        clock=clock,
        scheduler=scheduler,
        publisher=publisher,
        deployer=deployer,
        events=events,
        variables=variables,
        registries=registries,
        access=access,
        notifier=Notifier(store, secrets, clock),
        secrets=secrets,
        device_metrics=device_metrics,
        device_history=MetricsHistory(MAX_METRICS_DEVICES),
    )
    return context
