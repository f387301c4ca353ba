"""``tether``: start the controller (``tether up``) and operate the fleet.

This is the root group only: each resource's commands live in a module of their own
(cli/devices.py, cli/stacks.py, ...) that registers them here. Every command except ``up``
and ``mosquitto-config`` talks to the controller over MQTT (see docs/topics.md), through
the broker given by ``--broker`` or ``TETHER_BROKER``.

A module is imported only when one of its commands is used (:data:`COMMANDS`): operators
run the CLI constantly, and importing every module (their command and reply models) cost
each call more than the command itself (docs/performance.md, "Sixth pass: the CLI").
"""

from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, tuple[str, ...]] = {
    "up": ("up",),  # tether up, tether mosquitto-config (cli/up.py)
    "mosquitto-config": ("up",),
    "devices": ("devices", "remote", "enroll"),  # tether devices (cli/devices.py; restart|facts|top
    # from cli/remote.py, pending|approve|reject from cli/enroll.py)
    "groups": ("groups",),
    "jobs": ("jobs",),
    "deployments": ("deployments",),
    "stacks": ("stacks",),
    "logs": ("devices", "remote"),  # cli/remote.py (which adds to the devices group)
    "tokens": ("devices", "enroll"),  # cli/enroll.py (which adds to the devices group)
    "vars": ("variables",),
    "registries": ("registries",),
    "login": ("contexts",),  # tether login, tether context (cli/contexts.py)
    "context": ("contexts",),
    "notify": ("notify",),
    "users": ("users",),
    "audit": ("audit",),
}
"""Each command of the root group: the modules of this package whose ``register(main)``
builds it, in order (tests/unit/test_cli_lazy.py checks this against what they register)."""


class _Root(click.Group):
    """The root group: a command's modules are imported and registered on first use."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.registered: set[str] = set()

    def register(self, module: str) -> None:
        """Import ``cli/<module>.py`` and add its commands (once)."""
        if module not in self.registered:
            self.registered.add(module)
            importlib.import_module(f"{__package__}.{module}").register(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for module in COMMANDS.get(cmd_name, ()):
            self.register(module)
        return self.commands.get(cmd_name)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tether", prog_name="tether")
def main() -> None:
    """Tether: run Compose stacks on fleets of edge devices over MQTT."""


if __name__ == "__main__":  # pragma: no cover
    main()
