"""Variables and secrets, unit by unit: references and rendering (pure), Compose ``configs`` and
``${var:...}``, the agent rendering a stack before it reconciles (fake driver, memory store),
and the controller's resolution order and secrets key."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from support.links import RecordingLink
from test_compose import parse
from tether.agent.core import AgentCore
from tether.agent.drivers.base import Observed
from tether.agent.drivers.fake import FakeDriver
from tether.agent.store import MemoryStore
from tether.controller.compose import parse_compose
from tether.controller.models import Variable
from tether.controller.variables import KEY_FILE, SecretsKey, resolve, unresolved
from tether.protocol import codec, topics
from tether.protocol.enrollment import DeviceKey, open_text, public_key_b64, seal_text
from tether.protocol.errors import ComposeError, PayloadError, StoreError
from tether.protocol.models import (
    ConfigMount,
    DesiredState,
    PortSpec,
    ServiceSpec,
    StackDefinition,
    StackRef,
    StackSpec,
    VarBinding,
    VolumeSpec,
    content_hash,
)
from tether.protocol.topics import DeviceTopic
from tether.protocol.variables import RenderError, references, render_stack, stack_references


def svc(name: str = "app", **kw: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, "image": "registry.example/app:1", **kw})


def mount(source: str = "app.conf", **kw: object) -> ConfigMount:
    return ConfigMount.model_validate({"source": source, "target": f"/etc/{source}", **kw})


def path_of(config: str) -> str:
    return f"/data/configs/shop/{config}"


# --- protocol/variables.py: references and rendering ------------------------------------------


def test_references_in_env_values_and_config_templates() -> None:
    """References come from environment values and config templates, not from keys or images."""
    spec = StackSpec(
        services=(
            svc(
                "api",
                environment={"DB": "${var:db/password}", "URL": "http://${var:site/berlin/host}:80"},
            ),
            svc("web", environment={"PLAIN": "no reference", "KEY_${var:not/here}": "x"}),
        ),
        configs={"app.conf": "user=${var:db/user}\npass=${var:db/password}\n"},
    )
    assert stack_references(spec) == {"db/password", "site/berlin/host", "db/user"}
    assert references("a ${var:x/y} b ${var:} c ${var:x/y}") == ["x/y", "", "x/y"]


def test_render_replaces_every_occurrence() -> None:
    """Every occurrence of a reference, in env and in files, is replaced by its value."""
    spec = StackSpec(
        services=(svc(environment={"DSN": "${var:db/user}:${var:db/password}@${var:db/user}"}),),
        configs={"app.conf": "${var:db/password}\n${var:db/password}\n"},
    )
    rendered, files = render_stack("shop", spec, {"db/user": "bob", "db/password": "pw"}, path_of)
    assert rendered.services[0].environment == {"DSN": "bob:pw@bob"}
    assert files == {"app.conf": b"pw\npw\n"}


def test_render_missing_reference_names_ref_and_where() -> None:
    """A reference without a value raises RenderError naming the stack, the place and the ref."""
    env_spec = StackSpec(services=(svc(environment={"DB": "${var:db/password}"}),))
    with pytest.raises(RenderError) as info:
        render_stack("shop", env_spec, {}, path_of)
    message = str(info.value)
    for fragment in ("stack shop", "service app", "environment DB", "'db/password'"):
        assert fragment in message, message

    conf_spec = StackSpec(services=(svc(),), configs={"app.conf": "x=${var:site/key}"})
    with pytest.raises(RenderError) as info:
        render_stack("shop", conf_spec, {"db/password": "pw"}, path_of)
    assert "config app.conf" in str(info.value) and "'site/key'" in str(info.value)


def _conf_stack(change_mode: str, template: str = "greeting=${var:app/greeting}\n") -> StackSpec:
    return StackSpec(
        services=(svc(configs=(mount(change_mode=change_mode),)),),
        configs={"app.conf": template},
    )


def test_restart_mount_gets_a_digest_so_the_service_hash_follows_the_content() -> None:
    """change_mode restart: the mount carries the content's digest and the host path; the
    service hash changes when only the file's content changes."""
    spec = _conf_stack("restart")
    one, files_one = render_stack("shop", spec, {"app/greeting": "hello"}, path_of)
    two, files_two = render_stack("shop", spec, {"app/greeting": "bonjour"}, path_of)
    again, _ = render_stack("shop", spec, {"app/greeting": "hello"}, path_of)
    m = one.services[0].configs[0]
    assert m.host_path == "/data/configs/shop/app.conf"
    assert m.digest is not None and len(m.digest) == 64
    assert files_one["app.conf"] == b"greeting=hello\n" and files_two["app.conf"] == b"greeting=bonjour\n"
    assert one.services[0].spec_hash() != two.services[0].spec_hash()
    assert one.services[0].spec_hash() == again.services[0].spec_hash()


@pytest.mark.parametrize("change_mode", ["signal", "noop"])
def test_signal_and_noop_mounts_get_no_digest(change_mode: str) -> None:
    """change_mode signal/noop: no digest, so a content change alone leaves the service hash."""
    spec = _conf_stack(change_mode)
    one, files_one = render_stack("shop", spec, {"app/greeting": "hello"}, path_of)
    two, files_two = render_stack("shop", spec, {"app/greeting": "bonjour"}, path_of)
    assert files_one != files_two
    assert one.services[0].configs[0].digest is None
    assert one.services[0].configs[0].host_path == "/data/configs/shop/app.conf"
    assert one.services[0].spec_hash() == two.services[0].spec_hash()
    # ...and the rendered service differs from the template (the host path is set).
    assert one.services[0].spec_hash() != spec.services[0].spec_hash()


def test_env_change_changes_the_service_hash() -> None:
    """A changed value in the environment changes the service hash (the container is replaced)."""
    spec = StackSpec(services=(svc(environment={"DB": "${var:db/password}"}), svc("other")))
    one, _ = render_stack("shop", spec, {"db/password": "old"}, path_of)
    two, _ = render_stack("shop", spec, {"db/password": "new"}, path_of)
    assert one.services[0].environment == {"DB": "old"}
    assert one.services[0].spec_hash() != two.services[0].spec_hash()
    assert one.services[1].spec_hash() == two.services[1].spec_hash() == spec.services[1].spec_hash()
    assert one.spec_hash() != two.spec_hash()


def test_model_copy_gives_a_fresh_hash() -> None:
    """Regression: a hash computed (and cached) before model_copy(update=...) must not survive it."""
    base = svc(environment={"A": "1"})
    before = base.spec_hash()  # cached now
    copied = base.model_copy(update={"environment": {"A": "2"}})
    assert copied.spec_hash() != before
    assert copied.spec_hash() == content_hash(copied) == svc(environment={"A": "2"}).spec_hash()
    assert base.spec_hash() == before
    stack = StackSpec(services=(base,))
    stack_hash = stack.spec_hash()
    other = stack.model_copy(update={"services": (copied,)})
    assert other.spec_hash() != stack_hash and other.spec_hash() == content_hash(other)
    deep = stack.model_copy(update={"volumes": ("data",)}, deep=True)
    assert deep.spec_hash() == content_hash(deep) != stack_hash


# Hashes computed with protocol/models.py of 9a0c03a, before configs/vars existed.
OLD_SERVICE_HASH = "8e311326cffaf8938428e35f42b3b513c94a8ab169b8571e2758377b879cd0d1"
OLD_STACK_HASH = "a472bdcf4b35fc9fcca690302dd4436dda0cab282456d08789a3ddb388a18071"
OLD_DESIRED_HASH = "94f7767ff633181aea2c325cff1ec02afa5106289f5a99a2f6111ad737622143"


def test_hashes_without_configs_are_unchanged() -> None:
    """A stack without configs hashes exactly as before the fields were added: the dump has no
    ``configs`` (nor ``vars`` in a desired state without bindings)."""
    web = ServiceSpec(
        name="web",
        image="registry.example/web:1",
        environment={"MODE": "prod"},
        ports=(PortSpec(container=80, host=8080),),
    )
    db = ServiceSpec(name="db", image="registry.example/db:2")
    stack = StackSpec(services=(db, web), volumes=("data",))
    assert "configs" not in web.model_dump(mode="json")
    assert "configs" not in stack.model_dump(mode="json")
    assert web.spec_hash() == OLD_SERVICE_HASH
    assert stack.spec_hash() == OLD_STACK_HASH
    desired = DesiredState(
        device_id="d1", generation=3, stacks=(StackRef(name="shop", spec_hash=stack.spec_hash()),)
    )
    assert "vars" not in desired.model_dump(mode="json")
    assert content_hash(desired) == OLD_DESIRED_HASH
    # With configs, the key is there and the hash differs.
    with_conf = StackSpec(services=(db, web), volumes=("data",), configs={"a": "b"})
    assert with_conf.model_dump(mode="json")["configs"] == {"a": "b"}
    assert with_conf.spec_hash() != OLD_STACK_HASH
    # A mount as the controller sends it carries no host_path/digest keys.
    assert set(mount().model_dump(mode="json")) == {
        "source",
        "target",
        "mode",
        "change_mode",
        "change_signal",
    }


# --- controller/compose.py: configs and ${var:...} ----------------------------------------------


# parse() and rejects() are test_compose.py's.


def test_compose_configs_short_and_long_syntax() -> None:
    """Short syntax mounts at /NAME with the defaults; long syntax sets target, mode (int or
    string), change mode and an upper-cased signal; references stay in templates and env."""
    spec = parse(
        """
        services:
          app:
            image: app:1
            environment:
              DB_PASSWORD: ${var:db/password}
              PRICE: "$$5"
            configs:
              - app.conf
              - source: nginx.conf
                target: /etc/nginx/nginx.conf
                mode: 0440
                x-tether-change-mode: signal
                x-tether-change-signal: sigusr1
              - source: other.conf
                target: /etc/other.conf
                mode: "0640"
                x-tether-change-mode: noop
              - source: sig.conf
                target: /etc/sig.conf
                x-tether-change-mode: signal
        configs:
          app.conf:
            content: "password=${var:db/password} cost=$$3\\n"
          nginx.conf:
            content: worker_processes 1;
          other.conf:
            name: ignored
            content: x
          sig.conf:
            content: y
        """
    )
    assert spec.configs == {
        "app.conf": "password=${var:db/password} cost=$3\n",
        "nginx.conf": "worker_processes 1;",
        "other.conf": "x",
        "sig.conf": "y",
    }
    app = spec.services[0]
    assert app.environment == {"DB_PASSWORD": "${var:db/password}", "PRICE": "$5"}
    short, nginx, other, sig = app.configs
    assert short == ConfigMount(source="app.conf", target="/app.conf")
    assert (short.mode, short.change_mode, short.change_signal) == (0o444, "restart", "SIGHUP")
    assert nginx == ConfigMount(
        source="nginx.conf",
        target="/etc/nginx/nginx.conf",
        mode=0o440,
        change_mode="signal",
        change_signal="SIGUSR1",
    )
    assert (other.mode, other.change_mode) == (0o640, "noop")
    assert (sig.change_mode, sig.change_signal) == ("signal", "SIGHUP")
    assert stack_references(spec) == {"db/password"}


@pytest.mark.parametrize(
    ("service_configs", "top_configs", "fragments"),
    [
        ("[missing.conf]", "{a.conf: {content: x}}", ["service 'app'", "'missing.conf'", "not declared"]),
        ("[a.conf]", "{a.conf: {file: ./a.conf}}", ["config 'a.conf'", "file is not supported", "content"]),
        ("[a.conf]", "{a.conf: {external: true}}", ["config 'a.conf'", "external", "content"]),
        ("[a.conf]", "{a.conf: {content: 3}}", ["config 'a.conf'", "content must be a string"]),
        ("[{source: a.conf, uid: '0'}]", "{a.conf: {content: x}}", ["uid is not supported"]),
        ("[{source: a.conf, gid: '0'}]", "{a.conf: {content: x}}", ["gid is not supported"]),
        (
            "[{source: a.conf, x-tether-change-mode: reload}]",
            "{a.conf: {content: x}}",
            ["x-tether-change-mode must be restart, signal or noop", "'reload'"],
        ),
        (
            "[{source: a.conf, x-tether-change-signal: hup}]",
            "{a.conf: {content: x}}",
            ["x-tether-change-signal must be a signal name"],
        ),
        (
            "[{source: a.conf, x-tether-change-signal: 1}]",
            "{a.conf: {content: x}}",
            ["x-tether-change-signal must be a signal name"],
        ),
        (
            "[{source: a.conf, mode: '0999'}]",
            "{a.conf: {content: x}}",
            ["mode must be an octal file mode"],
        ),
        (
            "[{source: a.conf, mode: 0o7777}]",
            "{a.conf: {content: x}}",
            ["mode must be an octal file mode"],
        ),
        (
            "[{source: a.conf, target: /etc/x}, {source: b.conf, target: /etc/x}]",
            "{a.conf: {content: x}, b.conf: {content: y}}",
            ["service 'app'", "same target"],
        ),
        ("[a.conf, a.conf]", "{a.conf: {content: x}}", ["same target"]),
        ("[{source: a.conf, bogus: 1}]", "{a.conf: {content: x}}", ["'bogus' not allowed"]),
    ],
)
def test_compose_config_errors(service_configs: str, top_configs: str, fragments: list[str]) -> None:
    """Each unsupported or inconsistent configs entry is one ComposeError naming what is wrong."""
    text = f"services:\n  app:\n    image: app:1\n    configs: {service_configs}\nconfigs: {top_configs}\n"
    with pytest.raises(ComposeError) as info:
        parse_compose(text)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("key", ["image", "command"])
def test_compose_var_reference_outside_env_and_configs_is_refused(key: str) -> None:
    """${var:...} in an image or a command is refused, with a hint where it is allowed."""
    value = "app:${var:app/tag}" if key == "image" else "echo ${var:app/word}"
    image = "" if key == "image" else "    image: app:1\n"  # one image key: duplicates are refused
    text = f"services:\n  app:\n{image}    {key}: {json.dumps(value)}\n"
    with pytest.raises(ComposeError) as info:
        parse_compose(text)
    message = str(info.value)
    assert f"service 'app': {key}" in message
    assert "only in environment values and configs" in message


@pytest.mark.parametrize("ref", ["${var:}", "${var:nokey}", "${var:a//b}", "${var:a/b c}", "${var:/a}"])
@pytest.mark.parametrize("place", ["environment", "config"])
def test_compose_malformed_reference_is_refused(ref: str, place: str) -> None:
    """A malformed reference is named, with the right form, in env values and in templates."""
    if place == "environment":
        text = f"services:\n  app:\n    image: app:1\n    environment:\n      X: {json.dumps(ref)}\n"
    else:
        text = f"services:\n  app:\n    image: app:1\nconfigs:\n  a.conf:\n    content: {json.dumps(ref)}\n"
    with pytest.raises(ComposeError) as info:
        parse_compose(text)
    assert ref in str(info.value) and "${var:PATH/KEY}" in str(info.value)


@pytest.mark.parametrize("value", ["$HOME", "${HOME}", "a-${var:x/y}-$USER", "${VAR:-default}"])
def test_compose_shell_interpolation_still_refused(value: str) -> None:
    """The operator's shell variables are refused in env values and config content alike."""
    env = f"services:\n  app:\n    image: app:1\n    environment:\n      X: {json.dumps(value)}\n"
    conf = f"services:\n  app:\n    image: app:1\nconfigs:\n  a.conf:\n    content: {json.dumps(value)}\n"
    for text in (env, conf):
        with pytest.raises(ComposeError) as info:
            parse_compose(text)
        assert "variable interpolation" in str(info.value) and "$$" in str(info.value)


def test_compose_double_dollar_is_a_literal_dollar() -> None:
    """$$ is a literal $, in env values, config content and elsewhere; no reference comes of it."""
    spec = parse(
        """
        services:
          app:
            image: app:1
            command: ["sh", "-c", "echo $$HOME"]
            environment:
              X: "$$HOME and $${HOME}"
        configs:
          a.conf:
            content: "cost: $$5, $$PATH"
        """
    )
    assert spec.services[0].command == ("sh", "-c", "echo $HOME")
    assert spec.services[0].environment == {"X": "$HOME and ${HOME}"}
    assert spec.configs == {"a.conf": "cost: $5, $PATH"}
    assert stack_references(spec) == set()


@pytest.mark.parametrize("place", ["environment", "config"])
def test_compose_escaped_var_reference_is_not_a_reference(place: str) -> None:
    """$${var:a/b} is the literal text ${var:a/b}: it must not become a reference (or must be refused)."""
    if place == "environment":
        text = 'services:\n  app:\n    image: app:1\n    environment:\n      X: "$${var:db/password}"\n'
    else:
        text = (
            'services:\n  app:\n    image: app:1\nconfigs:\n  a.conf:\n    content: "$${var:db/password}"\n'
        )
    try:
        spec = parse_compose(text)
    except ComposeError:
        return  # refusing it is an acceptable fix too
    assert stack_references(spec) == set()


# --- agent: rendering before reconciling ---------------------------------------------------------

DEVICE = "dev-1"
STACK = "shop"


class RecordingDriver(FakeDriver):
    """The fake driver, remembering the service specs it created instances from and removals."""

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.created: list[tuple[str, ServiceSpec]] = []
        self.removed: list[Observed] = []

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        self.created.append((stack, service))
        super().create(stack, stack_spec, service)

    def remove(self, instance: Observed, grace: float) -> None:
        self.removed.append(instance)
        super().remove(instance, grace)


class Device:
    """An AgentCore on the fake driver and a memory store, with a key pair for secrets."""

    def __init__(self, with_key: bool = True) -> None:
        self.key = DeviceKey.generate()
        self.public = self.key.public
        self.driver = RecordingDriver(DEVICE)
        self.store = MemoryStore()
        self.link = RecordingLink()
        self.core = AgentCore(
            DEVICE, {}, self.driver, self.store, self.link, key=self.key if with_key else None
        )
        self.generation = 0

    def deploy(self, spec: StackSpec, *bindings: VarBinding) -> None:
        """A new generation running ``spec`` with ``bindings``, delivered as the broker would; one round."""
        self.generation += 1
        desired = DesiredState(
            device_id=DEVICE,
            generation=self.generation,
            stacks=(StackRef(name=STACK, spec_hash=spec.spec_hash()),),
            vars=bindings,
        )
        self.core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), codec.encode(desired))
        if spec.spec_hash() in self.core.awaiting:
            definition = StackDefinition(spec_hash=spec.spec_hash(), spec=spec)
            self.core.handle(topics.stack(spec.spec_hash()), codec.encode(definition))
        assert self.core.desired is not None and self.core.desired.generation == self.generation
        self.core.reconcile_once()

    def secret(self, ref: str, value: str, digest: str = "") -> VarBinding:
        return VarBinding(stack=STACK, ref=ref, sealed=seal_text(self.public, value), digest=digest or value)

    def instances(self) -> list[Observed]:
        return [i for i in self.driver.observe() if i.stack == STACK]


def plain(ref: str, value: str) -> VarBinding:
    return VarBinding(stack=STACK, ref=ref, value=value, digest=value)


def tamper(sealed: str) -> str:
    """``sealed`` with one byte of its ciphertext flipped."""
    raw = bytearray(base64.b64decode(sealed))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def env_stack() -> StackSpec:
    return StackSpec(
        services=(
            ServiceSpec(
                name="app",
                image="fake:1",
                environment={"DB_PASSWORD": "${var:db/password}", "MODE": "prod"},
            ),
        )
    )


def conf_stack(change_mode: str) -> StackSpec:
    return StackSpec(
        services=(
            ServiceSpec(
                name="app",
                image="fake:1",
                environment={"DB_PASSWORD": "${var:db/password}"},
                configs=(mount(change_mode=change_mode),),
            ),
        ),
        configs={"app.conf": "password=${var:db/password}\ngreeting=${var:app/greeting}\n"},
    )


def test_agent_runs_the_decrypted_secret() -> None:
    """The instance is created with the secret opened on the device; nothing is left unrendered."""
    device = Device()
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    assert len(device.driver.created) == 1
    stack, service = device.driver.created[0]
    assert stack == STACK and service.environment == {"DB_PASSWORD": "s3cret", "MODE": "prod"}
    [inst] = device.instances()
    assert inst.spec_hash == service.spec_hash() != env_stack().services[0].spec_hash()
    assert device.link.events("stack.render_failed") == []
    status = device.link.report().stacks[STACK]
    assert status.state == "running" and status.services["app"].last_error is None


def _assert_kept_running(device: Device, before: Observed, *, fragment: str) -> None:
    failed = device.link.events("stack.render_failed")
    assert len(failed) == 1, failed
    assert failed[0].level == "error" and failed[0].stack == STACK
    assert fragment in failed[0].message and "keeps running" in failed[0].message
    assert device.driver.removed == [] and len(device.driver.created) == 1
    assert device.instances() == [before]
    service_status = device.link.report().stacks[STACK].services["app"]
    assert service_status.state == "running"
    assert service_status.last_error is not None and fragment in service_status.last_error


def test_tampered_secret_keeps_the_old_spec_running() -> None:
    """A new generation whose secret cannot be opened: an error event, the service keeps its
    old spec (no remove, no create), and its status carries the error."""
    device = Device()
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    [before] = device.instances()
    bad = device.secret("db/password", "n3w")
    device.deploy(env_stack(), bad.model_copy(update={"sealed": tamper(bad.sealed or ""), "digest": "n3w"}))
    _assert_kept_running(device, before, fragment="cannot be opened")
    # Another round changes nothing and does not repeat the event.
    device.core.reconcile_once()
    assert len(device.link.events("stack.render_failed")) == 1 and device.instances() == [before]


def test_same_render_error_in_a_new_generation_is_not_repeated() -> None:
    """A new generation that fails the same way (another tampered seal) adds no second event."""
    device = Device()
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    [before] = device.instances()
    for value in ("n3w", "n3wer"):
        bad = device.secret("db/password", value)
        device.deploy(env_stack(), bad.model_copy(update={"sealed": tamper(bad.sealed or "")}))
    _assert_kept_running(device, before, fragment="cannot be opened")


def test_secret_sealed_for_another_device_cannot_be_opened() -> None:
    """A secret sealed to another key is refused like a tampered one."""
    device = Device()
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    [before] = device.instances()
    other = public_key_b64(PrivateKey.generate())
    foreign = VarBinding(stack=STACK, ref="db/password", sealed=seal_text(other, "x"), digest="x")
    device.deploy(env_stack(), foreign)
    _assert_kept_running(device, before, fragment="cannot be opened")


def test_binding_with_error_keeps_the_old_spec_running() -> None:
    """A binding the controller could not fill (error) keeps the stack as rendered before."""
    device = Device()
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    [before] = device.instances()
    device.deploy(env_stack(), VarBinding(stack=STACK, ref="db/password", error="not set (for device x)"))
    _assert_kept_running(device, before, fragment="not set (for device x)")


def test_render_recovers_after_a_failure() -> None:
    """Once the value can be opened again, the stack is rendered and the service replaced."""
    device = Device()
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    device.deploy(env_stack(), VarBinding(stack=STACK, ref="db/password", error="gone"))
    device.deploy(env_stack(), device.secret("db/password", "n3w"))
    assert [s.environment["DB_PASSWORD"] for _, s in device.driver.created] == ["s3cret", "n3w"]
    assert len(device.driver.removed) == 1 and len(device.instances()) == 1
    assert device.link.report().stacks[STACK].services["app"].last_error is None


def test_never_rendered_stack_is_left_alone() -> None:
    """Without a key the stack cannot be rendered: nothing is created, an instance already there
    is not removed, and the stack is reported with the error."""
    device = Device(with_key=False)
    stray = Observed("by-hand", STACK, "app", "0" * 64, "running")
    device.driver.add(stray)
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    assert device.driver.created == [] and device.driver.removed == []
    assert device.instances() == [stray]
    [failed] = device.link.events("stack.render_failed")
    assert "no key" in failed.message and "is not started" in failed.message
    status = device.link.report().stacks[STACK]
    assert status.services["app"].last_error is not None and "no key" in status.services["app"].last_error
    assert status.state != "running"


def test_missing_binding_is_a_render_error() -> None:
    """A reference the desired state has no binding for is a render failure: the literal
    ``${var:...}`` text must never reach a container."""
    device = Device()
    device.deploy(env_stack())
    assert device.driver.created == []
    [failed] = device.link.events("stack.render_failed")
    assert "'db/password'" in failed.message


def _conf_device(change_mode: str) -> tuple[Device, Observed]:
    device = Device()
    device.deploy(conf_stack(change_mode), device.secret("db/password", "pw"), plain("app/greeting", "hello"))
    [inst] = device.instances()
    assert device.store.configs == {(STACK, "app.conf"): b"password=pw\ngreeting=hello\n"}
    return device, inst


def test_signal_mode_signals_and_keeps_the_instance() -> None:
    """change_mode signal: a changed file is rewritten and the running instance gets SIGHUP."""
    device, before = _conf_device("signal")
    assert device.driver.signals == []
    device.deploy(conf_stack("signal"), device.secret("db/password", "pw"), plain("app/greeting", "bonjour"))
    assert device.store.configs[(STACK, "app.conf")] == b"password=pw\ngreeting=bonjour\n"
    assert device.driver.signals == [(STACK, "app", "SIGHUP")]
    assert device.instances() == [before] and device.driver.removed == []
    [changed] = device.link.events("config.changed")
    assert "SIGHUP" in changed.message and changed.service == "app"
    # Another round sends nothing more.
    device.core.reconcile_once()
    assert device.driver.signals == [(STACK, "app", "SIGHUP")]


def test_signal_mode_with_a_replaced_service_sends_no_signal() -> None:
    """When the same change also changes the environment, the service is replaced (it reads the
    new file when it starts): the old instance is not signalled, and nothing fails."""
    device, before = _conf_device("signal")
    device.deploy(conf_stack("signal"), device.secret("db/password", "pw2"), plain("app/greeting", "hello"))
    assert device.store.configs[(STACK, "app.conf")] == b"password=pw2\ngreeting=hello\n"
    assert device.driver.removed == [before] and len(device.instances()) == 1
    assert device.driver.signals == []
    assert device.link.events("action.failed") == []


def test_signal_mode_unchanged_content_sends_nothing() -> None:
    """A new generation that renders the same file (only another binding's digest) signals nobody."""
    device, before = _conf_device("signal")
    device.deploy(
        conf_stack("signal"),
        device.secret("db/password", "pw", digest="rotated-seal"),
        plain("app/greeting", "hello"),
    )
    assert device.driver.signals == [] and device.instances() == [before]


def test_noop_mode_neither_signals_nor_replaces() -> None:
    """change_mode noop: the file is rewritten, the service left as it is."""
    device, before = _conf_device("noop")
    device.deploy(conf_stack("noop"), device.secret("db/password", "pw"), plain("app/greeting", "bonjour"))
    assert device.store.configs[(STACK, "app.conf")] == b"password=pw\ngreeting=bonjour\n"
    assert device.driver.signals == []
    assert device.instances() == [before] and device.driver.removed == []


def test_restart_mode_replaces_the_instance() -> None:
    """change_mode restart: the content's digest is in the spec, so the instance is replaced."""
    device, before = _conf_device("restart")
    device.deploy(conf_stack("restart"), device.secret("db/password", "pw"), plain("app/greeting", "bonjour"))
    assert device.store.configs[(STACK, "app.conf")] == b"password=pw\ngreeting=bonjour\n"
    assert device.driver.signals == []
    assert device.driver.removed == [before]
    [after] = device.instances()
    assert after.id != before.id and after.spec_hash != before.spec_hash
    created = device.driver.created[-1][1].configs[0]
    assert created.host_path == device.store.config_path(STACK, "app.conf") and created.digest


def test_configs_are_pruned_with_the_stack() -> None:
    """When the stack goes, its rendered files go with it."""
    device, _ = _conf_device("noop")
    device.generation += 1
    empty = DesiredState(device_id=DEVICE, generation=device.generation)
    device.core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), codec.encode(empty))
    device.core.reconcile_once()
    assert device.store.configs == {} and device.instances() == []


# --- controller/variables.py ---------------------------------------------------------------------


def var(scope: str, path: str, **items: str) -> Variable:
    return Variable(scope=scope, path=path, items=items, keys=tuple(sorted(items)))


def test_resolve_prefers_device_then_group_then_fleet() -> None:
    """The device's own variable wins, then the stack's group's, then the fleet's; per key."""
    variables = {
        ("fleet", "db"): var("fleet", "db", password="fleet-pw", user="fleet-user", host="fleet-host"),
        ("group:berlin", "db"): var("group:berlin", "db", password="group-pw", user="group-user"),
        ("device:d1", "db"): var("device:d1", "db", password="device-pw"),
    }

    def value(device_id: str, group: str, ref: str) -> str | None:
        found = resolve(variables, device_id, group, ref)
        return None if found is None else found.items[ref.rpartition("/")[2]]

    assert value("d1", "berlin", "db/password") == "device-pw"
    assert value("d1", "berlin", "db/user") == "group-user"  # the device's variable lacks the key
    assert value("d1", "berlin", "db/host") == "fleet-host"
    assert value("d2", "berlin", "db/password") == "group-pw"
    assert value("d2", "paris", "db/password") == "fleet-pw"
    assert value("d1", "paris", "db/user") == "fleet-user"
    assert resolve(variables, "d1", "berlin", "db/port") is None
    assert resolve(variables, "d1", "berlin", "other/password") is None


def test_unresolved_lists_the_devices_without_a_value() -> None:
    variables = {
        ("group:berlin", "db"): var("group:berlin", "db", password="g"),
        ("device:d3", "api"): var("device:d3", "api", token="t"),
    }
    missing = unresolved(variables, ["api/token", "db/password", "db/user"], ["d1", "d2", "d3"], "berlin")
    assert missing == {"api/token": ["d1", "d2"], "db/user": ["d1", "d2", "d3"]}
    assert unresolved(variables, ["db/password"], ["d1", "d2"], "berlin") == {}
    assert unresolved(variables, ["db/password"], ["d1"], "paris") == {"db/password": ["d1"]}


def test_secrets_key_is_made_once_0600_and_reloaded(tmp_path: Path) -> None:
    """load_or_create writes a 0600 key file; loading again gives the same key."""
    first = SecretsKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SecretsKey.load_or_create(tmp_path)
    assert again.public_key == first.public_key
    assert again.digest("a", "b") == first.digest("a", "b")
    assert again.open_items(first.seal_items({"k": "v"}), "x") == {"k": "v"}
    assert SecretsKey.load_or_create(tmp_path / "other").public_key != first.public_key


def test_unreadable_secrets_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not base64!\n")
    with pytest.raises(StoreError, match="secrets key .* is unreadable"):
        SecretsKey.load_or_create(tmp_path)


@pytest.mark.parametrize("content", ["", base64.b64encode(b"truncated key").decode()])
def test_secrets_key_of_the_wrong_length_is_a_clear_error(tmp_path: Path, content: str) -> None:
    """An empty or truncated key file is a StoreError naming the file, like any unreadable one."""
    (tmp_path / KEY_FILE).write_text(content)
    with pytest.raises(StoreError, match="unreadable"):
        SecretsKey.load_or_create(tmp_path)


def test_seal_and_open_items_round_trip() -> None:
    key = SecretsKey(PrivateKey.generate())
    items = {"password": "p@ss w0rd", "user": "bob", "empty": "", "unicode": "grüße"}
    sealed = key.seal_items(items)
    assert "p@ss" not in sealed and "bob" not in base64.b64decode(sealed).decode("latin-1")
    assert key.open_items(sealed, "secret db") == items
    # Another key cannot open it.
    with pytest.raises(PayloadError, match="secret db: cannot be opened"):
        SecretsKey(PrivateKey.generate()).open_items(sealed, "secret db")


def test_open_items_of_tampered_or_malformed_data_raises() -> None:
    key = SecretsKey(PrivateKey.generate())
    sealed = key.seal_items({"k": "v"})
    with pytest.raises(PayloadError, match="what: cannot be opened"):
        key.open_items(tamper(sealed), "what")
    with pytest.raises(PayloadError, match="not base64"):
        key.open_items("%%%", "what")
    from tether.protocol.enrollment import seal_bytes

    with pytest.raises(PayloadError, match="not a JSON object"):
        key.open_items(seal_bytes(key.public_key, b"[1, 2]"), "what")
    with pytest.raises(PayloadError, match="string values"):
        key.open_items(seal_bytes(key.public_key, b'{"k": 1}'), "what")
    with pytest.raises(PayloadError, match="not a JSON object"):
        key.open_items(seal_bytes(key.public_key, b"{nope"), "what")


def test_digest_is_stable_keyed_and_unambiguous() -> None:
    one, two = SecretsKey(PrivateKey.generate()), SecretsKey(PrivateKey.generate())
    d = one.digest("db/password", "pubkey", "value")
    assert d == one.digest("db/password", "pubkey", "value")
    assert d != two.digest("db/password", "pubkey", "value")
    assert d != one.digest("db/password", "pubkey", "value2")
    assert one.digest("ab", "c") != one.digest("a", "bc")
    assert "value" not in d and len(d) == 32


def test_seal_text_round_trip_and_tamper() -> None:
    """The device side of a secret: open_text opens what seal_text sealed, refuses a tampered box."""
    key = PrivateKey.generate()
    sealed = seal_text(public_key_b64(key), "s3cret")
    assert open_text(key, sealed, "secret 'db/password'") == "s3cret"
    with pytest.raises(PayloadError, match="secret 'db/password': cannot be opened"):
        open_text(key, tamper(sealed), "secret 'db/password'")


# --- relative data directories (the quick start runs with ./tether-data) ---


def test_config_path_is_absolute_with_a_relative_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.agent.store import LocalStore

    monkeypatch.chdir(tmp_path)
    store = LocalStore(Path("data"))
    path = store.config_path("web", "app.conf")
    assert Path(path).is_absolute() and path == str(tmp_path / "data" / "configs" / "web" / "app.conf")
    assert store.write_config("web", "app.conf", b"x=1\n", 0o440) is True
    assert store.write_config("web", "app.conf", b"x=1\n", 0o440) is False
    assert Path(path).read_bytes() == b"x=1\n" and Path(path).stat().st_mode & 0o777 == 0o440


def test_process_driver_links_configs_again_and_refuses_escapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative data dir, a second start over the existing link, and a target leaving the work dir."""
    from tether.agent.drivers.process import ProcessDriver
    from tether.protocol.errors import DriverError

    monkeypatch.chdir(tmp_path)
    rendered = tmp_path / "rendered.conf"
    rendered.write_text("hello\n")
    driver = ProcessDriver("dev", Path("data"))
    mount = ConfigMount(source="app.conf", target="/etc/app.conf", host_path=str(rendered))
    service = ServiceSpec(name="svc", command=("true",), configs=(mount,))
    try:
        for _ in range(2):
            driver.create("st", StackSpec(services=(service,)), service)
            link = tmp_path / "data" / "work" / "st" / "svc" / "etc" / "app.conf"
            assert link.is_symlink() and link.read_text() == "hello\n"
        escape = service.model_copy(update={"configs": (mount.model_copy(update={"target": "../../../x"}),)})
        with pytest.raises(DriverError, match="leaves the work directory"):
            driver.create("st", StackSpec(services=(escape,)), escape)
    finally:
        for inst in driver.observe():
            driver.remove(inst, 1.0)


def test_a_controller_key_that_cannot_open_the_stored_secrets_is_refused(tmp_path: Path) -> None:
    """Another controller's key (or a new one after a restore without the old file) is a clear
    error at start, naming the file; the right key passes."""
    from tether.controller.models import Variable
    from tether.controller.store import Store

    right = SecretsKey.load_or_create(tmp_path / "right")
    wrong = SecretsKey.load_or_create(tmp_path / "wrong")
    store = Store(tmp_path / "t.db")
    try:
        wrong.check_store(store, tmp_path / "wrong")  # no secrets yet: any key will do
        store.put_variable(
            Variable(
                scope="fleet", path="db", secret=True, sealed=right.seal_items({"pw": "x"}), keys=("pw",)
            )
        )
        right.check_store(store, tmp_path / "right")
        with pytest.raises(StoreError, match=r"wrong/secrets.key cannot open the secrets in this database"):
            wrong.check_store(store, tmp_path / "wrong")
        with pytest.raises(StoreError, match=r"missing but this database holds secrets"):
            SecretsKey.for_store(store, tmp_path / "new")
        assert not (tmp_path / "new" / KEY_FILE).exists()  # no new key that could never open them
        assert SecretsKey.for_store(store, tmp_path / "right").public_key == right.public_key
    finally:
        store.close()


def test_a_stack_with_nothing_to_render_runs_as_it_is() -> None:
    """No config, no variable reference, no ``stack`` volume, no binding: the renderer hands the
    spec itself (nothing scanned, written or placed); any one of those and it renders as before.
    What it remembers per stack content never answers for another content (the stacks below
    differ by one value each, asked in turn, the plain one again last)."""
    from tether.agent.rendering import _as_is

    plain_spec = StackSpec(services=(ServiceSpec(name="app", image="fake:1", environment={"MODE": "prod"}),))
    device = Device()
    device.deploy(plain_spec)
    received = device.core.specs[plain_spec.spec_hash()]  # (decoded from the definition)
    [(_, created)] = device.driver.created
    assert created is received.services[0] and created == plain_spec.services[0]
    assert device.core.renderer.renderings[STACK].spec is received
    assert device.store.configs == {}
    volume = VolumeSpec(type="stack", source="data", target="/data")
    others = [
        env_stack(),
        conf_stack("restart"),
        StackSpec(services=(ServiceSpec(name="app", image="fake:1", volumes=(volume,)),)),
    ]
    for other in [*others, plain_spec]:
        assert _as_is(other) is (other is plain_spec)
    # A binding (here one whose value failed on the controller) is always looked at.
    device.deploy(plain_spec, VarBinding(stack=STACK, ref="db/password", error="no such variable"))
    failed = device.link.events("stack.render_failed")
    assert len(failed) == 1 and "no such variable" in failed[0].message
    # And the env stack, deployed next, is rendered with its secret.
    device.deploy(env_stack(), device.secret("db/password", "s3cret"))
    assert device.driver.created[-1][1].environment == {"DB_PASSWORD": "s3cret", "MODE": "prod"}
