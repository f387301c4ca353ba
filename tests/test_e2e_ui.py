"""The web dashboard in a real browser (Debian's Chromium driven by Playwright) against a real
controller (`tether up --http`) and a real agent: log in, approve a waiting device and see it come
online without reloading, deploy from the editor (the dry run lists every error) and watch it
converge, see a crash loop turn red with its log tail, follow a service's logs, and a viewer who cannot deploy (issue 20)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.procs import AgentProcess, ControllerProcess, cli, cli_json
from tether.protocol.client import ControllerClient
from tether.protocol.commands import UsersAdd

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
WEB = 'services:\n  web:\n    command: ["sh", "-c", "echo serving; exec sleep 600"]\n    restart: always\n'
BAD = "services:\n  web:\n    restart: sometimes\n    ports: nope\n    bogus: 1\n"
CRASHY = 'services:\n  boom:\n    command: ["sh", "-c", "echo boom-went-the-service; exit 3"]\n    restart: always\n'
RED = "rgb(179, 71, 0)"  # --bad in tether.css (Okabe-Ito vermillion, darkened for contrast)
DEADLINE_MS = 60_000
SHOTS = os.environ.get("TETHER_UI_SCREENSHOTS")
"""A directory to save screenshots of the main pages in (scripts/ui-screenshots: docs/screenshots)."""


def shot(page: Any, name: str) -> None:
    """Save a screenshot of ``page`` as NAME.png when asked to (``TETHER_UI_SCREENSHOTS``)."""
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@contextmanager
def browser_context(user_data: Path) -> Iterator[Any]:
    """Debian's Chromium, headless, in a fresh profile (never a downloaded browser)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM) and not os.environ.get("TETHER_REQUIRE_BROWSER"):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ControllerProcess, str]]:
    """`tether up` with authentication and `--http` on an ephemeral port; its base URL."""
    controller = ControllerProcess(tmp_path / "ctl", auth=True, extra=["--http", "127.0.0.1:0"])
    try:
        port = controller.wait_for_line(r"health and metrics on http://[^/\s]+:(\d+)/metrics").group(1)
        monkeypatch.setenv("TETHER_CREDENTIALS", str(controller.operator_file))
        yield controller, f"http://127.0.0.1:{port}"
    finally:
        controller.stop()


def _enroll_config(tmp_path: Path, url: str, token: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'brokers = ["{url}"]\nenrollment_token = "{token}"\n')
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One browser for the module's tests (each on its own host name: their cookies stay apart)."""
    with browser_context(tmp_path_factory.mktemp("chromium")) as context:
        yield context


def test_dashboard_end_to_end(fleet: tuple[ControllerProcess, str], browser: Any, tmp_path: Path) -> None:
    """Log in; a device enrolling shows up in the waiting room live, is approved there and comes
    online on the overview without a reload; the editor's dry run lists every error of a bad file,
    a good one deploys and its deployment page turns succeeded by itself; a crash-looping stack
    turns red on the device page with its log tail; a service's logs are followed and the service restarted;
    logging out
    ends the session; a viewer gets no deploy link and the editor is refused."""
    controller, base = fleet
    password = json.loads(controller.operator_file.read_text())["password"]
    token = cli_json(controller.url, "tokens", "create")["token"]
    agent: AgentProcess | None = None
    try:
        with contextlib.nullcontext(browser) as context:
            page = context.new_page()
            page.set_viewport_size({"width": 1280, "height": 800})
            page.set_default_timeout(DEADLINE_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(f"{base}/ui/pending")
            assert "/ui/login" in page.url
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", "wrong")
            page.click("button[type=submit]")
            assert "wrong user name or password" in page.inner_text("main")
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/ui/pending")
            page.wait_for_selector("#live[data-state=on]")

            # A device asks to join: the waiting room shows it without a reload.
            page.evaluate("window.__kept = true")
            agent = AgentProcess(
                controller.url, "ui-1", tmp_path / "agent", extra=["--config", str(_enroll_config(tmp_path, controller.url, token))]
            )  # fmt: skip
            page.wait_for_selector("input[name=device][value=ui-1]")
            assert page.evaluate("window.__kept") is True
            shot(page, "waiting-room")
            page.click("button[data-select-all=device]")
            assert page.is_checked("input[name=device][value=ui-1]")
            page.click("button[value=approve]")
            page.wait_for_selector("text=approved 1")

            # The overview counts it online, live.
            page.goto(f"{base}/ui/")
            page.evaluate("window.__kept = true")
            page.wait_for_selector("#count-online:text-is('1')")  # the CSP refuses wait_for_function's eval
            assert page.evaluate("window.__kept") is True
            assert cli(controller.url, "groups", "create", "lab", "--device", "ui-1").returncode == 0

            # Deploy from the editor: every error at once, then a good file converging live.
            page.goto(f"{base}/ui/deploy")
            page.fill("input[name=name]", "web")
            page.fill("input[name=group]", "lab")
            page.fill("textarea[name=compose]", BAD)
            page.click("button[value=plan]")
            problems = page.locator("#errors li").all_inner_texts()
            assert len(problems) >= 2, problems
            shot(page, "deploy-dry-run")
            assert cli_json(controller.url, "stacks", "ls") == []
            page.fill("textarea[name=compose]", WEB)
            page.fill("input[name=min_healthy]", "1")
            page.click("button[value=plan]")
            assert "web: added" in page.inner_text("#plan")
            page.click("button[value=deploy]")
            page.wait_for_url(re.compile(r".*/ui/deployments/\d+"))
            page.evaluate("window.__kept = true")
            page.wait_for_selector("h1 .s-succeeded")
            assert page.evaluate("window.__kept") is True
            assert page.locator("tr[data-device=ui-1] .s-running").count() >= 1
            shot(page, "deployment")

            # A crash loop turns red on the device page, with the service's log tail.
            page.goto(f"{base}/ui/deploy")
            page.fill("input[name=name]", "crashy")
            page.fill("input[name=group]", "lab")
            page.fill("textarea[name=compose]", CRASHY)
            page.fill("input[name=min_healthy]", "1")
            page.click("button[value=deploy]")
            page.wait_for_url(re.compile(r".*/ui/deployments/\d+"))
            page.goto(f"{base}/ui/devices/ui-1")
            page.evaluate("window.__kept = true")
            failed = page.wait_for_selector("[data-stack=crashy] h3 .s-failed")
            assert failed is not None and "failed" in failed.inner_text()
            assert (
                page.evaluate(
                    "getComputedStyle(document.querySelector('[data-stack=crashy] h3 .s-failed')).backgroundColor"
                )
                == RED
            )
            page.wait_for_selector("pre.logs:has-text('boom-went-the-service')")
            assert page.evaluate("window.__kept") is True
            shot(page, "device")

            # Follow a service's logs: the last lines come from the device, over the broker.
            page.select_option("#follow-stack", "web")
            page.click("#follow-start")
            page.wait_for_selector("#follow-output:has-text('serving')")
            page.click("#follow-stop")
            page.wait_for_selector("#follow-output:has-text('stopped')")

            # Restart a service: the device answers with the new instance.
            page.click("button[aria-label='restart web/web']")
            page.wait_for_selector("text=restarted web/web")
            page.goto(f"{base}/ui/devices?state=failed")
            assert page.locator("tr[data-device=ui-1]").count() == 1
            for name, path in (("overview", "/ui/"), ("devices", "/ui/devices"), ("stack", "/ui/stacks/web")):
                page.goto(base + path)
                shot(page, name)
            assert page.locator("a[href='/ui/deploy?name=web']").count() == 1  # the admin may deploy
            page.set_viewport_size({"width": 768, "height": 1024})  # a tablet
            page.goto(f"{base}/ui/")
            assert page.locator("nav a[href='/ui/devices']").is_visible()
            shot(page, "overview-tablet")

            # Logging out ends the session: pages ask for a login again.
            page.click("text=Log out")
            page.wait_for_url(re.compile(r".*/ui/login"))
            page.goto(f"{base}/ui/")
            assert "/ui/login" in page.url

            # A viewer sees the stacks but no way to deploy, and the server refuses the editor.
            operator = json.loads(controller.operator_file.read_text())
            with ControllerClient(
                controller.url, username=operator["username"], password=operator["password"]
            ) as client:
                viewer = client.request(UsersAdd(name="vera", role="viewer"))["password"]
            page.fill("input[name=user]", "vera")
            page.fill("input[name=password]", viewer)
            page.click("button[type=submit]")
            page.wait_for_selector("text=vera (viewer)")
            page.goto(f"{base}/ui/stacks/web")
            assert page.locator("a[href='/ui/deploy'], a[href^='/ui/deploy?']").count() == 0
            assert page.goto(f"{base}/ui/deploy").status == 403
            assert "needs the operator role" in page.inner_text("main")
            assert errors == [], errors
    finally:
        if agent is not None:
            agent.stop()


def test_lost_connection_is_shown_and_recovers(browser: Any, tmp_path: Path) -> None:
    """The dashboard's HTTP server goes away: the page says the connection is lost; it comes back on
    the same port: the page says live again and shows what changed meanwhile, without a reload."""
    import threading

    import uvicorn
    from support.fleet import online
    from support.infra import wait_until
    from support.recording import RecordingPublisher
    from tether.controller.http.app import create_app
    from tether.controller.security import ensure_operator_credentials
    from tether.controller.service import Controller
    from tether.controller.store import Store
    from tether.controller.users import ensure_user

    store = Store(tmp_path / "tether.db")
    controller = Controller(store)  # no worker thread: commands run on the caller's (the server's)
    controller.client = RecordingPublisher()  # type: ignore[assignment]
    controller.leading.set()
    ensure_operator_credentials(store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    ensure_user(store, "admin", "admin", 0.0)
    password = json.loads((tmp_path / "operator.json").read_text())["password"]
    app = create_app(controller)  # the HTTP API's app, with the dashboard and /api/v1/events

    def serve(port: int) -> tuple[Any, threading.Thread]:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(lambda: server.started, 15, message="the HTTP server to start")
        return server, thread

    def stop(server: Any, thread: threading.Thread) -> None:
        server.should_exit = server.force_exit = True
        thread.join(20)
        assert not thread.is_alive()

    server, thread = serve(0)
    port = server.servers[0].sockets[0].getsockname()[1]
    page = browser.new_page()
    page.set_default_timeout(DEADLINE_MS)
    try:
        base = f"http://localhost:{port}"
        page.goto(f"{base}/ui/login")
        page.fill("input[name=user]", "admin")
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_selector("#live[data-state=on]")
        assert page.inner_text("#count-online").strip() == "0"
        page.evaluate("window.__kept = true")
        stop(server, thread)
        page.wait_for_selector("#live[data-state=lost]")
        assert "connection lost" in page.inner_text("#live")
        online(controller, "late-1")  # happens while the page cannot hear about it
        server, thread = serve(port)
        page.wait_for_selector("#live[data-state=on]")
        page.wait_for_selector("#count-online:text-is('1')")
        assert page.evaluate("window.__kept") is True
    finally:
        page.close()
        stop(server, thread)
        store.close()
