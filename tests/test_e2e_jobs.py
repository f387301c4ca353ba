"""Edge jobs with real agents: one-shot runs once, schedules run on the device even offline,
and results produced offline arrive after the link is back."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online
from tether.controller.store import JOB_RESULTS_KEPT

pytestmark = pytest.mark.e2e
# Not the offline scenario on PostgreSQL too (scripts/test's second pass): the store paths it
# reaches there (jobs, results, a redelivered result) are test_controller_store.py's
# test_jobs_and_their_results_put_get_list_delete[postgresql]; the rest is the same code.


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _results(url: str, job: str) -> list[dict]:
    return cli_json(url, "jobs", "logs", job, "--limit", "200")


def test_jobs_run_once_and_on_schedule_offline(tmp_path: Path) -> None:
    """A one-shot job runs once (not again after an agent restart); a scheduled job keeps
    running while the broker is gone and its results arrive, each once, after reconnect."""
    device = f"job-{uuid.uuid4().hex[:6]}"
    ticks = tmp_path / "ticks"
    controller = ControllerProcess(tmp_path / "c")
    url = controller.url
    agent = AgentProcess(url, device, tmp_path / "agent")
    try:
        wait_online(url, device)
        cli_json(url, "groups", "create", "g", "--device", device)

        run = cli_json(
            url, "jobs", "run", "hello", "--group", "g", "--", "sh", "-c", "echo hello from $0", "dev"
        )
        assert run["trigger"] == "once"
        first = wait_until(lambda: _results(url, "hello"), 30, message="one-shot result")
        assert first[0]["exit_code"] == 0 and "hello from dev" in first[0]["output"]

        cli_json(
            url,
            "jobs",
            "schedule",
            "tick",
            "--group",
            "g",
            "--every",
            "1s",
            "--",
            "sh",
            "-c",
            f"date +%s >> {ticks}",
        )
        wait_until(lambda: _results(url, "tick"), 30, message="scheduled result")
        minutes = tmp_path / "minutes"
        cli_json(
            url,
            "jobs",
            "schedule",
            "minute",
            "--group",
            "g",
            "--cron",
            "* * * * *",
            "--",
            "sh",
            "-c",
            f"date +%s >> {minutes}",
        )
        wait_until(lambda: cli_json(url, "devices", "show", device)["applied_generation"] >= 3, 30)

        # Offline: the controller and its embedded broker are gone; the jobs keep running,
        # the cron one at the next minute, evaluated on the device.
        assert controller.stop() == 0
        offline_from = _lines(ticks)
        wait_until(lambda: _lines(ticks) >= offline_from + 3, 30, message="ticks while offline")
        wait_until(lambda: _lines(minutes) >= 1, 75, interval=0.5, message="the cron job ran while offline")
        controller = ControllerProcess(tmp_path / "c")
        url = controller.url
        # The agent was started with the old URL: the broker port changed, so restart the agent on the new one.
        agent.stop()
        agent = AgentProcess(url, device, tmp_path / "agent")
        wait_online(url, device)
        produced = _lines(ticks)
        # The controller keeps the newest JOB_RESULTS_KEPT results per job and device: a slow
        # machine can tick more than that while the cron job below is awaited offline.
        expected = min(produced, JOB_RESULTS_KEPT)
        last_tick = int(ticks.read_text().splitlines()[produced - 1])  # `date +%s` of the newest run

        def delivered() -> list[dict] | None:
            r = _results(url, "tick")
            return r if len(r) >= expected and max(x["started"] for x in r) >= last_tick - 1 else None

        results = wait_until(delivered, 60, message="offline results")
        runs = [r["run"] for r in results]
        assert len(runs) == len(set(runs)), "a result was delivered twice"
        assert all(r["exit_code"] == 0 for r in results)
        assert len(_results(url, "hello")) == 1, "a one-shot job ran again after an agent restart"
        cron_results = wait_until(lambda: _results(url, "minute"), 30, message="the cron result arrived")
        assert cron_results[0]["exit_code"] == 0

        status = cli_json(url, "jobs", "status", "tick")
        assert status["devices"][0]["last"]["exit_code"] == 0
        assert {j["name"] for j in cli_json(url, "jobs", "ls")} == {"hello", "tick", "minute"}
        assert cli(url, "jobs", "rm", "tick").returncode == 0
        assert {j["name"] for j in cli_json(url, "jobs", "ls")} == {"hello", "minute"}
    finally:
        agent.stop()
        controller.stop()


@pytest.mark.store
def test_job_bad_input(tmp_path: Path) -> None:
    """Bad cron, both triggers, unknown group and duplicate names are refused by name."""
    controller = ControllerProcess(tmp_path / "c")
    url = controller.url
    try:
        cli_json(url, "groups", "create", "g", "--device", "nobody")
        bad = cli(url, "jobs", "schedule", "x", "--group", "g", "--cron", "61 * * * *", "--", "true")
        assert bad.returncode != 0 and "invalid cron expression" in bad.stderr
        both = cli(
            url, "jobs", "schedule", "x", "--group", "g", "--cron", "* * * * *", "--every", "5s", "--", "true"
        )
        assert both.returncode != 0 and "not both" in both.stderr
        assert "unknown group" in cli(url, "jobs", "run", "x", "--group", "nope", "--", "true").stderr
        assert cli(url, "jobs", "run", "x", "--group", "g", "--", "true").returncode == 0
        assert "already exists" in cli(url, "jobs", "run", "x", "--group", "g", "--", "true").stderr
    finally:
        controller.stop()


@pytest.mark.docker
@pytest.mark.store
def test_container_job_on_the_docker_driver(
    docker_engine: object, busybox_image: str, tmp_path: Path
) -> None:
    """With the docker driver a job runs in a throwaway container of its image; the output
    comes back, a timeout is reported, and no job container is left behind."""
    device = f"djob-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "c")
    url = controller.url
    agent = AgentProcess(url, device, tmp_path / "agent", driver="docker")
    try:
        wait_online(url, device)
        cli_json(url, "groups", "create", "g", "--device", device)
        cli_json(
            url,
            "jobs",
            "run",
            "hi",
            "--group",
            "g",
            "--image",
            busybox_image,
            "--",
            "sh",
            "-c",
            "echo from-container; exit 4",
        )
        cli_json(
            url,
            "jobs",
            "run",
            "slow",
            "--group",
            "g",
            "--image",
            busybox_image,
            "--timeout",
            "1s",
            "--",
            "sleep",
            "30",
        )
        hi = wait_until(lambda: _results(url, "hi"), 60, message="container job result")[0]
        assert hi["exit_code"] == 4 and "from-container" in hi["output"]
        slow = wait_until(lambda: _results(url, "slow"), 60, message="timed-out job result")[0]
        assert slow["timed_out"] is True
        leftovers = docker_engine.containers.list(
            all=True, filters={"label": [f"io.tether.device={device}", "io.tether.managed=job"]}
        )  # type: ignore[attr-defined]
        assert leftovers == []
    finally:
        agent.stop()
        controller.stop()
