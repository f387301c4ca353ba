"""Stage, then switch, in the agent core (fake driver, scripted stager): a stack moves to its new
version only once its images are on the device; meanwhile the old one runs and the report
carries the download."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from support.links import RecordingLink
from tether.agent.core import PROGRESS_INTERVAL, AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.staging import ImageStatus
from tether.agent.store import MemoryStore
from tether.protocol import codec, topics
from tether.protocol.enrollment import DeviceKey, seal_text
from tether.protocol.errors import DriverError
from tether.protocol.models import (
    DesiredState,
    RegistryAuth,
    ServiceSpec,
    StackDefinition,
    StackRef,
    StackSpec,
)
from tether.protocol.topics import DeviceTopic

DEVICE = "stage-1"


class ScriptedImages:
    """The stager's interface, driven by the test: which images are present, how far the rest are."""

    def __init__(self, present: Iterable[str] = ()) -> None:
        self.present_refs = set(present)
        self.states: dict[str, ImageStatus] = {}
        self.wanted: set[str] = set()
        self.credentials: dict[str, tuple[str, str]] = {}
        self.pruned: list[set[str]] = []
        self.speed = 0.0

    def want(self, images: Iterable[str], credentials: Mapping[str, tuple[str, str]]) -> None:
        self.wanted, self.credentials = set(images), dict(credentials)

    def present(self, ref: str) -> bool:
        return ref in self.present_refs

    def status(self) -> dict[str, ImageStatus]:
        return {
            r: ImageStatus("present")
            if r in self.present_refs
            else self.states.get(r, ImageStatus("downloading"))
            for r in self.wanted
        }

    def rate(self) -> float:
        return self.speed

    def prune(self, keep: Iterable[str]) -> None:
        self.pruned.append(set(keep))


class Device:
    def __init__(self, images: ScriptedImages, store: MemoryStore | None = None, held: bool = False) -> None:
        self.now = [1000.0]
        self.driver = FakeDriver(DEVICE)
        self.link = RecordingLink()
        self.images = images
        self.store = store or MemoryStore()
        self.held = held
        self.key = DeviceKey.generate()
        self.core = AgentCore(
            DEVICE,
            {},
            self.driver,
            self.store,
            self.link,
            clock=lambda: self.now[0],
            images=images,  # type: ignore[arg-type]
            is_held=lambda: self.held,
            key=self.key,
        )
        self.generation = 0

    def deploy(
        self, *stacks: tuple[str, StackSpec], stage: tuple[tuple[str, StackSpec], ...] = (), **extra: object
    ) -> None:
        self.generation += 1
        desired = DesiredState(
            device_id=DEVICE,
            generation=self.generation,
            stacks=tuple(StackRef(name=n, spec_hash=s.spec_hash()) for n, s in stacks),
            stage=tuple(StackRef(name=n, spec_hash=s.spec_hash()) for n, s in stage),
            **extra,  # type: ignore[arg-type]
        )
        self.core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), codec.encode(desired))
        for _, spec in (*stacks, *stage):
            definition = StackDefinition(spec_hash=spec.spec_hash(), spec=spec)
            self.core.handle(topics.stack(spec.spec_hash()), codec.encode(definition))

    def running(self) -> dict[str, str]:
        """service -> spec hash of its running instance."""
        return {i.service: i.spec_hash for i in self.driver.observe() if i.state == "running"}


def web(image: str) -> StackSpec:
    return StackSpec(services=(ServiceSpec(name="web", image=image, restart="always"),))


def test_an_update_waits_for_its_images_while_the_old_version_runs_and_is_restarted() -> None:
    """Old version keeps running (and restarting) until the new image is present; then it switches."""
    images = ScriptedImages(present={"app:1"})
    dev = Device(images)
    v1, v2 = web("app:1"), web("app:2")
    dev.deploy(("app", v1))
    dev.core.reconcile_once()
    assert dev.running() == {"web": v1.services[0].spec_hash()}

    dev.deploy(("app", v2))
    images.states["app:2"] = ImageStatus("downloading", done=3_000_000, total=8_000_000)
    images.speed = 12_000.0
    dev.core.reconcile_once()
    assert images.wanted == {"app:1", "app:2"}
    assert dev.running() == {"web": v1.services[0].spec_hash()}, "v1 keeps running during the download"
    report = dev.link.report()
    assert report.generation == 2
    assert report.stacks["app"].spec_hash == v1.spec_hash()
    download = report.downloads["app"]
    assert (download.spec_hash, download.state, download.done, download.total) == (
        v2.spec_hash(),
        "downloading",
        3_000_000,
        8_000_000,
    )
    assert download.rate == 12_000.0 and download.eta_s is not None and round(download.eta_s) == 417

    dev.driver.crash("app", "web", exit_code=1)
    dev.now[0] += 1
    dev.core.reconcile_once()
    assert dev.running() == {"web": v1.services[0].spec_hash()}, "a crash during the download is restarted"

    images.present_refs.add("app:2")
    dev.now[0] += 1
    dev.core.reconcile_once()
    assert dev.running() == {"web": v2.services[0].spec_hash()}
    report = dev.link.report()
    assert report.stacks["app"].spec_hash == v2.spec_hash() and report.downloads == {}
    assert dev.core.applied == {"app": v2.spec_hash()} and dev.core.previous == {"app": v1.spec_hash()}
    # The download's events, tied to the version (a deployment's events are told by it).
    (started,) = dev.link.events("stack.downloading")
    (done,) = dev.link.events("stack.downloaded")
    assert started.spec_hash == done.spec_hash == v2.spec_hash() and started.stack == "app"
    assert "5.0 MB to fetch" in started.message and "switching to it" in done.message
    (created,) = [e for e in dev.link.events("service.created") if e.spec_hash == v2.spec_hash()]
    assert created.service == "web"


def test_progress_is_throttled_but_a_change_of_state_is_reported_at_once() -> None:
    """Bytes move the report at most every PROGRESS_INTERVAL; retrying goes out at once, with its reason."""
    images = ScriptedImages(present={"app:1"})
    dev = Device(images)
    dev.deploy(("app", web("app:1")))
    dev.core.reconcile_once()
    dev.deploy(("app", web("app:2")))
    images.states["app:2"] = ImageStatus("downloading", done=1000, total=10_000)
    dev.core.reconcile_once()
    count = len(dev.link.reports())
    images.states["app:2"] = ImageStatus("downloading", done=2000, total=10_000)
    dev.now[0] += PROGRESS_INTERVAL / 2
    dev.core.reconcile_once()
    assert len(dev.link.reports()) == count, "progress within the interval: no new report"
    dev.now[0] += PROGRESS_INTERVAL
    dev.core.reconcile_once()
    assert len(dev.link.reports()) == count + 1
    assert dev.link.report().downloads["app"].done == 2000

    images.states["app:2"] = ImageStatus(
        "retrying", done=2000, total=10_000, reason="registry: connection refused"
    )
    dev.now[0] += 1
    dev.core.reconcile_once()
    download = dev.link.report().downloads["app"]
    assert (download.state, download.reason) == ("retrying", "registry: connection refused")


def test_a_first_deployment_creates_nothing_until_its_images_are_here() -> None:
    """No old version: the stack's services are pending and nothing is created meanwhile."""
    images = ScriptedImages()
    dev = Device(images)
    dev.deploy(("app", web("app:1")))
    dev.core.reconcile_once()
    assert dev.driver.observe() == []
    report = dev.link.report()
    assert report.stacks["app"].services["web"].state == "pending"
    assert report.downloads["app"].state == "downloading"
    images.present_refs.add("app:1")
    dev.core.reconcile_once()
    assert set(dev.running()) == {"web"}


def test_a_permanent_failure_is_reported_with_its_reason_and_an_event_once() -> None:
    """failed: the reason in the report, one download.failed event; the old version keeps running."""
    images = ScriptedImages(present={"app:1"})
    dev = Device(images)
    v1 = web("app:1")
    dev.deploy(("app", v1))
    dev.core.reconcile_once()
    dev.deploy(("app", web("app:9")))
    images.states["app:9"] = ImageStatus(
        "failed", reason="reg/app:9 manifest: manifest unknown (MANIFEST_UNKNOWN)"
    )
    dev.core.reconcile_once()
    dev.now[0] += 30
    dev.core.reconcile_once()
    download = dev.link.report().downloads["app"]
    assert download.state == "failed" and "manifest unknown" in (download.reason or "")
    assert len(dev.link.events("download.failed")) == 1
    assert dev.running() == {"web": v1.services[0].spec_hash()}


def test_a_held_device_downloads_reports_staged_and_switches_when_released() -> None:
    """On hold: the new version's images are wanted and shown staged; released, it switches."""
    images = ScriptedImages(present={"app:1"})
    dev = Device(images)
    v1, v2 = web("app:1"), web("app:2")
    dev.deploy(("app", v1))
    dev.core.reconcile_once()
    dev.held = True
    dev.deploy(("app", v2))
    dev.core.reconcile_once()
    assert "app:2" in images.wanted, "a held device still downloads"
    assert dev.link.report().downloads["app"].state == "downloading"
    images.present_refs.add("app:2")
    dev.core.reconcile_once()
    report = dev.link.report()
    assert report.held and report.downloads["app"].state == "staged"
    assert dev.running() == {"web": v1.services[0].spec_hash()}
    dev.held = False
    dev.core.reconcile_once()
    assert dev.running() == {"web": v2.services[0].spec_hash()}


def test_stage_only_versions_are_downloaded_and_never_run() -> None:
    """A version in ``stage``: its images wanted, reported staged once here, nothing of it created."""
    images = ScriptedImages(present={"app:1"})
    dev = Device(images)
    v1, v2 = web("app:1"), web("app:2")
    dev.deploy(("app", v1), stage=(("app", v2),))
    dev.core.reconcile_once()
    assert images.wanted == {"app:1", "app:2"}
    assert dev.link.report().downloads["app"].state == "downloading"
    images.present_refs.add("app:2")
    dev.core.reconcile_once()
    assert dev.link.report().downloads["app"].state == "staged"
    assert dev.running() == {"web": v1.services[0].spec_hash()}
    dev.deploy(("app", v2))  # the switch: instant, the images are here
    dev.core.reconcile_once()
    assert dev.running() == {"web": v2.services[0].spec_hash()}


def test_after_a_switch_images_are_pruned_keeping_the_previous_version() -> None:
    """Once every stack runs after a switch: prune, keeping the new and the previous version's images."""
    images = ScriptedImages(present={"app:1", "app:2", "app:3"})
    dev = Device(images)
    for image in ("app:1", "app:2", "app:3"):
        dev.deploy(("app", web(image)))
        dev.core.reconcile_once()
        dev.core.reconcile_once()
    assert images.pruned[-1] == {"app:3", "app:2"}


def test_the_version_that_runs_survives_an_agent_restart_during_a_download() -> None:
    """A restarted agent keeps running the applied version (from disk) while the new one downloads."""
    images = ScriptedImages(present={"app:1"})
    store = MemoryStore()
    dev = Device(images, store)
    v1, v2 = web("app:1"), web("app:2")
    dev.deploy(("app", v1))
    dev.core.reconcile_once()
    dev.deploy(("app", v2))
    dev.core.reconcile_once()
    again = Device(ScriptedImages(present={"app:1"}), store)
    again.driver = dev.driver
    again.core.driver = dev.driver
    again.core.reconcile_once()
    assert again.core.applied == {"app": v1.spec_hash()}
    assert again.running() == {"web": v1.services[0].spec_hash()}
    assert again.link.report().downloads["app"].spec_hash == v2.spec_hash()


def test_registry_credentials_sealed_to_the_device_reach_the_stager() -> None:
    """RegistryAuth opened with the device's key: the stager gets (username, password) per host."""
    images = ScriptedImages()
    dev = Device(images)
    sealed = seal_text(dev.key.public, json.dumps({"username": "edge", "password": "s3cret"}))
    dev.deploy(
        ("app", web("reg.example:5000/app:1")),
        registries=(
            RegistryAuth(host="reg.example:5000", sealed=sealed),
            RegistryAuth(host="other.example", sealed="bm90IGEgYm94"),
        ),
    )
    dev.core.reconcile_once()
    assert images.credentials == {"reg.example:5000": ("edge", "s3cret")}


class PreparingDriver(FakeDriver):
    """A fake driver with ``prepare`` (as the docker driver has): records calls, fails on demand."""

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.calls: list[str] = []
        self.fail: str | None = None

    def prepare(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        self.calls.append(f"prepare {service.image}")
        if self.fail:
            raise DriverError(self.fail)

    def remove(self, instance: Any, grace: float) -> None:
        self.calls.append("remove")
        super().remove(instance, grace)


def test_a_successor_is_prepared_before_its_predecessor_goes_and_if_it_cannot_be_the_old_one_stays() -> None:
    """prepare runs before the stale instance is removed; when it fails, nothing is removed,
    the error is reported, and the replacement is tried again after its backoff."""
    images = ScriptedImages(present={"app:1", "app:2", "app:3"})
    dev = Device(images)
    driver = PreparingDriver(DEVICE)
    dev.driver = driver
    dev.core.driver = driver
    v1, v2, v3 = web("app:1"), web("app:2"), web("app:3")
    dev.deploy(("app", v1))
    dev.core.reconcile_once()
    dev.deploy(("app", v2))
    dev.core.reconcile_once()
    assert driver.calls == ["prepare app:2", "remove"]
    assert dev.running() == {"web": v2.services[0].spec_hash()}

    driver.calls.clear()
    driver.fail = "create network: no space left on device"
    dev.deploy(("app", v3))
    dev.core.reconcile_once()
    assert driver.calls == ["prepare app:3"], "nothing removed"
    assert dev.running() == {"web": v2.services[0].spec_hash()}, "v2 keeps running"
    report = dev.link.report()
    assert "no space left" in (report.stacks["app"].services["web"].last_error or "")
    assert any("the running version is kept" in e.message for e in dev.link.events("action.failed"))

    driver.fail = None
    dev.now[0] += 2  # past the first backoff (1 s)
    dev.core.reconcile_once()
    assert dev.running() == {"web": v3.services[0].spec_hash()}


def test_a_jobs_image_is_staged_and_the_job_waits_for_it() -> None:
    """A job's image is handed to the stager (resumable), the job starts only once it is present,
    and the image is kept when unused images are pruned."""
    from tether.protocol.models import JobSpec

    images = ScriptedImages(present={"app:1"})
    dev = Device(images)
    launched: list[str] = []
    dev.core.launch_job = lambda job, run: launched.append(run)
    job = JobSpec(name="backup", image="tool:1", command=("true",), run_id="r1")
    dev.deploy(("app", web("app:1")), jobs=(job,))
    dev.core.reconcile_once()
    dev.core.tick_jobs()
    assert "tool:1" in images.wanted and launched == []
    images.present_refs.add("tool:1")
    dev.core.tick_jobs()
    assert launched == ["r1"]
    dev.core.reconcile_once()
    assert images.pruned and all("tool:1" in keep for keep in images.pruned)
