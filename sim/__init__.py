"""The fleet simulator: thousands of agents in one process, each with its own MQTT session.

Every simulated device runs the agent's real :class:`~tether.agent.core.AgentCore` (its
protocol, reconcile and reporting code) with an in-memory store (:mod:`.store`)
and a simulated runtime driver (:mod:`.driver`). What is simulated is only the runtime
and the socket plumbing: :mod:`.mqtt` multiplexes one MQTT 3.1.1 session per device on
one asyncio event loop. ``tether-sim`` (:mod:`.main`) is the command line; the
benchmarks in ``bench/`` drive :class:`.fleet.Fleet` in-process.
"""

from .driver import SimDriver
from .fleet import Fleet, FleetConfig, FleetThread, SimDevice

__all__ = ["Fleet", "FleetConfig", "FleetThread", "SimDevice", "SimDriver"]
