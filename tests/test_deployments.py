"""The deployment catalog is the one source of truth: prefect.yaml and serve agree."""

from __future__ import annotations

from pathlib import Path

from deployments.__main__ import load_flow, render_yaml, to_deployment
from deployments.catalog import DEPLOYMENTS

REPO = Path(__file__).resolve().parent.parent


def test_prefect_yaml_is_generated_from_the_catalog() -> None:
    assert (REPO / "prefect.yaml").read_text() == render_yaml(), (
        "prefect.yaml is stale: run `.venv/bin/python -m deployments yaml > prefect.yaml`"
    )


def test_every_deployment_builds_with_its_schedule() -> None:
    for spec in DEPLOYMENTS:
        assert load_flow(spec).name == spec.flow_name
        deployment = to_deployment(spec)
        crons = [s.schedule.cron for s in deployment.schedules or []]
        assert crons == ([spec.cron] if spec.cron else [])
