"""Failures reach a person: a webhook notification block and the Prefect automations
that use it, defined here and created by `python -m deployments apply` (and `serve`).

- `proxilion-dr: run failed or crashed`: any run of a proxilion-dr flow (`backup-*`,
  `recover-*`, `verify-restore`; by flow name, so runs started by hand count too)
  entering Failed or Crashed. The Prefect server sends it, so a run whose process
  died (SIGKILL, OOM, lost host) is reported too; the flows' hooks only warn in the
  run's log when no such automation exists (flows/support/hooks.py), so one failure is one
  message.
- `proxilion-dr: <flow>/<deployment> late`, per scheduled deployment: no run of it
  completed within 2 × its schedule interval (also when nothing runs the schedules).
  Each is tagged with the host whose deployment it watches (none for a single host), so
  an `apply` removes only its own host's stale ones.
- `proxilion-dr: backup-status after each backup`: a backup run ending Completed or
  Failed starts a run of the `backup-status` deployment, so the table is fresh seconds
  after every backup without the backup run waiting for it (created with or without a
  webhook, once that deployment is registered).

The webhook URL (Slack, Mattermost, ntfy…) is a credential: it is kept in the block's
secret values, never in its plain fields, and never printed.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from uuid import UUID

from prefect.automations import (
    AutomationCore,
    EventTrigger,
    Posture,
    RunDeployment,
    SendNotification,
)
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.exceptions import ObjectNotFound

from deployments.catalog import DEPLOYMENTS, DeploymentSpec
from tasks.common.busy_server import server_client

WEBHOOK_BLOCK = "proxilion-dr-webhook"
FAILURE_AUTOMATION = "proxilion-dr: run failed or crashed"
LATE_PREFIX = "proxilion-dr: "  # + "<flow>/<deployment> late"
LATE_TAG = "proxilion-dr:late"  # every late automation; with "host:<host>" for a host's
FLOW_NAMES = ["backup-*", "recover-*", "verify-restore"]
STATUS_AUTOMATION = "proxilion-dr: backup-status after each backup"
STATUS_FLOW = "backup-status"
# Not followed by a refresh: the table itself, and the AOF shipping that runs every
# minute (its newest piece shows in the hourly refresh; a failure is notified).
NOT_REFRESHING = {STATUS_FLOW, "backup-redis-aof"}

FAILURE_SUBJECT = "proxilion-dr: {{ flow.name }} {{ flow_run.state.name }} ({{ flow_run.name }})"
FAILURE_BODY = """\
{{ flow.name }} run {{ flow_run.name }}: {{ flow_run.state.name }}
{{ flow_run.state.message }}
{{ flow_run|ui_url or ("flow run id " ~ flow_run.id ~ " (set PREFECT_UI_URL for a link)") }}"""


def webhook_block(url: str) -> CustomWebhookNotificationBlock:
    """A webhook posting `{"text": subject + body}` (what Slack and Mattermost read;
    ntfy and others show it as is), the URL held as a secret value."""
    return CustomWebhookNotificationBlock(
        name="proxilion-dr",
        url="{{webhook_url}}",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
        secrets={"webhook_url": url},
    )


def failure_automation(block_id: UUID) -> AutomationCore:
    """Any proxilion-dr flow run entering Failed or Crashed: one message per run."""
    return AutomationCore(
        name=FAILURE_AUTOMATION,
        description="A proxilion-dr run failed or crashed: tell the on-call person.",
        trigger=EventTrigger(
            posture=Posture.Reactive,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(block_document_id=block_id, subject=FAILURE_SUBJECT, body=FAILURE_BODY)
        ],
    )


def late_automation_name(spec: DeploymentSpec) -> str:
    return f"{LATE_PREFIX}{spec.flow_name}/{spec.name} late"


def late_tags(host: str | None) -> list[str]:
    """The tags saying which host's deployment a late automation watches."""
    return [LATE_TAG, f"host:{host}"] if host else [LATE_TAG]


def late_automation(
    spec: DeploymentSpec,
    block_id: UUID,
    ui_url: str,
    within: timedelta | None = None,
    host: str | None = None,
) -> AutomationCore:
    """No run of this scheduled deployment (host `host`'s copy, when given) completed
    within `within` (default 2 × its schedule interval); repeats every such window."""
    window = within or 2 * (spec.interval or timedelta(0))
    where = f"{ui_url.rstrip('/')}/deployments" if ui_url else "the Prefect UI, Deployments"
    return AutomationCore(
        name=late_automation_name(spec),
        description=f"{spec.flow_name}/{spec.name} did not complete within {window}.",
        tags=late_tags(host),
        trigger=EventTrigger(
            posture=Posture.Proactive,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": spec.flow_name},
                {"prefect.resource.role": "deployment", "prefect.resource.name": spec.name},
            ],
            expect={"prefect.flow-run.Completed"},
            threshold=1,
            within=window,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"proxilion-dr: {spec.flow_name} late",
                body=(
                    f"{spec.flow_name} (deployment {spec.name}, schedule {spec.cron}) has not "
                    f"completed a run in the last {window}: is the runner "
                    f"(python -m deployments serve) up? Are its runs failing? See {where}"
                ),
            )
        ],
    )


def scheduled(host: str | None = None) -> list[DeploymentSpec]:
    """The scheduled deployments as registered: the catalog's, or host `host`'s copies
    (named `<name>-<host>`, deployments/hosts.py)."""
    specs = [spec for spec in DEPLOYMENTS if spec.cron]
    return [replace(spec, name=f"{spec.name}-{host}") for spec in specs] if host else specs


def notification_automations(
    block_id: UUID, ui_url: str, host: str | None = None
) -> list[AutomationCore]:
    """The failure automation and one late automation per scheduled deployment (of
    host `host`, when given)."""
    late = [late_automation(spec, block_id, ui_url, host=host) for spec in scheduled(host)]
    return [failure_automation(block_id), *late]


def replace_automation(automation: AutomationCore) -> UUID:
    """Create `automation`, or update the one of the same name in place (apply is
    repeatable; updating rather than deleting keeps the server's trigger state sane)."""
    with server_client() as client:
        existing = client.read_automations_by_name(automation.name)
        if not existing:
            return client.create_automation(automation)
        for extra in existing[1:]:
            client.delete_automation(extra.id)
        client.update_automation(existing[0].id, automation)
        return existing[0].id


def apply_notifications(webhook_url: str, ui_url: str, host: str | None = None) -> list[str]:
    """Save the webhook block and (re)create every notification automation, removing
    late automations of deployments no longer in the catalog; returns the automations'
    names. Without a webhook URL nothing is created. With `host`, the late automations
    watch that host's deployments (`every-6-hours-db-1`). Only stale late automations
    tagged for the same host (or for no host, without `host`) are removed: every host runs
    this for its own, and a name cannot tell them apart (`every-6-hours-db-1` ends like
    `every-6-hours-east-db-1`, and in ` late` like every host's). Untagged ones (made
    before the tags) are updated in place when current, left alone when stale."""
    if not webhook_url:
        return []
    block_id = webhook_block(webhook_url).save(WEBHOOK_BLOCK, overwrite=True)
    automations = notification_automations(block_id, ui_url, host)
    for automation in automations:
        replace_automation(automation)
    current = {a.name for a in automations}
    ours = sorted(late_tags(host))
    with server_client() as client:
        for stale in client.read_automations():
            if sorted(stale.tags) == ours and stale.name not in current:
                client.delete_automation(stale.id)
    return sorted(current)


def status_spec(host: str | None = None) -> DeploymentSpec:
    """The backup-status deployment as registered (host `host`'s copy, when given)."""
    [spec] = [s for s in DEPLOYMENTS if s.flow_name == STATUS_FLOW]
    return replace(spec, name=f"{spec.name}-{host}") if host else spec


def status_automation(deployment_id: UUID, host: str | None = None) -> AutomationCore:
    """Any backup run (`backup-<kind>`, by flow name: also runs started by hand; with
    `host`, the runs of that host's backup deployments) ending Completed or Failed
    starts a run of the backup-status deployment `deployment_id`, with its own
    (the host's) settings."""
    backups = sorted({s.flow_name for s in DEPLOYMENTS if s.flow_name.startswith("backup-")})
    backups = [name for name in backups if name not in NOT_REFRESHING]
    related = [{"prefect.resource.role": "flow", "prefect.resource.name": backups}]
    if host:
        names = [s.name for s in scheduled(host) if s.flow_name in backups]
        related.append({"prefect.resource.role": "deployment", "prefect.resource.name": names})
    return AutomationCore(
        name=f"{STATUS_AUTOMATION} on {host}" if host else STATUS_AUTOMATION,
        description="A backup ended: refresh the backup-status table (its own run).",
        trigger=EventTrigger(
            posture=Posture.Reactive,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=related,
            expect={"prefect.flow-run.Completed", "prefect.flow-run.Failed"},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(0),
        ),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id)],
    )


def apply_status_refresh(host: str | None = None, deployment_id: UUID | None = None) -> str:
    """(Re)create the status automation for the backup-status deployment (`deployment_id`,
    else found by name: `backup-status/hourly`, or host `host`'s copy); returns its name,
    or why it was not created (the deployment is not registered yet)."""
    spec = status_spec(host)
    if deployment_id is None:
        with server_client() as client:
            try:
                deployment_id = client.read_deployment_by_name(f"{STATUS_FLOW}/{spec.name}").id
            except ObjectNotFound:
                return (
                    f"not created: deployment {STATUS_FLOW}/{spec.name} is not registered "
                    "(register the deployments first, then apply again)"
                )
    automation = status_automation(deployment_id, host)
    replace_automation(automation)
    return automation.name
