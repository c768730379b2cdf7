"""Backup health in Prometheus: pushes to a real Pushgateway, alert rules under
`promtool test rules`, and the Grafana dashboard's queries on a real Prometheus that
scrapes the pushes. The Pushgateway and Prometheus are the test's own: pushes to the
sandbox's would add sources that trip its backup-late alert and overwrite its drill
status."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from prometheus_servers import running_prometheus
from redis_servers import free_port

from flows.backup_config import backup_config
from flows.recover_redis import recover_redis
from flows.support.failures import StepFailed
from tasks.common import pushgateway as metrics
from tasks.common.certificates import verified
from tasks.store.kinds import config_source_id

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "proxilion-dr-alerts.yml"
# The rules' cases: every 10 minutes of synthetic time, and the ones weeks long every hour.
RULE_TESTS = [
    MONITORING / "proxilion-dr-alerts.test.yml",
    MONITORING / "proxilion-dr-alerts-monthly.test.yml",
]
DASHBOARD = MONITORING / "proxilion-dr-dashboard.json"
PUSHGATEWAY_BINARY = "/usr/bin/prometheus-pushgateway"


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: install Debian's `prometheus` (scripts/setup.sh)")
    return found


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    check = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(
        [promtool(), "test", "rules", *(tests.name for tests in RULE_TESTS)],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    cases = [
        case
        for tests in RULE_TESTS
        for test in yaml.safe_load(tests.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"


def start_pushgateway(log_path: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """Debian's Pushgateway on a free port, once ready; None if the port was taken."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            # Debian's build persists to /var/lib/prometheus/pushgateway.data by default,
            # shared by every test run on this machine: keep this one in memory.
            [PUSHGATEWAY_BINARY, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/-/ready", timeout=1, verify=verified()).status_code == 200:
                return process, url
        time.sleep(0.1)
    process.terminate()
    process.wait(10)
    if "address already in use" in log_path.read_text():
        return None
    pytest.fail(f"pushgateway did not start: {log_path.read_text()[-2000:]}")


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """A real Pushgateway (Debian's binary) of this test's own, on a free port (another
    one if that port was taken meanwhile); never the sandbox's."""
    if not Path(PUSHGATEWAY_BINARY).exists():
        pytest.fail("prometheus-pushgateway not installed: run scripts/setup.sh")
    for attempt in range(5):
        started = start_pushgateway(tmp_path / f"pushgateway-{attempt}.log")
        if started is not None:
            break
    else:
        pytest.fail("pushgateway found no free port in 5 tries")
    process, url = started
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


def pushed(url: str, name: str, **labels: str) -> float | None:
    """The value of a metric as the Pushgateway serves it to Prometheus."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_failed_run_keeps_the_last_success(pushgateway: str) -> None:
    assert metrics.push_backup(
        pushgateway,
        "redis",
        True,
        source="127.0.0.1-6379-0",
        size_bytes=1000,
        previous_size_bytes=900,
        duration_seconds=1.5,
    )
    labels = {"kind": "redis", "source": "127.0.0.1-6379-0"}
    success = pushed(pushgateway, "proxilion_dr_backup_last_success_timestamp_seconds", **labels)
    assert success is not None and abs(success - time.time()) < 60
    assert pushed(pushgateway, "proxilion_dr_backup_size_bytes", **labels) == 1000
    assert pushed(pushgateway, "proxilion_dr_backup_last_status", **labels) == 1

    assert metrics.push_backup(pushgateway, "redis", False, source="127.0.0.1-6379-0")
    assert pushed(pushgateway, "proxilion_dr_backup_last_status", **labels) == 0
    kept = pushed(pushgateway, "proxilion_dr_backup_last_success_timestamp_seconds", **labels)
    assert kept == success
    assert pushed(pushgateway, "proxilion_dr_backup_size_bytes", **labels) == 1000


def test_restore_and_drill_outcomes_are_pushed(pushgateway: str) -> None:
    assert metrics.push_restore(pushgateway, "redis", True, 4.2, metrics.RESTORE_JOB)
    assert metrics.push_drill(pushgateway, False, 30.0)
    assert pushed(pushgateway, "proxilion_dr_restore_rto_seconds", component="redis") == 4.2
    assert pushed(pushgateway, "proxilion_dr_drill_last_status") == 0


def test_an_unreachable_pushgateway_is_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        assert metrics.push_backup(closed, "redis", True, size_bytes=1) is False
    assert "could not push proxilion_dr_backup metrics" in caplog.text


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_every_dashboard_query_returns_data_once_prometheus_scrapes_the_pushes(
    pushgateway: str, tmp_path: Path
) -> None:
    """Push one outcome of each sort to the test's Pushgateway, scraped by a Prometheus
    of the test's own as docs/operations.md says (honor_labels): every panel query must
    parse and return at least one series."""
    source = "dashboard-test"
    assert metrics.push_backup(
        pushgateway,
        "redis",
        True,
        source=source,
        size_bytes=10,
        previous_size_bytes=10,
        duration_seconds=1,
    )
    assert metrics.push_restore(pushgateway, "redis", True, 1.0, metrics.RESTORE_JOB)
    assert metrics.push_restore(pushgateway, "redis", True, 1.0, metrics.RECOVERY_JOB)
    assert metrics.push_drill(pushgateway, True, 1.0)
    queries = dashboard_queries()
    assert len(queries) >= 6
    target = pushgateway.removeprefix("http://")
    with running_prometheus(tmp_path / "tsdb", admin=False, pushgateway=target) as prometheus:
        deadline = time.monotonic() + 60
        empty: list[str] = []
        while time.monotonic() < deadline:
            empty = []
            for title, expr in queries:
                answer = httpx.get(
                    f"{prometheus.url}/api/v1/query",
                    params={"query": expr},
                    timeout=10,
                    verify=verified(),
                )
                assert answer.status_code == 200, f"{title}: {expr!r} does not parse: {answer.text}"
                if not answer.json()["data"]["result"]:
                    empty.append(f"{title}: {expr}")
            if not empty:
                return
            time.sleep(1)
    pytest.fail(f"panels without data after the pushes were scraped: {empty}")


# ------------------------------------------------- the flows push their outcomes


def config_project(root: Path) -> Path:
    """A small project folder backup-config can store (no service needed)."""
    (root / "grafana" / "dashboards").mkdir(parents=True)
    (root / "docker-compose.yml").write_text("services:\n  redis:\n    image: redis:7\n")
    (root / "prometheus.yml").write_text("scrape_configs: []\n")
    return root


def run_logs(flow_run_id: str) -> str:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        found = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return "\n".join(log.message for log in found)


def test_each_backup_pushes_its_size_the_previous_size_and_its_duration(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_PUSHGATEWAY_URL", pushgateway)
    project = config_project(tmp_path / "project")
    common = {"project_dir": str(project), "env_container": "", "s3_bucket": ""}
    first = backup_config(backup_dir=str(tmp_path / "b"), force=True, **common)
    (project / "alerts.yml").write_text("groups: []\n" + "# more\n" * 500)
    second = backup_config(backup_dir=str(tmp_path / "b"), force=True, **common)
    labels = {"kind": "config", "source": second["source_id"]}
    assert pushed(pushgateway, "proxilion_dr_backup_last_status", **labels) == 1
    assert pushed(pushgateway, "proxilion_dr_backup_size_bytes", **labels) == second["size"]
    previous = pushed(pushgateway, "proxilion_dr_backup_previous_size_bytes", **labels)
    assert previous == first["size"]
    assert pushed(pushgateway, "proxilion_dr_backup_duration_seconds", **labels) > 0


def test_a_failed_backup_pushes_its_failure_through_the_flow_hook(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_PUSHGATEWAY_URL", pushgateway)
    missing = tmp_path / "no-such-project"
    with pytest.raises(FileNotFoundError):
        backup_config(project_dir=str(missing), backup_dir=str(tmp_path / "b"), s3_bucket="")
    labels = {"kind": "config", "source": config_source_id(missing)}
    assert pushed(pushgateway, "proxilion_dr_backup_last_status", **labels) == 0
    assert (
        pushed(pushgateway, "proxilion_dr_backup_last_success_timestamp_seconds", **labels) is None
    )


def test_a_failed_recovery_pushes_its_failure_a_dry_run_pushes_nothing(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_PUSHGATEWAY_URL", pushgateway)
    common = {"backup_dir": str(tmp_path), "s3_bucket": "", "container": "none"}
    with pytest.raises(StepFailed):
        recover_redis(backup="redis/../etc", dry_run=True, **common)
    assert pushed(pushgateway, "proxilion_dr_recovery_last_status", component="redis") is None
    with pytest.raises(StepFailed):
        recover_redis(backup="redis/../etc", **common)
    assert pushed(pushgateway, "proxilion_dr_recovery_last_status", component="redis") == 0


def test_pushgateway_down_the_backup_still_succeeds_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_PUSHGATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    project = config_project(tmp_path / "project")
    state = backup_config(
        project_dir=str(project),
        env_container="",
        backup_dir=str(tmp_path / "b"),
        s3_bucket="",
        return_state=True,
    )
    assert state.is_completed()
    manifest = state.result()
    assert (tmp_path / "b" / manifest["name"]).is_file()
    assert "could not push proxilion_dr_backup metrics" in run_logs(
        str(state.state_details.flow_run_id)
    )
