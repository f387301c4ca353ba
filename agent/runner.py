"""The real agent: an :class:`~.core.AgentCore` driven by one thread and one MQTT session.

The MQTT client thread only puts incoming messages on :attr:`Agent.inbox`; the thread in
:meth:`Agent.run` owns the core and calls it for messages, connects and reconcile ticks
(when :meth:`~.core.AgentCore.next_wakeup` says, or at once when the core asks).
"""

from __future__ import annotations

import logging
import platform
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tether.protocol import codec
from tether.protocol import labels as label_rules
from tether.protocol.models import JobResult, JobSpec
from tether.protocol.mqtt import MqttClient

from . import remote, request_gate
from .config import AgentConfig
from .core import AgentCore
from .drivers.base import Driver
from .enroll import load_or_create_key
from .jobs import run_host_command, run_job
from .store import LocalStore

if TYPE_CHECKING:
    from .staging import ImageStager

log = logging.getLogger(__name__)

_CONNECTED = "\x00connected"
_JOB = "\x00job"
_WAKE = "\x00wake"
LABELS_TIMEOUT = 10.0
HOLD_FILE = "hold"
"""While ``{data_dir}/hold`` exists, the device applies no new desired state."""


def make_stager(config: AgentConfig, driver: Driver, on_change: Callable[[], None]) -> ImageStager | None:
    """The image stager for a driver that runs images (the docker driver), else None."""
    if not hasattr(driver, "load_image"):
        return None  # the process driver: no registry client (requests) loaded
    from .registry import Platform
    from .staging import ImageEngine, ImageStager

    engine: ImageEngine = driver  # type: ignore[assignment]
    return ImageStager(
        config.data_dir / "images",
        engine,
        platform=Platform.from_machine(platform.machine()),
        rate_limit=config.download_rate(),
        insecure=frozenset(config.insecure_registries),
        on_change=on_change,
    )


class Agent:
    """A device agent: one MQTT session, one driver, one local store."""

    def __init__(self, config: AgentConfig, driver: Driver) -> None:
        self.config = config
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        username, password = config.credentials()
        self.client = MqttClient(
            config.broker_addresses(),
            client_id=f"tether-{config.device_id}",
            clean_session=False,
            keepalive=config.keepalive,
            will=lambda: self.core.make_will(),
            on_message=lambda topic, payload, retained: self.inbox.put((topic, payload)),
            on_connect=lambda: self.inbox.put((_CONNECTED, b"")),
            username=username,
            password=password,
            ca_file=str(config.ca_file) if config.ca_file else None,
            client_cert=config.client_cert(),
        )
        hold_file = config.data_dir / HOLD_FILE
        self.images = make_stager(config, driver, lambda: self.inbox.put((_WAKE, b"")))
        self.core = AgentCore(
            config.device_id,
            config.labels,
            driver,
            LocalStore(config.data_dir),
            self.client,
            is_held=hold_file.exists,
            key=load_or_create_key(config.data_dir),
            keepalive=config.keepalive,
            images=self.images,
            host_access=config.host_access,
            reconcile_interval=config.reconcile_interval,
        )
        self.core.launch_job = self._launch_job
        self.metrics = remote.attach(self.core, config)  # remote operations and device metrics
        for topic_filter in self.core.subscriptions():
            self.client.subscribe(topic_filter, request_gate.subscription_qos(topic_filter))
        self.stopped = threading.Event()

    def refresh_labels(self) -> None:
        """Run the labels command; merge its ``key=value`` lines over the configured labels."""
        command = self.config.labels_command
        if not command:
            return
        try:
            result = subprocess.run(
                ["/bin/sh", "-c", command],
                capture_output=True,
                text=True,
                timeout=LABELS_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("labels command failed: %s", exc)
            return
        if result.returncode != 0:
            log.warning("labels command exited with %d: %s", result.returncode, result.stderr.strip()[:200])
            return
        labels = dict(self.config.labels)
        for line in result.stdout.splitlines():
            if not line.strip():
                continue
            try:
                labels.update(label_rules.parse([line]))
            except ValueError as exc:
                log.warning("labels command: ignoring %r: %s", line[:80], exc)
        self.core.set_labels(labels)

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then say goodbye (``offline``) and disconnect."""
        self.refresh_labels()
        self.client.start()
        self.metrics.start()
        if self.images is not None:
            self.images.start()
        next_reconcile = 0.0
        next_labels = time.monotonic() + self.config.labels_interval
        try:
            while not stop.is_set():
                if self.config.labels_command and time.monotonic() >= next_labels:
                    next_labels = time.monotonic() + self.config.labels_interval
                    self.refresh_labels()
                timeout = max(0.0, min(next_reconcile - time.monotonic(), 0.5))
                try:
                    item = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._dispatch(*item)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
                self.core.tick_jobs()
                if self.core.wake or time.monotonic() >= next_reconcile:
                    self.core.reconcile_once()
                    now = self.core.clock()
                    next_reconcile = time.monotonic() + (self.core.next_wakeup(now) - now)
                # Forget what the broker acknowledged; send the rest: the pass's events (a
                # message's, a job's, the reconcile's) in one batch.
                self.core.flush_events()
        finally:
            remote.detach(self.core, self.metrics)
            if self.images is not None:
                self.images.close()
            self.client.stop(publish_first=self.core.goodbye())
            self.core.driver.close()
            self.stopped.set()

    def _launch_job(self, job: JobSpec, run: str) -> None:
        """Run a job on its own thread; its result comes back through the inbox."""
        runner = getattr(self.core.driver, "run_job", None) or run_host_command

        def work() -> None:
            result = run_job(job, run, runner)
            self.inbox.put((_JOB, codec.encode(result)))

        threading.Thread(target=work, name=f"job-{job.name}", daemon=True).start()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == _JOB:
            self.core.job_finished(codec.decode(payload, JobResult))
            return
        if topic == _WAKE:  # the image stager moved: an image arrived, failed or retries
            self.core.wake = True
            return
        if topic == _CONNECTED:
            broker = self.client.current_broker
            log.info("connected to %s (session %d)", broker.url() if broker else "?", self.core.session)
            self.core.on_connected()
        else:
            self.core.handle(topic, payload)
