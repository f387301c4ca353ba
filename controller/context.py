"""What a command handler may use of the running controller: :class:`Context`.

Handlers are plain functions ``handler(ctx, command) -> result`` grouped by domain
(controller/groups.py, ...), registered once in their module's
:class:`~.registry.CommandRegistry`. They reach the controller only through this
interface: the state store, the clock, the leader's in-memory view, and the scheduling that turns stored changes into
published desired states. :class:`~.service.Controller` implements it, delegating scheduling
to its :class:`~.scheduling.Scheduler` and publishing to its :class:`~.publishing.Publisher`; a unit test passes
a controller on a real SQLite store with a recording publisher (tests/unit/).

Writing a handler: read and validate first (raise a ``TetherError`` naming what is wrong,
before anything is written), then write inside ``ctx.store.transaction()`` and call
``ctx.recompute()`` in the same transaction when devices' desired states may change, then
``ctx.publish_pending()`` once it is committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tether.protocol.errors import NotFoundError

from .fleet import Seen
from .metrics_history import MetricsHistory
from .models import Stack
from .rollout import Deployment, Strategy
from .store import Store

T = TypeVar("T")

if TYPE_CHECKING:  # variables.py registers its handlers, which take a Context
    from .notify import Notifier
    from .registries import RegistryCredentials
    from .security import BrokerAccess
    from .variables import SecretsKey, VariableBindings


class Context(Protocol):
    """The controller, as its command handlers see it (see the module docstring)."""

    store: Store
    clock: Callable[[], float]
    """Wall-clock seconds (injected: tests move it by hand)."""
    device_metrics: dict[str, dict[str, Any]]
    """The latest metrics sample of each device (in memory, on the leader only)."""
    device_history: MetricsHistory
    """Each device's recent usage, downsampled (in memory, on the leader only)."""
    secrets: SecretsKey | None
    """The key pair secrets are sealed to (None: secrets are refused)."""
    variables: VariableBindings
    """The variables, as desired states bind them (cached; forget() after a change)."""
    registries: RegistryCredentials
    """The private registries' credentials, as desired states carry them (cached likewise)."""
    access: BrokerAccess
    """Who may connect, as the broker sees it: mirror credential and token changes there."""
    notifier: Notifier
    """The webhooks' notifier (controller/notify.py): forget() after a webhook changed."""

    def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Publish a retained message (QoS 1) and wait for the broker; False if it was not
        acknowledged or there is no connection."""

    def recompute(self, device_ids: set[str] | None = None) -> None:
        """Give every device (of ``device_ids``) whose stacks, jobs or bindings changed the next
        generation, in the caller's transaction."""

    def publish_pending(self, device_ids: set[str] | None = None) -> None:
        """Publish what the broker does not have yet (after the transaction is committed)."""

    def sync(self, device_ids: set[str] | None = None) -> None:
        """:meth:`recompute` in a transaction of its own, then :meth:`publish_pending`."""

    def update_placements(self) -> None:
        """Place every ``replicas`` stack again where its assignment changed (in the caller's transaction)."""

    def fleet_view(self) -> dict[str, Seen]:
        """Every device as deployment steps see it (kept in memory, re-read where written)."""

    def start_deployment(self, stack: Stack, from_hash: str | None, strategy: Strategy) -> Deployment:
        """Start the deployment of ``stack``'s current version (in the caller's transaction)."""

    def advance_deployments(self, force: bool = True) -> None:
        """Step every active deployment now; store, revert and publish what changed."""

    def emit(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        """Emit a fleet event (controller/fleet_events.py) once the current change is committed."""

    def note_deployment(self, before: Deployment | None, after: Deployment) -> None:
        """Emit the fleet event of a deployment that started or changed state."""

    def targets(self, stack: Stack) -> list[str]:
        """The devices ``stack`` goes to (its group's eligible members, or its replicas' devices)."""


def require(value: T | None, what: str, key: object, hint: str = "") -> T:
    """``value``, what a lookup of ``what`` ``key`` returned; a :class:`NotFoundError`
    ("unknown {what} {key!r}", then ``hint``) when it is None: a handler's one way of
    refusing a name that names nothing, e.g. ``require(ctx.store.get_group(name), "group", name)``."""
    if value is None:
        raise NotFoundError(f"unknown {what} {key!r}{hint}")
    return value
