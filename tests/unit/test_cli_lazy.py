"""The CLI's root group imports a command's module on first use: its table matches what the modules register."""

from __future__ import annotations

import importlib

import click
from click.testing import CliRunner
from tether.cli import main as cli_main


def eager() -> click.Group:
    """The root group as it was built before: every module's ``register`` called up front."""
    root = cli_main.main
    group = click.Group("main", params=root.params, help=root.help, context_settings=root.context_settings)
    for module in dict.fromkeys(m for modules in cli_main.COMMANDS.values() for m in modules):
        importlib.import_module(f"tether.cli.{module}").register(group)
    return group


def test_the_table_names_every_command_the_modules_register() -> None:
    """COMMANDS lists exactly the root commands the modules add, and each command's modules
    build it whole (the same subcommands as with every module registered)."""
    full = eager()
    assert sorted(full.commands) == sorted(cli_main.COMMANDS)
    for name, modules in cli_main.COMMANDS.items():
        alone = click.Group("main")
        for module in modules:
            importlib.import_module(f"tether.cli.{module}").register(alone)
        assert alone.commands[name] is full.commands[name]
        if isinstance(full.commands[name], click.Group):
            assert sorted(alone.commands[name].commands) == sorted(full.commands[name].commands)  # type: ignore[attr-defined]


def test_help_and_errors_are_what_the_eager_group_printed() -> None:
    """`tether --help`, every root command's --help and an unknown command print the same as
    the eagerly built group (the lazy root changes when modules load, nothing shown)."""
    runner = CliRunner()
    full = eager()
    for args in (["--help"], ["nosuch"], *([name, "--help"] for name in cli_main.COMMANDS)):
        lazy = runner.invoke(cli_main.main, args)
        before = runner.invoke(full, args)
        assert (lazy.exit_code, lazy.output) == (before.exit_code, before.output), args
