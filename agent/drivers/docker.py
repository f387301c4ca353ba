"""The Docker driver: service instances are containers on the local Docker engine.

Every container carries Tether's labels (stack, service, spec hash, device); the driver
lists only containers with this device's labels and never touches any other. A stack in
``bridge`` network mode gets its own user-defined network, where each service is reachable
by its service name (as with Compose). Named volumes are ``tether-{device}-{stack}-{name}``
and outlive the stack (as ``docker compose down`` without ``-v``).

Restarts are the agent's job, not Docker's (containers get Docker's ``no`` policy): the
agent applies the service's restart policy with backoff and crash-loop detection the same
way for every driver (docs/adr/0003-agent-owns-restarts.md).
Docker SDK errors are translated into :class:`DriverError` here and nowhere else.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tether.agent.registry import RegistryError, engine_name, parse_reference
from tether.protocol.errors import DriverError
from tether.protocol.models import JobSpec, ServiceSpec, StackSpec

from .base import (
    HEALTH_OUTPUT_CHARS,
    LABEL_DEVICE,
    LABEL_MANAGED,
    LABEL_SERVICE,
    LABEL_SPEC_HASH,
    LABEL_STACK,
    LABEL_STOP_GRACE,
    InstanceState,
    Observed,
)
from .docker_sdk import docker
from .docker_spec import NetworkPlan, VolumePlan, plan_container

log = logging.getLogger(__name__)

PREPARED_FOR = 60.0
"""Seconds a :meth:`DockerDriver.prepare` stays good for the create that follows it."""
NEXT_MARK = ".next-"
"""In the name of a successor created ahead (``{instance}.next-{random}``) by
:meth:`DockerDriver.prepare`, until it is started and renamed: while it is only created it
is not an instance (:meth:`DockerDriver.observe` leaves it out) and :meth:`DockerDriver.prune`
removes it if it was never used (an agent killed between the two)."""


class _Prepared:
    """A successor made ahead: its created (not started) container and the name it takes."""

    def __init__(self, stack: str, spec_hash: str, name: str, container_id: str, at: float) -> None:
        self.stack, self.spec_hash, self.name = stack, spec_hash, name
        self.container_id, self.at = container_id, at


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _pinned_name(image: str) -> str | None:
    """For a digest-pinned reference, the name the agent's stager loads it under; else None."""
    if "@" not in image:
        return None
    try:
        return engine_name(parse_reference(image))
    except RegistryError:
        return None


def _error(action: str, exc: Exception) -> DriverError:
    detail = getattr(exc, "explanation", None) or str(exc)
    return DriverError(f"{action}: {detail}")


class DockerDriver:
    """Runs services as containers through the Docker SDK."""

    name = "docker"

    def __init__(self, device_id: str, client: Any = None) -> None:
        self.device_id = device_id
        self._prepared: _Prepared | None = None
        try:
            self.client = client or docker.from_env(timeout=60)
            self.client.ping()
        except docker.errors.DockerException as exc:
            raise DriverError(f"cannot reach the Docker engine: {exc}") from exc

    def _labels(self, stack: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_DEVICE: self.device_id, LABEL_STACK: stack}

    def _filters(self) -> dict[str, Any]:
        return {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_DEVICE}={self.device_id}"]}

    def version(self) -> str:
        try:
            return str(self.client.version().get("Version", "?"))
        except docker.errors.DockerException:
            return "?"

    def observe(self) -> list[Observed]:
        try:
            containers = self.client.containers.list(all=True, filters=self._filters())
        except docker.errors.DockerException as exc:
            raise _error("list containers", exc) from exc
        result = []
        for c in containers:
            labels = c.labels or {}
            state = c.attrs.get("State", {})
            status = state.get("Status", "exited")
            if status == "created" and NEXT_MARK in (c.name or ""):
                continue  # a successor made ahead, not started yet: not an instance
            mapped: InstanceState
            if status == "running":
                mapped = "running"
            elif status == "restarting":
                mapped = "restarting"
            elif status == "created":
                mapped = "starting"
            else:
                mapped = "exited"
            health = (state.get("Health") or {}).get("Status")
            checks = (state.get("Health") or {}).get("Log") or []
            output = None
            if health == "unhealthy" and checks and isinstance(checks[-1], dict):
                output = str(checks[-1].get("Output") or "").strip()[-HEALTH_OUTPUT_CHARS:] or None
            result.append(
                Observed(
                    id=c.id,
                    stack=labels.get(LABEL_STACK, ""),
                    service=labels.get(LABEL_SERVICE, ""),
                    spec_hash=labels.get(LABEL_SPEC_HASH, ""),
                    state=mapped,
                    exit_code=state.get("ExitCode") if mapped == "exited" else None,
                    health=health if health in ("starting", "healthy", "unhealthy") else None,
                    error=state.get("Error") or None,
                    stop_grace=_float(labels.get(LABEL_STOP_GRACE)),
                    health_output=output,
                )
            )
        return result

    def _ensure_image(self, image: str) -> str:
        """The name to run ``image`` by: itself, or the name the agent's stager loaded a
        digest-pinned reference under; pulled by the engine if neither is here (an agent
        without a stager)."""
        if self.image_id(image, exact=True) is not None:
            return image
        local = _pinned_name(image)
        if local is not None and self.image_id(local, exact=True) is not None:
            return local
        try:
            log.info("pulling %s", image)
            self.client.images.pull(image)
        except docker.errors.DockerException as exc:
            raise _error(f"image {image} is not on the device and pulling it failed", exc) from exc
        return image

    # --- images: what the agent's image stager needs (agent/staging.py: ImageEngine) ---

    def image_id(self, ref: str, exact: bool = False) -> str | None:
        """The id of the local image ``ref`` names (a digest-pinned reference: also the image
        the stager loaded for it, unless ``exact``)."""
        if not exact and (local := _pinned_name(ref)) is not None:
            return self.image_id(ref, exact=True) or self.image_id(local, exact=True)
        try:
            return str(self.client.api.inspect_image(ref)["Id"])
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code in (400, 404):  # a name the engine cannot parse is not here either
                return None
            raise _error(f"inspect image {ref}", exc) from exc
        except docker.errors.DockerException as exc:
            raise _error(f"inspect image {ref}", exc) from exc

    def layer_chains(self) -> set[tuple[str, ...]]:
        chains: set[tuple[str, ...]] = set()
        try:
            for summary in self.client.api.images(all=False):
                try:
                    layers = (
                        self.client.api.inspect_image(summary["Id"]).get("RootFS", {}).get("Layers") or []
                    )
                except docker.errors.NotFound:
                    continue
                chains.update(tuple(layers[: i + 1]) for i in range(len(layers)))
        except docker.errors.DockerException as exc:
            raise _error("list images", exc) from exc
        return chains

    def load_image(self, archive: Iterable[bytes]) -> None:
        try:
            self.client.images.load(iter(archive))
        except docker.errors.DockerException as exc:
            raise _error("load image", exc) from exc

    def remove_image(self, ref: str) -> None:
        try:
            self.client.api.remove_image(ref, force=False)
        except docker.errors.ImageNotFound:
            return
        except docker.errors.DockerException as exc:
            raise _error(f"remove image {ref}", exc) from exc

    def storage_path(self) -> str | None:
        try:
            return str(self.client.info().get("DockerRootDir") or "") or None
        except docker.errors.DockerException:
            return None

    def _ensure_network(self, stack: str, net: NetworkPlan) -> str:
        """The engine's id of one of the stack's networks, created if it is the stack's own."""
        try:
            existing = [n for n in self.client.networks.list(names=[net.name]) if n.name == net.name]
            if net.spec.external:
                if not existing:
                    raise DriverError(
                        f"network {net.key}: the external network {net.name!r} does not exist on this device"
                    )
                return str(existing[0].id)
            if existing:
                labels = existing[0].attrs.get("Labels") or {}
                owner = (labels.get(LABEL_DEVICE), labels.get(LABEL_STACK))
                if not net.spec.name and owner != (self.device_id, stack):
                    raise DriverError(
                        f"network {net.key}: {net.name!r} exists and belongs to {owner[1] or 'something else'} "
                        f"on {owner[0] or 'this engine'}"
                    )
                return str(existing[0].id)
            ipam = None
            if net.spec.ipam_driver or net.spec.ipam_config or net.spec.ipam_options:
                ipam = docker.types.IPAMConfig(
                    driver=net.spec.ipam_driver or "default",
                    pool_configs=[
                        docker.types.IPAMPool(
                            subnet=p.subnet,
                            iprange=p.ip_range,
                            gateway=p.gateway,
                            aux_addresses=p.aux_addresses or None,
                        )
                        for p in net.spec.ipam_config
                    ],
                    options=net.spec.ipam_options or None,
                )
            created = self.client.networks.create(
                net.name,
                driver=net.spec.driver or "bridge",
                options=net.spec.driver_opts or None,
                ipam=ipam,
                internal=net.spec.internal,
                enable_ipv6=net.spec.enable_ipv6,
                attachable=net.spec.attachable or None,
                labels={**net.spec.labels, **self._labels(stack)},
            )
            return str(created.id)
        except docker.errors.DockerException as exc:
            raise _error(f"create network {net.name}", exc) from exc

    def _resources(
        self, stack: str, stack_spec: StackSpec, service: ServiceSpec
    ) -> tuple[Any, list[tuple[NetworkPlan, str]]]:
        """The container's plan, its image checked and its volumes and networks made."""
        if not service.image:
            raise DriverError(f"service {service.name}: no image (the docker driver needs one)")
        for mount in service.configs:
            if mount.host_path is None:
                raise DriverError(f"service {service.name}: config {mount.source} was not rendered")
        image = self._ensure_image(service.image)
        labels = dict(service.labels)
        labels.update(self._labels(stack))
        labels[LABEL_SERVICE] = service.name
        labels[LABEL_SPEC_HASH] = service.spec_hash()
        labels[LABEL_STOP_GRACE] = f"{service.stop_grace_period_s:g}"
        plan = plan_container(self.device_id, stack, stack_spec, service, labels)
        plan.create["image"] = image
        for volume in plan.volumes:
            self._ensure_volume(stack, volume)
        joins = [(net, self._ensure_network(stack, net)) for net in plan.networks]
        return plan, joins

    def prepare(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        """While the instance ``service`` replaces still runs: check its image, make its
        volumes and networks, and create its container (not started, under a name of its own
        with :data:`NEXT_MARK`). If that fails the agent leaves the old instance running; if
        not, the :meth:`replace` (or :meth:`create`) right after only has to start it: the
        service is down for the old container's stop and the new one's start, nothing else."""
        self._discard_prepared()
        plan, joins = self._resources(stack, stack_spec, service)
        at = time.monotonic()
        name = f"{plan.create['name']}{NEXT_MARK}{secrets.token_hex(4)}"
        container_id = self._create_container(stack, service, plan, joins, name)
        self._prepared = _Prepared(stack, service.spec_hash(), plan.create["name"], container_id, at)

    def _take_prepared(self, stack: str, service: ServiceSpec) -> _Prepared | None:
        """The successor :meth:`prepare` made for ``service`` if it is still good, else None
        (and a stale one is removed)."""
        prepared = self._prepared
        if (
            prepared is not None
            and (prepared.stack, prepared.spec_hash) == (stack, service.spec_hash())
            and time.monotonic() - prepared.at < PREPARED_FOR
        ):
            self._prepared = None
            return prepared
        self._discard_prepared()
        return None

    def _discard_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            with contextlib.suppress(docker.errors.DockerException):
                self.client.api.remove_container(prepared.container_id, force=True)

    def _create_container(
        self, stack: str, service: ServiceSpec, plan: Any, joins: list[tuple[NetworkPlan, str]], name: str
    ) -> str:
        """Create (not start) the container of ``plan`` under ``name``, joined to its networks."""
        api = self.client.api
        kwargs = dict(plan.create)
        host = dict(plan.host)
        kwargs["name"] = name
        try:
            if joins:
                first, _ = joins[0]
                kwargs["networking_config"] = api.create_networking_config(
                    {first.name: api.create_endpoint_config(**self._endpoint(first))}
                )
            kwargs["host_config"] = api.create_host_config(
                network_mode=host.pop("network_mode", joins[0][0].name if joins else None), **host
            )
            image = kwargs.pop("image")
            container_id = str(api.create_container(image, **kwargs)["Id"])
        except docker.errors.DockerException as exc:
            raise _error(f"create {stack}/{service.name}", exc) from exc
        try:
            for net, net_id in joins[1:]:  # the engine joins one network at create (API < 1.44)
                api.connect_container_to_network(container_id, net_id, **self._endpoint(net))
        except docker.errors.DockerException as exc:
            self._remove_quietly(container_id)
            raise _error(f"create {stack}/{service.name}", exc) from exc
        return container_id

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException:
            log.warning("could not remove container %s", container_id)

    def _start(self, stack: str, service: ServiceSpec, container_id: str) -> None:
        """Start a created container; one that cannot start is removed again (nothing is
        left half-made)."""
        try:
            self.client.api.start(container_id)
        except docker.errors.DockerException as exc:
            self._remove_quietly(container_id)
            raise _error(f"start {stack}/{service.name}", exc) from exc

    def _rename(self, container_id: str, name: str) -> None:
        try:
            self.client.api.rename(container_id, name)
        except docker.errors.DockerException as exc:  # it runs under its made-ahead name: still tracked
            log.warning("could not rename container %s to %s: %s", container_id[:12], name, exc)

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        prepared = self._take_prepared(stack, service)
        if prepared is not None:
            self._start(stack, service, prepared.container_id)
            self._rename(prepared.container_id, prepared.name)
            return
        plan, joins = self._resources(stack, stack_spec, service)
        self._start(stack, service, self._create_container(stack, service, plan, joins, plan.create["name"]))

    def replace(
        self, instance: Observed, grace: float, stack: str, stack_spec: StackSpec, service: ServiceSpec
    ) -> None:
        """Replace ``instance`` by a new instance of ``service`` with the shortest gap: the
        successor :meth:`prepare` created is started as soon as the old container has
        stopped (within ``grace``), and the old one is deleted after (its name goes to the
        successor). Without a prepared successor: :meth:`remove`, then :meth:`create`."""
        prepared = self._take_prepared(stack, service)
        if prepared is None:
            self.remove(instance, grace)
            self.create(stack, stack_spec, service)
            return
        t0 = time.monotonic()
        try:
            self._stop(instance, grace)
        except DriverError:
            self._remove_quietly(prepared.container_id)
            raise
        t1 = time.monotonic()
        try:
            self._start(stack, service, prepared.container_id)
        except DriverError:
            with contextlib.suppress(docker.errors.DockerException):  # the old version, back up
                self.client.api.start(instance.id)
            raise
        t2 = time.monotonic()
        self._remove_quietly(instance.id)
        self._rename(prepared.container_id, prepared.name)
        log.info(
            "replaced %s/%s: old stopped in %.2f s, new started in %.2f s",
            stack,
            service.name,
            t1 - t0,
            t2 - t1,
        )

    def _stop(self, instance: Observed, grace: float) -> None:
        """Stop a container: its stop signal, then SIGKILL once ``grace`` seconds (rounded up:
        the engine counts whole seconds) have passed. Returns as soon as it has exited."""
        try:
            self.client.api.stop(instance.id, timeout=math.ceil(grace))
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException as exc:
            raise _error(f"stop {instance.stack}/{instance.service}", exc) from exc

    @staticmethod
    def _endpoint(net: NetworkPlan) -> dict[str, Any]:
        out: dict[str, Any] = {"aliases": net.aliases}
        if net.links:
            out["links"] = net.links
        if net.attachment.ipv4_address:
            out["ipv4_address"] = net.attachment.ipv4_address
        if net.attachment.ipv6_address:
            out["ipv6_address"] = net.attachment.ipv6_address
        return out

    def _ensure_volume(self, stack: str, volume: VolumePlan) -> None:
        name, options = volume.name, volume.options
        try:
            self.client.volumes.get(name)
        except docker.errors.NotFound:
            if options.external:
                raise DriverError(f"the external volume {name!r} does not exist on this device") from None
            labels = {**options.labels, **self._labels(stack)}
            if volume.anonymous:
                labels["io.tether.anonymous"] = "true"
            try:
                self.client.volumes.create(
                    name,
                    driver=options.driver or "local",
                    driver_opts=options.driver_opts or None,
                    labels=labels,
                )
            except docker.errors.DockerException as exc:
                raise _error(f"create volume {name}", exc) from exc
        except docker.errors.DockerException as exc:
            raise _error(f"inspect volume {name}", exc) from exc

    def start(self, instance: Observed, service: ServiceSpec) -> None:
        try:
            self.client.containers.get(instance.id).start()
        except docker.errors.DockerException as exc:
            raise _error(f"start {instance.stack}/{instance.service}", exc) from exc

    def signal(self, instance: Observed, signame: str) -> None:
        try:
            self.client.containers.get(instance.id).kill(signal=signame)
        except docker.errors.DockerException as exc:
            raise _error(f"signal {instance.stack}/{instance.service}", exc) from exc

    def remove(self, instance: Observed, grace: float) -> None:
        try:
            container = self.client.containers.get(instance.id)
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException as exc:
            raise _error(f"inspect {instance.stack}/{instance.service}", exc) from exc
        try:
            if container.status in ("running", "restarting"):
                container.stop(timeout=math.ceil(grace))
            container.remove(force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException as exc:
            raise _error(f"remove {instance.stack}/{instance.service}", exc) from exc

    def logs(self, instance: Observed, tail: int) -> str:
        try:
            data = self.client.containers.get(instance.id).logs(tail=tail, stdout=True, stderr=True)
        except docker.errors.DockerException:
            return ""
        return bytes(data).decode(errors="replace")

    def log_stream(
        self, instance: Observed, tail: int | None, since: float | None, follow: bool, stop: threading.Event
    ) -> Iterator[str]:
        what = f"{instance.stack}/{instance.service}"
        kwargs: dict[str, Any] = {"stdout": True, "stderr": True, "tail": "all" if tail is None else tail}
        if since is not None:
            kwargs["since"] = max(since, 1.0)
        try:
            container = self.client.containers.get(instance.id)
            stream = container.logs(stream=True, follow=follow, **kwargs)  # chunks: never all in memory
        except docker.errors.NotFound as exc:
            raise DriverError(f"{what}: the container is gone") from exc
        except docker.errors.DockerException as exc:
            raise _error(f"logs of {what}", exc) from exc
        done = threading.Event()

        def close_on_stop() -> None:
            # The stream blocks until the container writes: closing its response unblocks it.
            while not stop.wait(0.2):
                if done.is_set():
                    return
            with contextlib.suppress(Exception):
                stream.close()

        threading.Thread(target=close_on_stop, name="docker-logs-stop", daemon=True).start()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for chunk in stream:
                if stop.is_set():
                    return
                text = decoder.decode(bytes(chunk))
                if text:
                    yield text
        except Exception:  # the response was closed under the iterator (stop), or the engine went away
            if not stop.is_set():
                raise
        finally:
            done.set()

    def usage(self) -> dict[str, tuple[float | None, int | None]]:
        try:
            containers = self.client.containers.list(filters=self._filters())
        except docker.errors.DockerException as exc:
            raise _error("list containers", exc) from exc
        out: dict[str, tuple[float | None, int | None]] = {}
        for c in containers:
            labels = c.labels or {}
            try:
                try:
                    stats = c.stats(stream=False, one_shot=True)
                except docker.errors.InvalidVersion:
                    stats = c.stats(stream=False)  # an engine older than API 1.41: slower
            except docker.errors.DockerException:
                continue  # gone meanwhile
            cpu_ns = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
            mem_stats = stats.get("memory_stats") or {}
            mem = mem_stats.get("usage")
            if mem is not None:
                detail = mem_stats.get("stats") or {}
                # As `docker stats` does: page cache that can be dropped is not "in use".
                mem -= detail.get("inactive_file", detail.get("total_inactive_file", 0))
            key = f"{labels.get(LABEL_STACK, '')}/{labels.get(LABEL_SERVICE, '')}"
            out[key] = (
                cpu_ns / 1e9 if cpu_ns is not None else None,
                max(0, mem) if mem is not None else None,
            )
        return out

    def run_job(self, job: JobSpec) -> tuple[int | None, str, bool]:
        """Run a job's image + command in a throwaway container; (exit code, output, timed out)."""
        if not job.image:
            return None, "the docker driver runs jobs from an image: give the job an image", False
        image = self._ensure_image(job.image)
        try:
            container = self.client.containers.run(
                image,
                list(job.command),
                detach=True,
                environment=dict(job.environment),
                labels={LABEL_MANAGED: "job", LABEL_DEVICE: self.device_id, "io.tether.job": job.name},
            )
        except docker.errors.DockerException as exc:
            raise _error(f"run job {job.name}", exc) from exc
        timed_out = False
        exit_code: int | None = None
        try:
            try:
                exit_code = int(container.wait(timeout=job.timeout_s).get("StatusCode", -1))
            except Exception:  # noqa: BLE001 - requests raises its own timeout types
                timed_out = True
                container.kill()
            output = bytes(container.logs(stdout=True, stderr=True)).decode(errors="replace")
        finally:
            try:
                container.remove(force=True)
            except docker.errors.DockerException:
                log.warning("could not remove job container %s", container.id)
        return exit_code, output, timed_out

    def prune(self, stacks: set[str]) -> None:
        self._discard_prepared()
        try:
            made_ahead = self.client.containers.list(
                all=True, filters={**self._filters(), "status": "created"}
            )
        except docker.errors.DockerException as exc:
            raise _error("list containers", exc) from exc
        for c in made_ahead:  # successors made ahead and never started (an agent killed meanwhile)
            if NEXT_MARK in (c.name or ""):
                self._remove_quietly(c.id)
        try:
            networks = self.client.networks.list(filters=self._filters())
        except docker.errors.DockerException as exc:
            raise _error("list networks", exc) from exc
        for net in networks:
            stack = (net.attrs.get("Labels") or {}).get(LABEL_STACK)
            if stack is not None and stack not in stacks:
                try:
                    net.remove()
                except docker.errors.DockerException:
                    log.debug("network %s still in use", net.name)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client must never fail the agent
            log.debug("docker client close failed", exc_info=True)
