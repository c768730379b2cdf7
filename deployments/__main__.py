"""`python -m deployments serve` runs every deployment's schedule in this process;
`python -m deployments yaml` prints prefect.yaml from the same catalog;
`python -m deployments settings` prints docs/settings.md from the Settings class;
`python -m deployments apply` creates the failure and lateness notifications and the
backup-status refresh after each backup (deployments/notifications.py), which `serve`
also does when it starts.

Schedules use the time zone of PROXILION_DR_SCHEDULE_TIMEZONE (default UTC).
`serve --schedules-off` (and `yaml --schedules-off`) registers every schedule switched
off: shown in the UI, never creating a run; runs launched by hand run as usual (what
tests use: a run falling due would back up with the default settings).
Stopping `serve` leaves the deployments and their schedules active (Prefect's
default pauses them all): the scheduled runs wait, Late, until the runner is
back (deploy/proxilion-dr.service keeps it up)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import yaml
from prefect import serve
from prefect.schedules import Cron, Interval, Schedule
from prefect.settings import PREFECT_UI_URL

from deployments.catalog import DEPLOYMENTS, DeploymentSpec, steady_interval
from deployments.hosts import BadHostName, check_host, for_host
from deployments.notifications import apply_notifications, apply_status_refresh, status_spec
from deployments.settings_doc import settings_markdown
from flows.support.settings import settings


def load_flow(spec: DeploymentSpec) -> Any:
    path, attribute = spec.entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, attribute)


def schedule(cron: str, timezone: str, active: bool = True) -> Schedule:
    """The Prefect schedule of a catalog cron read in `timezone`: an interval when it is
    one (the deployments page shows it in a few words), else the cron. An inactive one
    is shown but creates no runs."""
    steady = steady_interval(cron)
    if steady is None:
        return Cron(cron, timezone=timezone, active=active)
    return Interval(
        steady.every, anchor_date=steady.anchor_in(timezone), timezone=timezone, active=active
    )


def yaml_schedule(cron: str, timezone: str, active: bool = True) -> dict[str, Any]:
    """`schedule()` as a prefect.yaml schedule entry."""
    steady = steady_interval(cron)
    entry: dict[str, Any] = {"cron": cron, "timezone": timezone}
    if steady is not None:
        entry = {
            "interval": int(steady.every.total_seconds()),
            "anchor_date": steady.anchor_in(timezone).isoformat(),
            "timezone": timezone,
        }
    return entry if active else {**entry, "active": False}


def to_deployment(spec: DeploymentSpec, timezone: str, schedules_on: bool = True) -> Any:
    """The runner deployment of one catalog entry, its cron read in `timezone` (its
    schedule switched off unless `schedules_on`)."""
    schedules = [schedule(spec.cron, timezone, schedules_on)] if spec.cron else None
    return load_flow(spec).to_deployment(
        name=spec.name,
        schedules=schedules,
        parameters=spec.parameters,
        description=spec.description,
        tags=list(spec.tags),
        concurrency_limit=spec.concurrency_limit,
    )


def serve_all(timezone: str, schedules_on: bool = True) -> None:
    """Run every deployment's schedule here until stopped (with `schedules_on` False,
    only the runs launched by hand); stopping does NOT pause them. The backup-status
    deployment is registered first: the automation that refreshes it after each backup
    names it."""
    status = to_deployment(status_spec(), timezone, schedules_on).apply()
    print("after each backup: " + apply_status_refresh(deployment_id=status))
    deployments = (to_deployment(spec, timezone, schedules_on) for spec in DEPLOYMENTS)
    serve(*deployments, pause_on_shutdown=False)


def render_yaml(timezone: str = "UTC", schedules_on: bool = True) -> str:
    """prefect.yaml for `prefect deploy --all` with a process work pool, crons in
    `timezone` (every schedule switched off unless `schedules_on`)."""
    document = {
        "name": "proxilion-dr",
        "prefect-version": "3.9.1",
        "pull": [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $PROXILION_DR_HOME }}"
                }
            }
        ],
        "deployments": [
            {
                "name": spec.name,
                "entrypoint": spec.entrypoint,
                "description": spec.description,
                "tags": list(spec.tags),
                "parameters": spec.parameters,
                "schedules": [yaml_schedule(spec.cron, timezone, schedules_on)]
                if spec.cron
                else [],
                "concurrency_limit": spec.concurrency_limit,
                "work_pool": {"name": "proxilion-dr"},
            }
            for spec in DEPLOYMENTS
        ],
    }
    header = "# Generated by `python -m deployments yaml` from deployments/catalog.py.\n"
    return header + yaml.safe_dump(document, sort_keys=False)


def notify(host: str | None = None) -> None:
    """Create the notification block and automations from PROXILION_DR_NOTIFY_WEBHOOK_URL
    (the late ones for host `host`'s deployments, when given)."""
    created = apply_notifications(
        settings().notify_webhook_url.get_secret_value(), PREFECT_UI_URL.value() or "", host
    )
    if created:
        print("notifications to the webhook: " + "; ".join(created))
    else:
        print(
            "PROXILION_DR_NOTIFY_WEBHOOK_URL is empty: failed or late runs notify nobody",
            file=sys.stderr,
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments")
    parser.add_argument("command", choices=["serve", "yaml", "apply", "settings"])
    parser.add_argument(
        "--host",
        help="yaml: this Docker host's copy of every deployment, on its own work queue "
        "(see deployments/hosts.py); apply: watch that copy for lateness",
    )
    parser.add_argument(
        "--schedules-off",
        action="store_true",
        help="serve, yaml: register every schedule switched off (shown in the UI, no run "
        "created from it); runs launched by hand still run",
    )
    args = parser.parse_args(argv)
    if args.command == "settings":  # documents the defaults: reads no environment
        sys.stdout.write(settings_markdown())
        return
    timezone = settings().schedule_timezone
    if args.host:
        try:
            check_host(args.host)
        except BadHostName as error:
            parser.error(str(error))
    if args.command in ("serve", "apply"):
        notify(args.host if args.command == "apply" else None)
    if args.command == "apply":
        print("after each backup: " + apply_status_refresh(args.host))
    if args.command == "yaml":
        text = render_yaml(timezone, schedules_on=not args.schedules_off)
        sys.stdout.write(for_host(text, args.host) if args.host else text)
    elif args.command == "serve":
        serve_all(timezone, schedules_on=not args.schedules_off)


if __name__ == "__main__":
    main(sys.argv[1:])
