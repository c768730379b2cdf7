"""The deployment catalog is the one source of truth: prefect.yaml and serve agree; the
run form explains every parameter; stopping the runner keeps the schedules."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from croniter import croniter
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

from deployments.__main__ import load_flow, render_yaml, schedule, to_deployment
from deployments.catalog import DEPLOYMENTS, steady_interval
from flows.support.settings import EMPTY_MEANS_SETTING, SETTING, Settings, resolve

REPO = Path(__file__).resolve().parent.parent
# "Empty: PROXILION_DR_X (default …)" or "`setting`: PROXILION_DR_X (default …)"
NAMED_SETTING = re.compile(r"PROXILION_DR_([A-Z0-9_]+)[^(]*\(default:? ([^)]*)\)")


def test_prefect_yaml_is_generated_from_the_catalog() -> None:
    assert (REPO / "prefect.yaml").read_text() == render_yaml("UTC"), (
        "prefect.yaml is stale: run `.venv/bin/python -m deployments yaml > prefect.yaml`"
    )


def test_every_deployment_builds_with_its_schedule_in_the_configured_zone() -> None:
    for spec in DEPLOYMENTS:
        assert load_flow(spec).name == spec.flow_name
        deployment = to_deployment(spec, "Europe/Berlin")
        schedules = [s.schedule for s in deployment.schedules or []]
        assert len(schedules) == (1 if spec.cron else 0)
        assert all(s.timezone == "Europe/Berlin" for s in schedules)
        assert all(s.active for s in deployment.schedules or [])
        switched_off = to_deployment(spec, "Europe/Berlin", schedules_on=False).schedules or []
        assert [s.schedule for s in switched_off] == schedules
        assert not any(s.active for s in switched_off)
    assert "timezone: Europe/Berlin" in render_yaml("Europe/Berlin")
    entries = [
        entry
        for deployment in yaml.safe_load(render_yaml("UTC", schedules_on=False))["deployments"]
        for entry in deployment["schedules"]
    ]
    assert len(entries) == sum(1 for spec in DEPLOYMENTS if spec.cron)
    assert all(entry["active"] is False for entry in entries)


def test_every_flow_names_its_runs_by_what_they_do_and_when() -> None:
    """The runs list shows `restore drill 2026-12-01 04:00:02 UTC`, not Prefect's
    random two-word names, for scheduled and hand-launched runs alike."""
    for spec in DEPLOYMENTS:
        naming = load_flow(spec).flow_run_name
        assert callable(naming), f"{spec.flow_name} has no flow_run_name"
        assert re.fullmatch(r"[a-z ]+ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", naming())


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin"])
def test_every_schedule_fires_at_its_cron_times(timezone: str) -> None:
    """A cron that is a steady interval is deployed as one (the deployments page names
    it in a few words): the same times as the catalog's cron, over a year's weeks."""
    start = datetime(2026, 3, 1, tzinfo=ZoneInfo(timezone))
    for spec in DEPLOYMENTS:
        if not spec.cron:
            continue
        deployed = server_schedule(schedule(spec.cron, timezone))
        dates = asyncio.run(deployed.get_dates(60, start=start))
        crons = croniter(spec.cron, start - timedelta(microseconds=1))
        expected = [crons.get_next(datetime) for _ in dates]
        if timezone == "UTC" or spec.interval is None or spec.interval >= timedelta(days=1):
            assert [d.timestamp() for d in dates] == [e.timestamp() for e in expected], spec.name
        kind = "interval" if steady_interval(spec.cron) else "cron"
        assert kind == ("cron" if spec.name.startswith(("daily", "monthly")) else "interval")


def server_schedule(client_schedule: Any) -> Any:
    """The Prefect server's schedule object for a client-side one (it computes dates)."""
    from prefect.server.schemas.schedules import CronSchedule, IntervalSchedule

    if client_schedule.interval is not None:
        return IntervalSchedule(
            interval=client_schedule.interval,
            anchor_date=client_schedule.anchor_date,
            timezone=client_schedule.timezone,
        )
    return CronSchedule(cron=client_schedule.cron, timezone=client_schedule.timezone)


def test_unknown_schedule_timezone_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROXILION_DR_SCHEDULE_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus': use an IANA"):
        Settings()


# Parameters whose empty value can only be None: a number or a list box cannot hold
# "take the setting" (their description names the setting).
NULL_ALLOWED = {"retention_days", "keep_min", "save_timeout_seconds", "env_allowlist", "components"}
NULL_ALLOWED |= {"keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"}


def setting_default_text(name: str) -> str:
    """A setting's built-in default as the descriptions write it."""
    default = Settings.model_fields[name].default
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return f"{default:g}"
    return str(default).replace(",", ", ")


def applied_schemas() -> dict[str, dict[str, Any]]:
    """Each catalog deployment applied to the test server (schedules off: nothing of it
    runs), read back: its parameter schema (what the UI's run form is built from) and its
    concurrency limit."""
    found = {}
    with get_client(sync_client=True) as client:
        for spec in DEPLOYMENTS:
            to_deployment(spec, "UTC", schedules_on=False).apply()
            deployment = client.read_deployment_by_name(f"{spec.flow_name}/{spec.name}")
            limit = deployment.global_concurrency_limit
            found[f"{spec.flow_name}/{spec.name}"] = {
                "schema": deployment.parameter_openapi_schema,
                "limit": limit.limit if limit else None,
            }
    return found


def test_the_run_form_explains_every_parameter_of_every_deployment() -> None:
    problems = []
    for deployment, applied in applied_schemas().items():
        if applied["limit"] != 1:
            problems.append(f"{deployment}: concurrency limit {applied['limit']}, not 1")
        for name, prop in applied["schema"]["properties"].items():
            where = f"{deployment} {name}"
            description = " ".join(prop.get("description", "").split())
            if len(description) < 20:
                problems.append(f"{where}: no description")
            branches = prop.get("anyOf", [prop])
            if any("enum" in b for b in branches) and len(branches) > 1:
                problems.append(f"{where}: the choices hide behind a type toggle")
            if "enum" in prop and prop.get("default") not in prop["enum"]:
                problems.append(f"{where}: default {prop.get('default')!r} is not a choice")
            if name == "dry_run" and not re.search(
                r"ON: .+OFF \(the default\): .*REPLACE", description, re.I
            ):
                problems.append(f"{where}: does not say loudly what a run with it off replaces")
            unit = re.search(r"_(seconds|days)$", name)
            if unit and unit.group(1) not in description.lower():
                problems.append(f"{where}: the unit is not said")
            if any(b.get("type") == "null" for b in branches) and name not in NULL_ALLOWED:
                problems.append(f"{where}: a type toggle with 'None' (make the default \"\")")
            if prop.get("default") not in (None, SETTING, ""):
                continue
            named = NAMED_SETTING.search(description)
            if not named:
                if not re.search(r"\bempty\b", description, re.I):  # "Empty: /metrics on …"
                    problems.append(f"{where}: does not say what an empty value means")
                continue
            # recover-gateway reads its settings itself (`container or the setting`)
            resolves = not deployment.startswith("recover-gateway/")
            if prop.get("default") == "" and resolves and name not in EMPTY_MEANS_SETTING:
                problems.append(f"{where}: empty is said to take a setting, resolve() disagrees")
            setting, said = named.group(1).lower(), named.group(2)
            if setting not in Settings.model_fields:
                problems.append(f"{where}: names unknown setting {named.group(1)}")
            elif said != setting_default_text(setting) and setting_default_text(setting) != "":
                problems.append(
                    f"{where}: says default {said!r}, the setting's is "
                    f"{setting_default_text(setting)!r}"
                )
    assert problems == [], "\n".join(problems)


def all_polled() -> bool:
    """True once a runner has polled every catalog deployment (status READY)."""
    with get_client(sync_client=True) as client:
        names = {f"{spec.flow_name}/{spec.name}" for spec in DEPLOYMENTS}
        found = {
            f"{flow.name}/{d.name}": d
            for d in client.read_deployments()
            for flow in [client.read_flow(d.flow_id)]
        }
    return all(n in found and found[n].status and found[n].status.value == "READY" for n in names)


def test_stopping_serve_leaves_every_deployment_scheduled(tmp_path: Path) -> None:
    """`serve` stopped as systemd stops it pauses nothing. Served with `--schedules-off`
    (a run falling due would back up with the default settings): every schedule is
    registered switched off."""
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "deployments", "serve", "--schedules-off"],
            cwd=REPO,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while not all_polled():  # the runner's poll loop runs: its handlers are set
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "serve did not start:\n" + log.read_text()
                time.sleep(0.5)
            server.send_signal(signal.SIGTERM)  # what systemd sends on stop/restart
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    with get_client(sync_client=True) as client:
        served = [client.read_deployment_by_name(f"{s.flow_name}/{s.name}") for s in DEPLOYMENTS]
    paused = [d.name for d in served if d.paused]
    assert paused == [], "stopping the runner paused them:\n" + log.read_text()[-2000:]
    schedules = [(d.name, s.active) for d in served for s in d.schedules]
    assert len(schedules) == sum(1 for spec in DEPLOYMENTS if spec.cron)
    assert [name for name, active in schedules if active] == []


def test_an_empty_text_parameter_takes_its_setting_as_none_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROXILION_DR_BACKUP_DIR", "/srv/backups")
    monkeypatch.setenv("PROXILION_DR_S3_BUCKET", "dr-bucket")
    for empty in ("", None, SETTING):
        assert resolve({"backup_dir": empty, "s3_bucket": empty}) == {
            "backup_dir": Path("/srv/backups"),
            "s3_bucket": "dr-bucket",
        }
    # A container's empty value keeps meaning "no container"; `setting` takes the setting.
    assert resolve({"container": ""}, container="redis_container") == {"container": ""}
    assert resolve({"container": SETTING}, container="redis_container") == {
        "container": "proxilion-redis"
    }
