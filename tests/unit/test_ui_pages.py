"""The web UI's pages (controller/ui) over a real controller and store, through Starlette's test client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from support.fleet import online
from tether.controller.http.app import create_app
from tether.controller.security import ensure_operator_credentials
from tether.controller.service import Controller
from tether.controller.users import ensure_user
from tether.protocol import codec, topics
from tether.protocol.commands import DevicesShow
from tether.protocol.models import Event
from tether.protocol.topics import DeviceTopic

XSS = "<script>alert(1)</script>"


@pytest.fixture
def client(controller: Controller, tmp_path: Any) -> Iterator[TestClient]:
    """The UI router on a local app over ``controller``; the admin operator's password in ``client.password``."""
    ensure_operator_credentials(controller.store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    ensure_user(controller.store, "admin", "admin", 0.0)
    app = create_app(controller)  # the HTTP API's app, which mounts the UI's router
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        test_client.password = json.loads((tmp_path / "operator.json").read_text())["password"]
        yield test_client


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def _login(client: TestClient, user: str = "admin", password: str | None = None) -> str:
    """Log in as ``user``; the CSRF token of the session's forms."""
    page = client.get("/ui/login")
    answer = client.post(
        "/ui/login",
        data={
            "user": user,
            "password": password or client.password,
            "csrf": _csrf(page.text),
            "next": "/ui/",
        },
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return _csrf(client.get("/ui/").text)


def test_pages_need_a_login_and_send_secure_headers(client: TestClient) -> None:
    """Every page redirects to the login page without a session; responses carry the CSP and frame denial."""
    for path in ("/ui/", "/ui/devices", "/ui/devices/x", "/ui/stacks", "/ui/pending", "/ui/groups"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login"), path
    page = client.get("/ui/login")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text.replace('<script src="/ui/static/tether.js" defer></script>', "")


def test_login_sets_a_strict_httponly_cookie_and_refuses_wrong_passwords(client: TestClient) -> None:
    """A wrong password is refused with 401; the right one sets an HttpOnly SameSite=Strict cookie; a
    login form without its CSRF token is refused."""
    page = client.get("/ui/login")
    wrong = client.post("/ui/login", data={"user": "admin", "password": "nope", "csrf": _csrf(page.text)})
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    forged = client.post("/ui/login", data={"user": "admin", "password": client.password, "csrf": "x"})
    assert forged.status_code == 403 and "tether_session" not in forged.headers.get("set-cookie", "")
    page = client.get("/ui/login")
    answer = client.post(
        "/ui/login",
        data={
            "user": "admin",
            "password": client.password,
            "csrf": _csrf(page.text),
            "next": "https://evil.example/",
        },
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("tether_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")


def test_device_strings_are_escaped(client: TestClient, controller: Controller) -> None:
    """A device label and an event message holding <script> are shown as text on every page."""
    online(controller, "evil-1", labels={"note": XSS})
    event = Event(device_id="evil-1", seq=1, kind="service.crashed", message=XSS, level="error", at=1.0)
    controller.handle(topics.device("evil-1", DeviceTopic.EVENTS), codec.encode(event))
    _login(client)
    for path in ("/ui/devices", "/ui/devices/evil-1", "/ui/devices?q=alert"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert XSS not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path


def test_devices_page_searches_and_pages(client: TestClient, controller: Controller) -> None:
    """120 devices: page 1 shows 50 with a link to page 2; a search by id and by key=value narrows them."""
    for n in range(120):
        online(controller, f"dev-{n:03d}", labels={"site": "north" if n % 2 else "south"})
    _login(client)
    first = client.get("/ui/devices")
    assert "120 of 120 devices · page 1 of 3" in first.text
    assert (
        first.text.count('data-device="') == 50
        and 'href="/ui/devices?after=dev-049&amp;page=2"' in first.text
    )
    second = client.get("/ui/devices", params={"after": "dev-049", "page": 2})
    assert "page 2 of 3" in second.text and 'data-device="dev-050"' in second.text
    assert 'data-device="dev-049"' not in second.text
    found = client.get("/ui/devices", params={"q": "dev-11"})
    assert "10 of 120 devices" in found.text
    north = client.get("/ui/devices", params={"q": "site=north", "after": "dev-099", "page": 2})
    assert "60 of 120 devices · page 2 of 2" in north.text and north.text.count('data-device="') == 10
    fragment = client.get("/ui/devices", headers={"X-Tether-Fragment": "1"})
    assert "<html" not in fragment.text and "120 of 120 devices" in fragment.text


def test_forms_need_the_csrf_token(client: TestClient, controller: Controller) -> None:
    """A deploy posted without the session's CSRF token is refused and deploys nothing."""
    online(controller, "d1")
    csrf = _login(client)
    client.post("/ui/deploy", data={"csrf": csrf, "name": "x", "group": "g", "compose": "", "action": "plan"})
    forged = client.post(
        "/ui/deploy",
        data={"name": "web", "group": "g", "compose": "services: {a: {image: x}}", "action": "deploy"},
    )
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert controller.store.list_stacks() == []


def test_dry_run_shows_every_error_and_deploy_goes_to_the_deployment(
    client: TestClient, controller: Controller
) -> None:
    """The editor's dry run lists each problem of a bad Compose file and changes nothing; a good one
    deploys and lands on its deployment page, which offers pause."""
    online(controller, "d1")
    csrf = _login(client)
    page = client.get("/ui/deploy")
    assert page.status_code == 200 and "Compose file" in page.text
    from tether.protocol.commands import GroupsCreate

    controller.execute(GroupsCreate(name="g", devices=("d1",)))
    bad = "services:\n  a:\n    image: 3\n    restart: sometimes\n  b:\n    ports: nope\n"
    planned = client.post(
        "/ui/deploy", data={"csrf": csrf, "name": "web", "group": "g", "compose": bad, "action": "plan"}
    )
    assert planned.status_code == 400
    problems = re.findall(r"<li>(.*?)</li>", planned.text.split('id="errors"')[1].split("</ul>")[0], re.S)
    assert len(problems) >= 2, planned.text
    assert any("restart" in p for p in problems) and any("ports" in p for p in problems), problems
    assert not any(p.startswith("- ") or p.endswith(":") for p in problems), problems
    assert controller.store.list_stacks() == []
    good = "services:\n  a:\n    image: busybox\n    command: [sleep, '600']\n"
    dry = client.post(
        "/ui/deploy", data={"csrf": csrf, "name": "web", "group": "g", "compose": good, "action": "plan"}
    )
    assert dry.status_code == 200 and "a: added" in dry.text and controller.store.list_stacks() == []
    done = client.post(
        "/ui/deploy",
        data={
            "csrf": csrf,
            "name": "web",
            "group": "g",
            "compose": good,
            "action": "deploy",
            "min_healthy": "1",
        },
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"].startswith("/ui/deployments/"), done.text
    shown = client.get(done.headers["location"])
    assert "Deployment 1 of" in shown.text and 'data-device="d1"' in shown.text
    stack = client.get("/ui/stacks/web")
    assert "image: busybox" in stack.text and 'data-device="d1"' in stack.text


def test_a_viewer_sees_no_mutating_buttons_and_is_refused(client: TestClient, controller: Controller) -> None:
    """A viewer (a user of the controller) logs in; its pages have no deploy, approve or deployment
    buttons, and posting them anyway is refused with 403 without changing anything; a user removed
    meanwhile is logged out."""
    from tether.protocol.commands import UsersAdd, UsersRemove

    online(controller, "d1")
    password = controller.execute(UsersAdd(name="vera", role="viewer")).password
    csrf = _login(client, "vera", password)
    for path in ("/ui/stacks", "/ui/pending", "/ui/"):
        page = client.get(path)
        assert page.status_code == 200 and "vera (viewer)" in page.text, path
        assert (
            'href="/ui/deploy"' not in page.text
            and 'href="/ui/deploy?' not in page.text
            and "Approve selected" not in page.text
        ), path
    assert client.get("/ui/deploy").status_code == 403
    refused = client.post(
        "/ui/deploy",
        data={
            "csrf": csrf,
            "name": "web",
            "group": "g",
            "compose": "services: {a: {image: x}}",
            "action": "deploy",
        },
    )
    assert refused.status_code == 403 and "operator role" in refused.text
    assert controller.store.list_stacks() == []
    assert client.post("/ui/pending", data={"csrf": csrf, "device": "d1"}).status_code == 403
    assert client.post("/ui/groups", data={"csrf": csrf, "name": "g2"}).status_code == 403
    assert controller.store.list_groups() == []
    controller.execute(UsersRemove(name="vera"))
    gone = client.get("/ui/", follow_redirects=False)
    assert gone.status_code == 303 and gone.headers["location"].startswith("/ui/login")


def test_the_session_cookie_opens_the_event_stream(client: TestClient, controller: Controller) -> None:
    """The API's /api/v1/events refuses a browser without a session, and streams the bus's events
    (named by kind, as the pages' script listens to them) to one logged in to the dashboard."""
    import threading

    from tether.controller.fleet_events import FleetEvent

    assert client.get("/api/v1/events").status_code == 401
    _login(client)
    page = client.get("/ui/").text
    assert 'data-stream="/api/v1/events"' in page and "device.online" in page and "events.lost" in page
    with client.stream("GET", "/api/v1/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines).startswith(":")  # the stream opened (its comment line)

        def emit() -> None:
            while not controller.bus.listening:
                threading.Event().wait(0.01)
            controller.bus.emit(FleetEvent("device.online", "devices/d1", 1.0, {"note": XSS}))

        threading.Thread(target=emit, daemon=True).start()
        named = next(line for line in lines if line.startswith("event:"))
        data = next(line for line in lines if line.startswith("data:"))
    assert named.removeprefix("event:").strip() == "device.online"
    event = json.loads(data.removeprefix("data:"))
    assert (event["kind"], event["subject"], event["data"]["note"]) == ("device.online", "devices/d1", XSS)


def test_manage_groups_tokens_users_and_read_the_audit(client: TestClient, controller: Controller) -> None:
    """An admin creates a group, a token (its secret shown once, never listed) and a user (its
    password shown once), removes them, sees each write in the audit log; a bad form says what is
    wrong and changes nothing."""
    csrf = _login(client)
    made = client.post(
        "/ui/groups", data={"csrf": csrf, "name": "lab", "devices": "pi-1, pi-2"}, follow_redirects=False
    )
    assert made.status_code == 303 and [g.name for g in controller.store.list_groups()] == ["lab"]
    bad = client.post("/ui/groups", data={"csrf": csrf, "name": "x", "devices": "a", "selector": "site=1"})
    assert bad.status_code == 400 and 'id="errors"' in bad.text
    assert [g.name for g in controller.store.list_groups()] == ["lab"]
    token = client.post("/ui/tokens", data={"csrf": csrf, "group": "lab", "labels": "site=lab", "uses": "2"})
    secret = re.search(r'id="shown-once">.*?<pre>(tet_[^<]+)</pre>', token.text, re.S)
    assert token.status_code == 200 and secret, token.text
    listed = client.get("/ui/tokens").text
    assert secret.group(1) not in listed and "site=lab" in listed
    assert client.post("/ui/tokens", data={"csrf": csrf, "labels": "nolabel"}).status_code == 400
    user = client.post("/ui/users", data={"csrf": csrf, "name": "otto", "role": "operator"})
    assert user.status_code == 200 and 'id="shown-once"' in user.text and "otto" in user.text
    removed = client.post("/ui/users/otto/rm", data={"csrf": csrf}, follow_redirects=False)
    assert removed.status_code == 303 and "otto" not in client.get("/ui/users").text
    assert client.post("/ui/groups/lab/rm", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert controller.store.list_groups() == []
    audit = client.get("/ui/audit").text
    for kind in ("groups.create", "tokens.create", "users.add", "users.rm", "groups.rm"):
        assert kind in audit, kind
    assert secret.group(1) not in audit
    assert client.post("/ui/groups/x/rm", data={}).status_code == 403  # no CSRF token


def test_admin_changes_a_role_and_resets_a_password(client: TestClient, controller: Controller) -> None:
    """An admin changes a user's role and resets its password from the users page (the new password
    shown once, and working); the last admin cannot be demoted; an operator sees no such button and
    is refused."""
    from tether.protocol.commands import UsersAdd

    old = controller.execute(UsersAdd(name="otto", role="operator")).password
    csrf = _login(client)
    assert 'action="/ui/users/otto/passwd"' in client.get("/ui/users").text
    changed = client.post("/ui/users/otto/passwd", data={"csrf": csrf, "role": "viewer"})
    once = re.search(r'id="shown-once">.*?password of otto.*?<pre>([^<]+)</pre>', changed.text, re.S)
    assert changed.status_code == 200 and once, changed.text
    user = controller.store.get_user("otto")
    assert user is not None and user.role == "viewer"
    reset = client.post("/ui/users/otto/passwd", data={"csrf": csrf})
    again = re.search(r'id="shown-once">.*?<pre>([^<]+)</pre>', reset.text, re.S)
    assert reset.status_code == 200 and again and again.group(1) not in (once.group(1), old)
    assert again.group(1) not in client.get("/ui/users").text  # shown once only
    last = client.post("/ui/users/admin/passwd", data={"csrf": csrf, "role": "viewer"})
    assert last.status_code == 400 and "last admin" in last.text
    assert controller.store.get_user("admin").role == "admin"  # type: ignore[union-attr]
    assert client.post("/ui/users/otto/passwd", data={"role": "admin"}).status_code == 403  # no CSRF
    password = controller.execute(UsersAdd(name="opal", role="operator")).password
    csrf = _login(client, "opal", password)
    assert "Reset password" not in client.get("/ui/users").text
    refused = client.post("/ui/users/otto/passwd", data={"csrf": csrf, "role": "admin"})
    assert refused.status_code == 403 and controller.store.get_user("otto").role == "viewer"  # type: ignore[union-attr]
    _login(client, "otto", again.group(1))  # the reset password logs in


def test_variables_set_and_secrets_stay_write_only(client: TestClient, controller: Controller) -> None:
    """A plain variable and a secret are set from the dashboard; the secret is stored sealed, its value
    never appears on a page; a malformed line is refused; a variable is removed."""
    csrf = _login(client)
    plain = client.post(
        "/ui/variables", data={"csrf": csrf, "path": "app/site", "items": "NAME=north pole\nLEVEL=3"}
    )
    assert plain.status_code == 200 and "app/site" in plain.text  # redirected to the list
    hidden = "s3cr3t-value-never-shown"
    secret = client.post(
        "/ui/variables",
        data={"csrf": csrf, "path": "app/db", "items": f"PASSWORD={hidden}", "secret": "on", "group": ""},
        follow_redirects=False,
    )
    assert secret.status_code == 303, secret.text
    page = client.get("/ui/variables").text
    assert "app/site" in page and "app/db" in page and "PASSWORD" in page and hidden not in page
    from tether.protocol.commands import VarsGet

    stored = controller.execute(VarsGet(path="app/db")).variable
    assert stored.secret and stored.items is None and stored.keys == ["PASSWORD"]  # sealed: no value to read
    bad = client.post("/ui/variables", data={"csrf": csrf, "path": "app/x", "items": "no equals sign"})
    assert bad.status_code == 400 and "expected KEY=VALUE" in bad.text
    gone = client.post("/ui/variables/-/rm", data={"csrf": csrf, "path": "app/site"}, follow_redirects=False)
    assert gone.status_code == 303 and "app/site" not in client.get("/ui/variables").text


def test_job_page_shows_runs_and_their_output(client: TestClient, controller: Controller) -> None:
    """A job's page lists each device's latest run (a failure shown as failed, with its exit code)
    and the runs' output, escaped."""
    from support.fleet import job_result
    from tether.protocol.commands import GroupsCreate, JobsRun
    from tether.protocol.models import JobResult

    online(controller, "j1")
    online(controller, "j2")
    controller.execute(GroupsCreate(name="g", devices=("j1", "j2")))
    controller.execute(JobsRun(name="probe", group="g", command=("sh", "-c", "true")))
    job_result(
        controller,
        "j1",
        1,
        JobResult(job="probe", run="r1", started=1.0, duration_s=0.5, exit_code=0, output="all good"),
    )
    job_result(
        controller,
        "j2",
        1,
        JobResult(job="probe", run="r1", started=1.0, duration_s=0.5, exit_code=7, output=XSS),
    )
    _login(client)
    assert 'href="/ui/jobs/probe"' in client.get("/ui/jobs").text
    page = client.get("/ui/jobs/probe").text
    assert "all good" in page and "exit 7" in page and XSS not in page and "&lt;script&gt;" in page
    assert page.count("s-succeeded") >= 1 and page.count("s-failed") >= 1


def test_run_a_job_now_from_the_job_page(client: TestClient, controller: Controller) -> None:
    """An operator runs a job now from the jobs page and again from a job's page (prefilled, as a
    new job); bad quoting or an unknown group is refused and runs nothing; a viewer sees no form and
    is refused."""
    from tether.protocol.commands import GroupsCreate, UsersAdd

    online(controller, "r1")
    controller.execute(GroupsCreate(name="g", devices=("r1",)))
    csrf = _login(client)
    assert "Run now" in client.get("/ui/jobs").text
    form = {"csrf": csrf, "name": "check", "group": "g", "command": "sh -c 'df -h /'", "timeout_s": "60"}
    ran = client.post("/ui/jobs", data=form, follow_redirects=False)
    assert ran.status_code == 303 and ran.headers["location"] == "/ui/jobs/check"
    job = controller.store.get_job("check")
    assert job is not None and job.group == "g" and job.spec.command == ("sh", "-c", "df -h /")
    assert job.spec.timeout_s == 60
    page = client.get("/ui/jobs/check").text
    assert 'value="check-again"' in page and 'value="sh -c &#39;df -h /&#39;"' in page
    again = client.post("/ui/jobs", data={**form, "name": "check-again"}, follow_redirects=False)
    assert again.status_code == 303 and controller.store.get_job("check-again") is not None
    bad = client.post("/ui/jobs", data={**form, "name": "q", "command": "sh -c 'oops"})
    assert bad.status_code == 400 and "quote as a shell would" in bad.text
    unknown = client.post("/ui/jobs", data={**form, "name": "u", "group": "nope"})
    assert unknown.status_code == 400 and "unknown group" in unknown.text
    assert controller.store.get_job("q") is None and controller.store.get_job("u") is None
    password = controller.execute(UsersAdd(name="vic", role="viewer")).password
    csrf = _login(client, "vic", password)
    assert "Run now" not in client.get("/ui/jobs").text and "Run now" not in client.get("/ui/jobs/check").text
    refused = client.post("/ui/jobs", data={**form, "csrf": csrf, "name": "v"})
    assert refused.status_code == 403 and controller.store.get_job("v") is None


def test_device_labels_and_usage(client: TestClient, controller: Controller) -> None:
    """An operator sets and removes a device's labels from its page (shown with their provenance);
    the latest metrics sample shows as meters; a malformed label is refused."""
    from tether.protocol.device_api import MetricsSample

    online(controller, "m1", labels={"own": "yes"})
    sample = MetricsSample(
        at=1.0, full=True, cpu=42.0, mem=2 << 30, mem_total=4 << 30, disk=1 << 30, disk_total=8 << 30
    )
    controller.handle(topics.device("m1", DeviceTopic.METRICS), codec.encode(sample))
    csrf = _login(client)
    page = client.get("/ui/devices/m1").text
    assert 'value="42.0"' in page and "2.0 GB of 4.0 GB" in page
    done = client.post("/ui/devices/m1/labels", data={"csrf": csrf, "set": "site=north rack=4"})
    assert done.status_code == 200 and "labels changed" in done.text
    assert "<td>site</td><td>north</td><td>operator</td>" in done.text.replace("\n", "")
    assert client.post("/ui/devices/m1/labels", data={"csrf": csrf, "remove": "rack"}).status_code == 200
    labels = controller.execute(DevicesShow(device_id="m1")).device.labels
    assert labels == {"own": "yes", "site": "north"}
    assert client.post("/ui/devices/m1/labels", data={"csrf": csrf, "set": "oops"}).status_code == 400


def test_device_page_charts_recent_usage(client: TestClient, controller: Controller) -> None:
    """Samples received over time show as inline SVG charts with their numbers as text; devices.metrics
    gives the same points and names an unknown device."""
    from tether.protocol.commands import DevicesMetrics
    from tether.protocol.device_api import MetricsSample
    from tether.protocol.errors import NotFoundError

    online(controller, "m2")
    _login(client)
    assert "<svg" not in client.get("/ui/devices/m2").text  # no sample yet: no chart
    for i, cpu in enumerate((10.0, 30.0)):
        sample = MetricsSample(
            at=float(i), full=True, cpu=cpu, mem=1 << 30, mem_total=4 << 30, disk=1 << 30, disk_total=2 << 30
        )
        controller.handle(topics.device("m2", DeviceTopic.METRICS), codec.encode(sample))
        controller.clock.now += 300  # type: ignore[attr-defined]
    history = controller.execute(DevicesMetrics(device_id="m2"))
    assert [p for p in history.cpu if p is not None][-3:] == [10.0, 30.0, 30.0]  # the last carried over
    assert history.mem[-2:] == [25.0, 25.0] and len(history.disk) == 72
    page = client.get("/ui/devices/m2").text
    assert page.count("<svg") == 3 and "<polyline points=" in page
    assert "CPU: now 30.0 % · min 10.0 % · mean 23.3 % · max 30.0 %" in page
    assert "Memory: now 25.0 %" in page and "Disk: now 50.0 %" in page
    with pytest.raises(NotFoundError):
        controller.execute(DevicesMetrics(device_id="nope"))


def test_registry_credentials_are_sealed_and_never_shown(client: TestClient, controller: Controller) -> None:
    """An admin adds registry credentials from the dashboard: listed by host and scope, the password
    on no page; then removed."""
    csrf = _login(client)
    added = client.post(
        "/ui/registries",
        data={
            "csrf": csrf,
            "host": "cr.internal.test",
            "username": "bot",
            "password": "hunter2-never-shown",
        },
    )
    assert added.status_code == 200 and "<td>cr.internal.test</td>" in added.text
    assert (
        "hunter2-never-shown" not in added.text
        and "hunter2-never-shown" not in client.get("/ui/registries").text
    )
    gone = client.post("/ui/registries/-/rm", data={"csrf": csrf, "host": "cr.internal.test"})
    assert gone.status_code == 200 and "cr.internal.test" not in gone.text


def test_static_files_are_served_and_shipped(client: TestClient) -> None:
    """The stylesheet and script are served with their types and the secure headers, nothing else
    is (no path out of static/), and pyproject's package-data ships every template and asset."""
    import fnmatch
    import tomllib
    from pathlib import Path

    script = client.get("/ui/static/tether.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "EventSource" in script.text and script.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/static/tether.css").headers["content-type"].startswith("text/css")
    for bad in ("../routes.py", "..%2Froutes.py", "routes.py", ".hidden.js", "nope.js"):
        assert client.get(f"/ui/static/{bad}").status_code == 404, bad
    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = globs["tether.controller.ui"]
    ui = root / "controller" / "ui"
    files = [p.relative_to(ui).as_posix() for d in ("templates", "static") for p in (ui / d).iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in shipped) for f in files), files


def test_stack_page_pages_its_devices(client: TestClient, controller: Controller) -> None:
    """A stack on 60 devices: its page counts them by state, lists 50 with a link to the rest, and
    filters by state."""
    from tether.protocol.commands import GroupsCreate, StacksDeploy

    for n in range(60):
        online(controller, f"s-{n:02d}")
    controller.execute(GroupsCreate(name="all", devices=tuple(f"s-{n:02d}" for n in range(60))))
    controller.execute(StacksDeploy(name="app", group="all", compose="services:\n  a:\n    image: busybox\n"))
    _login(client)
    page = client.get("/ui/stacks/app").text
    assert "Devices (60)" in page and page.count('<tr data-device="') == 50
    assert 'href="/ui/stacks/app?state=&amp;after=s-49"' in page
    rest = client.get("/ui/stacks/app", params={"after": "s-49"}).text
    assert rest.count('<tr data-device="') == 10 and 'data-device="s-59"' in rest
    none = client.get("/ui/stacks/app", params={"state": "failed"}).text
    assert none.count('<tr data-device="') == 0
