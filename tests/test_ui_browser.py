"""What the operator sees in the Prefect UI, in a real browser (Debian's chromium,
driven by Playwright with the system browser; never `playwright install`).

A real `prefect server start` (SQLite, UI on) gets every deployment of the catalog
from `python -m deployments serve --schedules-off` (a run falling due would back up
with the default settings), which then runs one `backup-redis` to completion
against a throwaway redis-server and one that fails (its S3 endpoint does not
answer). The browser then checks the deployments page, the completed run's report
artifact and the failed run's reason. Screenshots are kept under
`<tmp_path>/screens` (printed at the end) for a person to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect_servers import (
    PrefectServer,
    api,
    prefect_env,
    running_prefect_server,
    stop_group,
)
from redis_servers import free_port, running_redis
from throwaway_services import redis_container

from deployments.catalog import DEPLOYMENTS, steady_interval
from tasks.store.report import NOT_UPLOADED

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT = 180.0
UI_TIMEOUT_MS = 30_000
BACKUP_REDIS = next(s for s in DEPLOYMENTS if s.flow_name == "backup-redis")


def require_chromium() -> str:
    """The system Chromium, or fail saying how to install it."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/setup.sh does it)",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def ui_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect server with the catalog's deployments, a completed and a failed run."""
    root = tmp_path_factory.mktemp("ui")
    backup_dir = root / "backups"
    backup_dir.mkdir()
    with (
        running_redis(root / "redis") as redis_server,
        running_prefect_server(root / "prefect") as server,
    ):
        redis_server.client().mset({f"session:{i}": f"state-{i}" for i in range(100)})
        serve_log = root / "serve.log"
        env = prefect_env(
            server,
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            PROXILION_DR_REDIS_URL=redis_server.url,
            PROXILION_DR_REDIS_CONTAINER="",
            PROXILION_DR_BACKUP_DIR=str(backup_dir),
            PROXILION_DR_S3_BUCKET="",
            AWS_ACCESS_KEY_ID="ui-test",
            AWS_SECRET_ACCESS_KEY="ui-test",
            AWS_DEFAULT_REGION="us-east-1",
            PYTHONPATH=str(REPO / "tests" / "quick_retries"),  # the failed upload: no 12 s wait
        )
        with serve_log.open("wb") as log:
            serve = subprocess.Popen(
                [sys.executable, "-m", "deployments", "serve", "--schedules-off"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            with api(server):
                wait_for_deployments(server, serve, serve_log)
                name = f"{BACKUP_REDIS.flow_name}/{BACKUP_REDIS.name}"
                completed = run_deployment(name, timeout=RUN_TIMEOUT, poll_interval=1)
                failed = run_deployment(
                    name,
                    timeout=RUN_TIMEOUT,
                    poll_interval=1,
                    parameters={
                        "s3_bucket": "proxilion-backups",
                        "s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
                    },
                )
                artifacts = read_artifacts(completed)
                failed_artifacts = read_artifacts(failed)
                with get_client(sync_client=True) as client:
                    auto_scheduled = [r for r in client.read_flow_runs() if r.auto_scheduled]
            yield {
                "server": server,
                "completed": completed,
                "failed": failed,
                "artifacts": artifacts,
                "failed_artifacts": failed_artifacts,
                "auto_scheduled": auto_scheduled,
                "serve_log": serve_log,
                "screens": root / "screens",
            }
        finally:
            stop_group(serve)


def wait_for_deployments(
    server: PrefectServer, serve: subprocess.Popen[bytes], serve_log: Path
) -> None:
    """Poll the server until `serve` has registered every catalog deployment."""
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if serve.poll() is not None:
                break
            if len(client.read_deployments()) >= len(DEPLOYMENTS):
                return
            time.sleep(1)
    pytest.fail(
        f"`python -m deployments serve` did not register {len(DEPLOYMENTS)} deployments "
        f"on {server.url}; its log:\n{serve_log.read_text(errors='replace')[-3000:]}",
        pytrace=False,
    )


def read_artifacts(run: FlowRun) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )


@pytest.fixture(scope="module")
def browser(ui_world: dict[str, Any]) -> Iterator[Any]:
    """A page of a headless system Chromium with a fresh profile; screenshots listed
    at the end of the module."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    screens: Path = ui_world["screens"]
    screens.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(screens.parent / "chromium-profile"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 1000},
        )
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()
            print(f"\nUI screenshots: {screens}")


def shoot(page: Any, screens: Path, name: str) -> Path:
    path = screens / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def schedule_shown(cron: str) -> str:
    """What the deployments page must show for a catalog cron: an interval in a few
    words (deployments/catalog.py steady_interval), else the daily or monthly time."""
    steady = steady_interval(cron)
    if steady is not None and steady.every < timedelta(hours=1):
        minutes = steady.every / timedelta(minutes=1)
        return "Every minute" if minutes == 1 else f"Every {minutes:g} minutes"
    if steady is not None:
        hours = steady.every / timedelta(hours=1)
        if hours == 1:
            return "Hourly"
        return f"Every {hours:g} hours" if hours < 24 else f"Every {hours / 24:g} days"
    minute, hour = (int(field) for field in cron.split()[:2])
    return f"At {datetime(2026, 1, 1, hour, minute):%I:%M %p}"  # "At 02:00 AM every day"


def schedule_text(row: Any) -> str:
    """The schedule cell of a deployments-list row as shown (a "+1" badge when the
    description did not fit)."""
    return row.locator("td").nth(-2).inner_text().strip()


def test_completed_and_failed_runs_end_as_expected(ui_world: dict[str, Any]) -> None:
    assert ui_world["completed"].state.is_completed(), ui_world["completed"].state
    assert ui_world["failed"].state.is_failed(), ui_world["failed"].state


def test_schedules_switched_off_create_no_runs(ui_world: dict[str, Any]) -> None:
    """The server's scheduler (every 5 s for a deployment just registered) created no run
    from the schedules served switched off, while the two runs above went through."""
    assert ui_world["auto_scheduled"] == []


def test_backup_status_refreshed_after_the_backup_completes(ui_world: dict[str, Any]) -> None:
    """The automation runs backup-status after the completed backup, and that run
    completes on a server with Prefect's default page size (200: a read asking for
    more is refused with 422, which the session's own server allows)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    status_runs = FlowFilter(name=FlowFilterName(any_=["backup-status"]))
    deadline = time.monotonic() + RUN_TIMEOUT
    with api(ui_world["server"]), get_client(sync_client=True) as client:
        while not (ended := [r for r in client.read_flow_runs(flow_filter=status_runs)
                             if r.state and r.state.is_final()]):  # fmt: skip
            assert time.monotonic() < deadline, "no backup-status run ended after the backup"
            time.sleep(1)
    assert all(run.state and run.state.is_completed() for run in ended), [
        (run.name, run.state.message if run.state else None) for run in ended
    ]


def test_deployments_page_lists_every_deployment_with_its_schedule(
    ui_world: dict[str, Any], browser: Any
) -> None:
    """Each row's schedule is readable in the row itself, no "+1" badge hiding it (the
    monthly drill's description needs a full-HD window, 1920 px wide), and each recovery
    row is named after its situation."""
    page = browser
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.goto(ui_world["server"].url + "/deployments")
    page.get_by_text(BACKUP_REDIS.flow_name, exact=True).first.wait_for()
    # 10 rows per page: show 25 (the select opens from the keyboard, not on a click)
    page.get_by_text("Items per page").locator("..").locator(".p-select-button__control").press(
        "ArrowDown"
    )
    page.get_by_role("option", name="25", exact=True).click()
    expect(page.locator("tbody tr")).to_have_count(len(DEPLOYMENTS))  # all on one page
    shoot(page, ui_world["screens"], "01-deployments")
    for spec in DEPLOYMENTS:
        row = page.locator("tbody tr", has_text=spec.flow_name).filter(
            has=page.get_by_text(spec.name, exact=True)
        )
        schedule = schedule_text(row)
        assert not schedule.startswith("+"), (spec.name, "hidden behind a badge", schedule)
        if spec.cron:
            assert schedule.startswith(schedule_shown(spec.cron)), (spec.name, schedule)
        else:
            assert schedule in ("", "None"), (spec.name, schedule)
    page.set_viewport_size({"width": 1440, "height": 1000})


def test_completed_backup_redis_run_shows_its_report(
    ui_world: dict[str, Any], browser: Any
) -> None:
    page = browser
    run = ui_world["completed"]
    (report,) = [a for a in ui_world["artifacts"] if a.key == "backup-redis"]
    backup_name = next(row["value"] for row in report_rows(report) if row["field"] == "backup")
    page.goto(f"{ui_world['server'].url}/runs/flow-run/{run.id}")
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text(report.description).first.wait_for()
    shoot(page, ui_world["screens"], "02-completed-run-artifacts")
    page.get_by_text(report.description).first.click()  # the artifact's card
    page.get_by_text(backup_name, exact=True).first.wait_for()
    page.get_by_text(re.compile(r"^sha256")).first.wait_for()
    shoot(page, ui_world["screens"], "03-completed-run-report")


def report_rows(artifact: Any) -> list[dict[str, Any]]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_failed_run_shows_its_reason(ui_world: dict[str, Any], browser: Any) -> None:
    page = browser
    run = ui_world["failed"]
    reason = run.state.message
    assert reason, "the failed run has no state message"
    page.goto(f"{ui_world['server'].url}/runs/flow-run/{run.id}")
    page.set_viewport_size({"width": 1440, "height": 2600})  # the logs scroll inside the page
    page.get_by_text("Failed", exact=True).first.wait_for()
    page.get_by_text("Finished in state Failed").first.wait_for(timeout=60_000)  # logs loaded
    shoot(page, ui_world["screens"], "04-failed-run")
    # The Logs tab: our reason as a line of its own, no traceback of this explained failure
    page.get_by_text(reason, exact=True).first.wait_for()
    assert page.get_by_text("Traceback").count() == 0, "a traceback sits in the run's logs"
    page.set_viewport_size({"width": 1440, "height": 1000})
    page.get_by_text("Details", exact=True).first.click()
    page.get_by_text("State Message", exact=True).wait_for()
    see_more = page.get_by_text("See More", exact=True)
    if see_more.count():  # the Details tab cuts a long message
        shoot(page, ui_world["screens"], "05-failed-run-details-cut")
        see_more.click()
    page.get_by_text(reason.split(": ", 1)[-1], exact=False).first.wait_for()
    shoot(page, ui_world["screens"], "06-failed-run-details")
    # Artifacts: the report of the backup stored locally, saying it was not uploaded
    (report,) = [a for a in ui_world["failed_artifacts"] if a.key == "backup-redis"]
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text(report.description).first.click()  # the artifact's card
    page.get_by_text(NOT_UPLOADED).first.wait_for()
    shoot(page, ui_world["screens"], "08-failed-run-report")


@pytest.mark.parametrize("flow_name", ["backup-redis", "recover-redis"])
def test_run_form_lists_every_parameter(
    ui_world: dict[str, Any], browser: Any, flow_name: str
) -> None:
    """The custom-run form an operator fills in at 3 a.m.: every parameter is there
    (what each says is for a person to judge: see the screenshot)."""
    page = browser
    spec = next(s for s in DEPLOYMENTS if s.flow_name == flow_name)
    with api(ui_world["server"]), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{spec.flow_name}/{spec.name}")
    page.goto(f"{ui_world['server'].url}/deployments/deployment/{deployment.id}/run")
    page.get_by_text("Parameters", exact=True).first.wait_for()
    for name, schema in deployment.parameter_openapi_schema.get("properties", {}).items():
        page.get_by_text(schema.get("title", name)).first.wait_for()  # "name (Optional)"
    if "dry_run" in deployment.parameter_openapi_schema.get("properties", {}):
        page.get_by_text("OFF (the default): a LIVE RESTORE", exact=False).first.wait_for()
    page.set_viewport_size({"width": 1440, "height": 2200})
    shoot(page, ui_world["screens"], f"07-run-form-{flow_name}")
    page.set_viewport_size({"width": 1440, "height": 1000})


def dump_keys(url: str) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(url)
    try:
        return {key: client.dump(key) for key in client.scan_iter(count=1000)}
    finally:
        client.close()


def fill_parameter(page: Any, name: str, value: str) -> None:
    """Type `value` into the run form's box for parameter `name`."""
    block = page.locator(".schema-form-property").filter(
        has=page.get_by_text(f"{name} (Optional)", exact=True)
    )
    box = block.locator("textarea, input").first
    box.fill(value)
    box.blur()  # the form takes the value as an operator leaving the box does


def finished(deployment_id: Any, submitted_after: datetime, serve_log: Path) -> FlowRun:
    """The run of `deployment_id` created after `submitted_after`, once it has ended;
    fails with the deployment's runs, their states and `serve`'s log after RUN_TIMEOUT."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    deadline = time.monotonic() + RUN_TIMEOUT
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=only)
            new = [r for r in runs if r.created and r.created >= submitted_after]
            if new and new[0].state and new[0].state.is_final():
                return new[0]
            time.sleep(1)
    seen = [(r.name, r.created, r.state.name if r.state else None) for r in runs]
    pytest.fail(
        f"no run of deployment {deployment_id} created after {submitted_after} ended within "
        f"{RUN_TIMEOUT:.0f} s; its runs: {seen}; serve's log:\n"
        + serve_log.read_text(errors="replace")[-3000:],
        pytrace=False,
    )


def submit_until_created(page: Any, screens: Path, attempts: int = 3) -> None:
    """Submit the run form, and Submit again, as an operator does, when the server
    answered 503: a SQLite Prefect server's "busy, ask again" (docs/operations.md),
    which its UI shows as "Oops. Something went wrong." and does not retry."""
    for _attempt in range(attempts):
        with page.expect_response(
            lambda response: (
                response.request.method == "POST" and response.url.endswith("/create_flow_run")
            )
        ) as answer:
            page.get_by_role("button", name="Submit").click()
        if answer.value.status != 503:
            break
    try:  # once the run is created, the UI shows the deployment's runs
        page.wait_for_url(re.compile(r"tab=Runs"))
    except PlaywrightTimeout:
        shot = shoot(page, screens, "09-submit-did-not-create-a-run")
        pytest.fail(
            f"Submit created no run: the server answered {answer.value.status} "
            f"{answer.value.text()[:300]}; the page: {shot}",
            pytrace=False,
        )


def test_an_operator_restores_redis_from_the_run_form(
    ui_world: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    """Scenario 2 launched as the operator does it: the redis-data-lost run form,
    container and redis_url typed in, dry_run left OFF (a live restore), Submit. The
    runner restores the backup key for key: keys written or deleted since are undone."""
    page = browser
    spec = next(s for s in DEPLOYMENTS if s.flow_name == "recover-redis")
    with redis_container(tmp_path) as service:
        live = redis.Redis.from_url(service.url)
        live.mset({f"session:{i}": f"state-{i}" for i in range(500)})
        with api(ui_world["server"]):
            backup = run_deployment(
                f"{BACKUP_REDIS.flow_name}/{BACKUP_REDIS.name}",
                timeout=RUN_TIMEOUT,
                poll_interval=1,
                parameters={"redis_url": service.url, "container": service.name},
                _sync=True,  # Playwright's sync API runs an event loop in this thread
            )
            assert backup.state and backup.state.is_completed(), backup.state
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(f"{spec.flow_name}/{spec.name}")
        backed_up = dump_keys(service.url)
        live.set("written:after-backup", "gone after the restore")
        live.delete("session:0")
        live.close()

        page.goto(f"{ui_world['server'].url}/deployments/deployment/{deployment.id}/run")
        page.get_by_text("Parameters", exact=True).first.wait_for()
        fill_parameter(page, "container", service.name)
        fill_parameter(page, "redis_url", service.url)
        shoot(page, ui_world["screens"], "09-recovery-run-form-filled")
        submitted = datetime.now().astimezone()
        submit_until_created(page, ui_world["screens"])
        with api(ui_world["server"]):
            run = finished(deployment.id, submitted, ui_world["serve_log"])
        assert run.state and run.state.is_completed(), run.state
        assert run.parameters["dry_run"] is False
        assert dump_keys(service.url) == backed_up

        assert run.name.startswith("redis recovery "), run.name  # not the form's random name
        page.goto(f"{ui_world['server'].url}/runs/flow-run/{run.id}")
        page.get_by_text(run.name).first.wait_for()
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("recover-redis report").first.click()  # the artifact's card
        page.get_by_text("recover-redis: OK").first.wait_for()
        page.get_by_text("previous data moved aside to").first.wait_for()
        shoot(page, ui_world["screens"], "10-recovery-report")
