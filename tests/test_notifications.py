"""Failures reach a person: the automations of deployments/notifications.py, created
on the session's real Prefect server, post to a webhook that is a local HTTP listener.

The test harness's server is Prefect's ephemeral server, which in 3.9 runs the
services an automation needs (reactive and proactive triggers, actions: classes
`RunInEphemeralServers` in prefect/server), so no separate `prefect server start`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from prefect import flow, get_client
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL

from deployments.__main__ import load_flow
from deployments.catalog import DEPLOYMENTS, DeploymentSpec
from deployments.notifications import (
    FAILURE_AUTOMATION,
    STATUS_AUTOMATION,
    WEBHOOK_BLOCK,
    apply_notifications,
    late_automation,
    late_automation_name,
    replace_automation,
    scheduled,
    status_spec,
    webhook_block,
)
from flows.backup_status import backup_status
from flows.recover_gateway import recover_gateway
from flows.support.hooks import FLOW_HOOKS, check_failure_notified


class Webhook:
    """A webhook receiver on 127.0.0.1: every JSON body posted to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server interface
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token-xyz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, deadline_seconds: float = 60) -> dict[str, Any]:
        """The first message whose text contains `text`, polling until the deadline."""
        end = time.monotonic() + deadline_seconds
        while time.monotonic() < end:
            for message in list(self.received):
                if text in message["text"]:
                    return message
            time.sleep(0.2)
        raise AssertionError(f"no webhook message containing {text!r}; got {self.received}")


def delete_automations(prefix: str = "proxilion-dr") -> None:
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if automation.name.startswith(prefix):
                client.delete_automation(automation.id)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    delete_automations()  # other tests' failures must not go to a closed listener
    hook.server.shutdown()


def test_failed_run_reaches_the_webhook_with_flow_run_step_and_reason(webhook: Webhook) -> None:
    names = apply_notifications(webhook.url, ui_url="")
    assert FAILURE_AUTOMATION in names
    missing = f"proxilion-dr-test-absent-{uuid.uuid4().hex[:8]}"

    state = recover_gateway(container=missing, recreate=False, return_state=True)

    assert state.is_failed()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    message = webhook.wait_for(run.name)
    text = message["text"]
    assert "recover-gateway" in text  # the flow
    assert run.name in text  # the run
    assert "step 'recreate container from its configuration' failed" in text  # the step
    assert f"container '{missing}' does not exist; recreate is off" in text  # the reason
    assert str(run.id) in text  # where to look (a UI link when PREFECT_UI_URL is set)
    time.sleep(2)  # one failure is one message (the hooks do not send a second one)
    assert sum(run.name in m["text"] for m in webhook.received) == 1


def test_webhook_url_is_a_secret_of_the_block_not_a_plain_field(webhook: Webhook) -> None:
    apply_notifications(webhook.url, ui_url="")
    with get_client(sync_client=True) as client:
        stored = client.read_block_document_by_name(
            WEBHOOK_BLOCK, "custom-webhook", include_secrets=False
        )
    assert "secret-token-xyz" not in json.dumps(stored.data, default=str)


def test_scheduled_deployment_that_does_not_complete_in_time_notifies(webhook: Webhook) -> None:
    """The lateness trigger of a deployment that nothing runs, its window shortened from
    2 × the schedule interval to the shortest Prefect accepts (10 s)."""
    block_id = webhook_block(webhook.url).save(WEBHOOK_BLOCK, overwrite=True)
    spec = DeploymentSpec(
        name=f"never-runs-{uuid.uuid4().hex[:6]}",
        entrypoint="flows/backup_redis.py:backup_redis",
        cron="0 */6 * * *",
        description="test",
    )
    replace_automation(late_automation(spec, block_id, "", within=timedelta(seconds=10)))

    message = webhook.wait_for(spec.name, deadline_seconds=90)

    assert "backup-redis late" in message["subject"]
    assert "has not completed a run in the last 0:00:10" in message["text"]


def test_failure_hook_warns_when_no_automation_notifies() -> None:
    delete_automations()
    state = recover_gateway(
        container=f"proxilion-dr-test-absent-{uuid.uuid4().hex[:8]}",
        recreate=False,
        return_state=True,
    )

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
    run_id = state.state_details.flow_run_id
    lines = [log.message for log in logs if log.flow_run_id == run_id]
    assert any("NOBODY IS NOTIFIED" in line for line in lines), lines


def test_every_deployed_flow_carries_the_failure_hooks() -> None:
    for spec in DEPLOYMENTS:
        flow = load_flow(spec)
        assert check_failure_notified in flow.on_failure_hooks, spec.flow_name
        assert check_failure_notified in flow.on_crashed_hooks, spec.flow_name
        # backup-status is refreshed by an automation (test_backup_status), not a hook
        assert flow.on_completion_hooks == [], spec.flow_name


def test_apply_command_creates_every_automation_without_printing_the_url(
    webhook: Webhook,
) -> None:
    block_id = webhook_block(webhook.url).save(WEBHOOK_BLOCK, overwrite=True)
    backup_status.to_deployment(name=status_spec().name).apply()  # as `serve` registers it
    removed = DeploymentSpec("gone", "flows/backup_logs.py:backup_logs", "0 * * * *", "gone")
    replace_automation(late_automation(removed, block_id, ""))  # its deployment was removed
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PROXILION_DR_NOTIFY_WEBHOOK_URL": webhook.url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "deployments", "apply"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    with get_client(sync_client=True) as client:
        names = {a.name for a in client.read_automations() if a.name.startswith("proxilion-dr")}
    late = {late_automation_name(spec) for spec in DEPLOYMENTS if spec.cron}
    assert names == {FAILURE_AUTOMATION, STATUS_AUTOMATION} | late
    assert "proxilion-dr: backup-redis/every-6-hours late" in names
    assert f"after each backup: {STATUS_AUTOMATION}" in done.stdout
    assert "secret-token-xyz" not in done.stdout + done.stderr
    with get_client(sync_client=True) as client:  # later backups would start status runs
        client.delete_automation(client.read_automations_by_name(STATUS_AUTOMATION)[0].id)


@flow(name="recover-crash-stand-in", **FLOW_HOOKS)
def crashing_flow() -> None:
    """A run that dies of a BaseException (as of SIGTERM or a sys.exit deep in a library):
    Prefect marks it Crashed, not Failed."""
    raise SystemExit(3)


def test_crashed_run_reaches_the_webhook(webhook: Webhook) -> None:
    apply_notifications(webhook.url, ui_url="")

    with pytest.raises(SystemExit):
        crashing_flow()

    message = webhook.wait_for("recover-crash-stand-in")
    assert "Crashed" in message["subject"]


def test_each_host_watches_its_own_deployments_for_lateness(webhook: Webhook) -> None:
    """`apply --host` (the compose register service) watches that host's copies
    (`every-6-hours-db-1`) and leaves the other hosts' late automations alone."""
    apply_notifications(webhook.url, ui_url="", host="db-1")
    apply_notifications(webhook.url, ui_url="", host="db-2")
    with get_client(sync_client=True) as client:
        names = {a.name for a in client.read_automations() if a.name.endswith(" late")}
        watched = client.read_automations_by_name(
            "proxilion-dr: backup-redis/every-6-hours-db-1 late"
        )
    for host in ("db-1", "db-2"):
        assert {f"proxilion-dr: {s.flow_name}/{s.name}-{host} late" for s in scheduled()} <= names
    (automation,) = watched
    related = automation.trigger.match_related
    assert {
        "prefect.resource.role": "deployment",
        "prefect.resource.name": "every-6-hours-db-1",
    } in [dict(r.root) for r in related]
