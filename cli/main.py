"""``tether``: start the controller (``tether up``) and operate the fleet.

This is the root group only: each resource's commands live in a module of their own
(cli/devices.py, cli/stacks.py, ...) that registers them here. Every command except ``up``
and ``mosquitto-config`` talks to the controller over MQTT (see docs/topics.md), through
the broker given by ``--broker`` or ``TETHER_BROKER``.
"""

from __future__ import annotations

import click
from tether.protocol import __version__

from . import (
    audit,
    contexts,
    deployments,
    devices,
    enroll,
    groups,
    jobs,
    notify,
    registries,
    remote,
    stacks,
    up,
    users,
    variables,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tether")
def main() -> None:
    """Tether: run Compose stacks on fleets of edge devices over MQTT."""


up.register(main)  # tether up, tether mosquitto-config (cli/up.py)
devices.register(main)  # tether devices (cli/devices.py)
groups.register(main)  # tether groups (cli/groups.py)
jobs.register(main)  # tether jobs (cli/jobs.py)
deployments.register(main)  # tether deployments (cli/deployments.py)
stacks.register(main)  # tether stacks (cli/stacks.py)
remote.register(main)  # tether logs, tether devices restart|facts|top (cli/remote.py)
enroll.register(main)  # tether tokens, tether devices pending|approve|reject (cli/enroll.py)
variables.register(main)  # tether vars (cli/variables.py)
registries.register(main)  # tether registries (cli/registries.py)
contexts.register(main)  # tether login, tether context (cli/contexts.py)
notify.register(main)  # tether notify (cli/notify.py)
users.register(main)  # tether users (cli/users.py)
audit.register(main)  # tether audit (cli/audit.py)

if __name__ == "__main__":  # pragma: no cover
    main()
