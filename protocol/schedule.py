"""Cron expressions (5 fields, UTC), shared by the controller (validation) and the agent. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

from cronsim import CronSim, CronSimError


def cron_error(expression: str) -> str | None:
    """Why ``expression`` is not a valid 5-field cron expression, or None."""
    try:
        CronSim(expression, datetime.now(UTC))
    except CronSimError as exc:
        return str(exc)
    return None


def next_cron(expression: str, after: float) -> float:
    """The first time matching ``expression`` strictly after ``after`` (UTC epoch seconds)."""
    return next(CronSim(expression, datetime.fromtimestamp(after, UTC))).timestamp()
