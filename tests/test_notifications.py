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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from prefect import flow, get_client
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_records import run_logs
from prefect_servers import busy_relay

from deployments.__main__ import load_flow, main
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
from tasks.common.busy_server import server_client

# Messages of one evaluation of the server's triggers arrive within this of each other.
DELIVERY_SECONDS = 3.0


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
    with server_client() as client:  # a busy server's 503 asked again at once
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
    # One failure is one message: a second failure's message proves the server has
    # processed every event of the first run (they came before it), the hooks included.
    later = recover_gateway(container=missing, recreate=False, return_state=True)
    webhook.wait_for(str(later.state_details.flow_run_id))
    # counted by id: two runs started in the same second have the same name
    assert sum(str(run.id) in m["text"] for m in webhook.received) == 1


def test_a_busy_servers_503_to_an_automation_write_is_asked_again_at_once(
    webhook: Webhook,
) -> None:
    """`serve` applies the automations as it starts, while the runs it serves store
    their events: a SQLite server then answers some writes 503, and Prefect's client
    would wait 2 s before each asks again."""

    def automation_write(method: str, path: str) -> bool:
        return method in ("POST", "PUT") and "/automations/" in path and "filter" not in path

    with (
        busy_relay(PREFECT_API_URL.value(), automation_write) as relay,
        temporary_settings({PREFECT_API_URL: relay.url}),
    ):
        names = apply_notifications(webhook.url, ui_url="")
    assert relay.answered_busy == ["POST /api/automations/"]  # a create: asked again
    with get_client(sync_client=True) as client:
        assert set(names) <= {a.name for a in client.read_automations()}
    waited = relay.longest_wait()
    assert waited < 1.0, f"waited {waited:.1f} s on a busy server"


def test_webhook_url_is_a_secret_of_the_block_not_a_plain_field(webhook: Webhook) -> None:
    apply_notifications(webhook.url, ui_url="")
    with get_client(sync_client=True) as client:
        stored = client.read_block_document_by_name(
            WEBHOOK_BLOCK, "custom-webhook", include_secrets=False
        )
    assert "secret-token-xyz" not in json.dumps(stored.data, default=str)


@flow(name="backup-on-time")
def backup_on_time() -> None:
    """A scheduled deployment's run that completes: the late automation watches only for
    its Completed event, so what the flow does is not part of the test."""


def complete_a_run(deployment_id: uuid.UUID) -> None:
    """One run of the deployment, created on the server and run here to Completed (as a
    runner's subprocess runs it)."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id)
    run_flow(backup_on_time, flow_run=run)


@pytest.fixture(scope="module", autouse=True)
def lateness() -> Iterator[Future[None]]:
    """The lateness test, started as the module starts: it waits out lateness windows
    of 10 s (Prefect's shortest) while the module's other tests run, and
    test_a_scheduled_deployment_is_late_only_while_no_run_completes collects its
    outcome. Its webhook, block, automations' names and tags are its own: the other
    tests replace the webhook block and delete or apply the proxilion-dr automations."""
    with ThreadPoolExecutor(1, thread_name_prefix="lateness") as pool:
        yield pool.submit(late_only_while_no_run_completes)


def late_only_while_no_run_completes() -> None:
    """Two late automations, their windows shortened from 2 × the schedule interval to
    the shortest Prefect accepts (10 s): one watches a backup-redis deployment that
    nothing runs, and notifies; the other watches a deployment whose runs complete back
    to back, and stays silent meanwhile (the first shows the server evaluated a whole
    window of it). Once its runs stop, it speaks too (so its silence meant something)."""
    suffix = uuid.uuid4().hex[:6]
    webhook = Webhook()
    block_id = webhook_block(webhook.url).save(f"lateness-test-{suffix}", overwrite=True)
    on_time = DeploymentSpec(f"on-time-{suffix}", f"{__file__}:backup_on_time", "0 * * * *", "")
    idle = DeploymentSpec(
        f"never-runs-{suffix}", "flows/backup_redis.py:backup_redis", "0 */6 * * *", ""
    )
    deployment_id = backup_on_time.to_deployment(name=on_time.name).apply()
    window = timedelta(seconds=10)

    def watching(spec: DeploymentSpec) -> uuid.UUID:
        automation = late_automation(spec, block_id, "", within=window)
        named = {"name": f"lateness test {suffix}: {spec.name}", "tags": [f"test:{suffix}"]}
        return replace_automation(automation.model_copy(update=named))

    automations = [watching(on_time), watching(idle)]

    def said(spec: DeploymentSpec) -> list[dict[str, Any]]:
        return [m for m in webhook.received if f"(deployment {spec.name}," in m["text"]]

    try:
        deadline = time.monotonic() + 120
        while not said(idle):
            assert time.monotonic() < deadline, (
                f"the idle deployment was never late: {webhook.received}"
            )
            complete_a_run(deployment_id)
        delivered = time.monotonic() + DELIVERY_SECONDS  # a message of the same evaluation
        while time.monotonic() < delivered:
            complete_a_run(deployment_id)
        assert said(on_time) == [], webhook.received
        late = said(idle)[0]
        assert "backup-redis late" in late["subject"]
        assert "has not completed a run in the last 0:00:10" in late["text"]

        webhook.wait_for(f"(deployment {on_time.name},", deadline_seconds=60)
    finally:
        with server_client() as client:
            for automation in automations:
                client.delete_automation(automation)
            client.delete_block_document(block_id)
        webhook.server.shutdown()


def test_failure_hook_warns_when_no_automation_notifies() -> None:
    delete_automations()
    state = recover_gateway(
        container=f"proxilion-dr-test-absent-{uuid.uuid4().hex[:8]}",
        recreate=False,
        return_state=True,
    )

    lines = [log.message for log in run_logs(state.state_details.flow_run_id)]
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


def late_names(host: str | None = None) -> set[str]:
    """The late automations `apply` creates for `host`'s deployments (None: one host)."""
    return {late_automation_name(spec) for spec in scheduled(host)}


def automation_names() -> set[str]:
    with get_client(sync_client=True) as client:
        return {a.name for a in client.read_automations()}


def test_a_single_host_apply_beside_a_multi_host_server_keeps_every_hosts_automations(
    webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Prefect server, hosts `db-1` and `east-db-1` registered with `apply --host`, and
    a machine that runs `python -m deployments apply` without `--host` (as `serve` does
    when it starts): each apply removes only its own stale late automations."""
    apply_notifications(webhook.url, ui_url="", host="db-1")
    apply_notifications(webhook.url, ui_url="", host="east-db-1")
    block_id = webhook_block(webhook.url).save(WEBHOOK_BLOCK, overwrite=True)
    gone = DeploymentSpec("gone", "flows/backup_logs.py:backup_logs", "0 * * * *", "gone")
    gone_db_1 = replace(gone, name="gone-db-1")
    replace_automation(late_automation(gone, block_id, ""))  # removed from the catalog
    replace_automation(late_automation(gone_db_1, block_id, "", host="db-1"))

    monkeypatch.setenv("PROXILION_DR_NOTIFY_WEBHOOK_URL", webhook.url)
    main(["apply"])
    after_single = automation_names()
    apply_notifications(webhook.url, ui_url="", host="db-1")  # db-1 registers again
    after_host = automation_names()

    assert late_names("db-1") | late_names("east-db-1") <= after_single, "apply removed them"
    assert late_names() <= after_single
    assert late_automation_name(gone) not in after_single  # its own stale one
    assert late_automation_name(gone_db_1) in after_single
    assert late_names("east-db-1") <= after_host, "apply --host db-1 removed east-db-1's"
    assert late_names() <= after_host, "apply --host db-1 removed the single host's"
    assert late_automation_name(gone_db_1) not in after_host


# Ends last: it ran beside the tests above.
def test_a_scheduled_deployment_is_late_only_while_no_run_completes(
    lateness: Future[None],
) -> None:
    """A late automation speaks only while no run of its deployment completes
    (late_only_while_no_run_completes)."""
    lateness.result(timeout=300)
