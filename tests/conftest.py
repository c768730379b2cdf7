"""Shared fixtures: one real Prefect server per session, and the sandbox stack.

A test that needs a service that is not running fails with what to start; it
never skips.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import certifi

# Settings come from PROXILION_DR_* variables; a shell prepared for the demo
# (`eval "$(python -m sandbox env)"`) exports them, and a test that leaves a destination
# out would then back up to, and prune, the sandbox bucket's `demo/` prefix. Clear
# them before anything reads settings; every test passes its destination explicitly.
SETTINGS_PREFIX = "PROXILION_DR_"
for _name in [name for name in os.environ if name.startswith(SETTINGS_PREFIX)]:
    del os.environ[_name]

# Tests call some tasks (place_rdb) outside a flow run: keep their logs local quietly.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Tests read every log and artifact of the session (e.g. "no secret in any log"): the
# server's default page of 200 would silently cut those reads to the oldest ones. The
# project's own reads must not depend on it (a limit over 200 is refused with 422 by a
# default server): test_ui_browser's server keeps the default and runs them.
os.environ.setdefault("PREFECT_SERVER_API_DEFAULT_LIMIT", "1000000")
# The session's server writes task runs in batches, once a second: one by one (Prefect's
# default) was half of its CPU, a third of a core through a run of the suite. Tests that
# read task runs wait for them (prefect_records.wait_for_task_runs).
os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "200")
os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL", "1")
# Its events too, in batches of 200 once a second (Prefect's 20, or every 5 s): a test
# that waits for a run's final event (prefect_records.wait_for_final_events) waited
# the 5 s.
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE", "200")
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "1")


def one_certificate_file() -> str:
    """A file holding one certificate of certifi's bundle (removed as the process ends)."""
    bundle = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    first = bundle[bundle.index("-----BEGIN CERTIFICATE-----") : bundle.index(end) + len(end)]
    handle, path = tempfile.mkstemp(prefix="proxilion-dr-tests-", suffix=".pem")
    with os.fdopen(handle, "w") as out:
        out.write(first + "\n")
    atexit.register(os.unlink, path)
    return path


# Prefect reads the CA bundle for every client it makes (one per flow run, about 900 in
# a run of the suite): certifi's 140 certificates cost 30 ms of CPU each time, 0.5 ms
# with one. The session's servers speak plain HTTP on 127.0.0.1, so no certificate is
# ever checked; a test against a Prefect server over TLS would name its own CA here.
if "PREFECT_API_SSL_CERT_FILE" not in os.environ:
    os.environ["PREFECT_API_SSL_CERT_FILE"] = one_certificate_file()

import boto3  # noqa: E402
import pytest  # noqa: E402
from prefect import Task  # noqa: E402
from prefect.context import _temporary_global_settings_context, get_settings_context  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_API_URL,
    PREFECT_SERVER_DATABASE_CONNECTION_URL,
    temporary_settings,
)
from prefect_records import scan_from  # noqa: E402
from prefect_servers import DATABASE, keep_as_template, session_server, sqlite_url  # noqa: E402

from sandbox import constants as stack  # noqa: E402

START_STACK = "start it with `.venv/bin/python -m sandbox up` (or `bash scripts/setup.sh` first)"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require(host: str, port: int, what: str) -> None:
    if not port_open(host, port):
        pytest.fail(f"{what} is not answering on {host}:{port}: {START_STACK}", pytrace=False)


@pytest.fixture(autouse=True)
def no_settings_from_the_environment() -> None:
    """Fail loudly when a PROXILION_DR_* variable is set as a test starts: settings
    would then steer flows to places the test did not name (e.g. the demo's bucket).
    A test that needs one sets it with `monkeypatch.setenv`, which undoes it."""
    leaked = sorted(name for name in os.environ if name.startswith(SETTINGS_PREFIX))
    if leaked:  # names only: the values may hold credentials
        pytest.fail(
            f"{', '.join(leaked)} set in the test session: a test set it without "
            "monkeypatch, or the session did not clear the shell's settings",
            pytrace=False,
        )


def retrying_tasks() -> list[Task[Any, Any]]:
    """The project's Prefect tasks that retry (tasks.common.retry.retrying_task)."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("tasks.") and module is not None:
            for value in vars(module).values():
                if isinstance(value, Task) and value.retries:
                    found[id(value)] = value
    return list(found.values())


@pytest.fixture(autouse=True)
def quick_retries(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transient failures are retried at once, not after the production delays (2 s,
    10 s: about 12 s per S3-down test): the retry happens all the same. A test whose
    subject is the wait itself (a server coming back during it) is marked
    `real_retry_delays`."""
    if request.node.get_closest_marker("real_retry_delays"):
        return
    for task in retrying_tasks():
        delays = task.retry_delay_seconds
        quick = [0.0] * len(delays) if isinstance(delays, list) else 0.0
        monkeypatch.setattr(task, "retry_delay_seconds", quick)


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real, temporary Prefect server (SQLite) for every flow in the session, as
    Prefect's test harness runs one; its new database is the template of the servers
    tests start (prefect_servers.py)."""
    home = tmp_path_factory.mktemp("prefect-session")
    with session_server(home) as server:
        settings = {
            PREFECT_API_URL: server.api_url,
            PREFECT_SERVER_DATABASE_CONNECTION_URL: sqlite_url(home),
        }
        # Also the process-global settings, as the harness does: a thread (a test's flow
        # run in the background) starts without this thread's settings context.
        with (
            temporary_settings(settings),
            _temporary_global_settings_context(get_settings_context()),
        ):
            keep_as_template(home / DATABASE, tmp_path_factory.mktemp("prefect-template"))
            yield
            # What this process still holds for the server goes before it stops (else
            # its senders retry a closed port at exit for a minute).
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def records_of_this_module() -> None:
    """Scans of what Prefect keeps (prefect_records) read this module's records: a
    second of margin for the server's and this process's clocks."""
    scan_from(datetime.now(UTC) - timedelta(seconds=1))


@pytest.fixture(scope="session", autouse=True)
def s3_credentials() -> Iterator[None]:
    """The sandbox's S3 identity, given to boto3 the standard way (environment)."""
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID=stack.S3_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=stack.S3_SECRET_KEY,
        AWS_DEFAULT_REGION=stack.S3_REGION,
    )
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def sandbox_redis() -> str:
    """The sandbox's `proxilion-redis` container, running."""
    require(stack.REDIS_HOST, stack.REDIS_PORT, f"Redis ({stack.REDIS_CONTAINER})")
    return stack.REDIS_URL


@pytest.fixture
def s3_prefix() -> Iterator[str]:
    """A fresh prefix in the sandbox bucket, emptied afterwards."""
    require(stack.S3_HOST, stack.S3_PORT, "SeaweedFS S3")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=prefix + "/")
    for item in listing.get("Contents", []):
        s3.delete_object(Bucket=stack.S3_BUCKET, Key=item["Key"])


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    path = tmp_path / "backups"
    path.mkdir()
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_retry_delays: transient failures wait the production retry delays (the test is "
        "about what happens during them)",
    )


# Modules that never touch the shared sandbox stack's containers (they start their own
# redis-servers, Prometheus, containers and Prefect servers; in S3 they use their own
# prefix). With `-n 2` (the README's test command) each runs beside the rest; every
# other test runs in one group on one worker, in collection order, so tests that take
# or check the shared stack (and the host-wide drill lock) never overlap and the
# stack group keeps its order.
RUN_BESIDE_THE_STACK = {
    "test_architecture",
    "test_aside",
    "test_component_lock",
    "test_deployments",
    "test_finding_backups",
    "test_flow_calls",
    "test_gfs_retention",
    "test_hosts",
    "test_lock_recovery",
    "test_locks",
    "test_monitoring",
    "test_multi_host",
    "test_notifications",
    "test_object_lock",
    "test_pitr",
    "test_private",
    "test_rdb",
    "test_recover_gateway",
    "test_recover_host_project",
    "test_recover_prometheus",
    "test_recover_redis",
    "test_recovery_proof",
    "test_redis_sample",
    "test_redis_servers",
    "test_redis_sync",
    "test_restore_prometheus",
    "test_restore_redis",
    "test_retention",
    "test_retention_per_kind",
    "test_retry",
    "test_s3",
    "test_settings_doc",
    "test_ui_browser",
    "test_url_credentials",
    "test_url_parameters",
}
STACK_GROUP = "sandbox-stack"
# Tests of those modules that run a restore drill: a drill takes this host's drill lock
# (tasks/drill/scratch.py) and a second one at the same time is refused, so they run in
# the stack's group, one after another with its drills.
DRILLS_BESIDE = {"test_pitr.py::test_the_drill_restores_the_newest_chain_to_a_marker_time"}


def run_group(nodeid: str) -> str:
    """The group a test runs in: its module's name, or the shared stack's group."""
    path, _, name = nodeid.partition("::")
    module = Path(path).stem
    if module in RUN_BESIDE_THE_STACK and f"{module}.py::{name}" not in DRILLS_BESIDE:
        return module
    return STACK_GROUP


# The modules beside the stack that take longest (seconds of a full run, slowest first):
# handed out first, right after the stack's group, so that no long one starts last while
# the other worker idles.
SLOW_FIRST = [
    "test_ui_browser",  # 101 s
    "test_recover_gateway",  # 90 s
    "test_lock_recovery",  # 82 s: a lease of 60 s (the server's shortest) runs out
    "test_multi_host",  # 73 s
    "test_notifications",  # 71 s: lateness windows of 10 s (Prefect's shortest)
    "test_recovery_proof",  # 62 s
    "test_recover_host_project",  # 49 s
    "test_pitr",  # 48 s
    "test_recover_redis",  # 44 s
]


def start_order(item: pytest.Item) -> int:
    """The stack's group first (the longest), then SLOW_FIRST, then the rest."""
    group = run_group(item.nodeid)
    if group == STACK_GROUP:
        return 0
    return 1 + SLOW_FIRST.index(group) if group in SLOW_FIRST else 1 + len(SLOW_FIRST)


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: every test is seen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=start_order)  # stable: each group keeps its tests' order
    names = {f"{item.path.name}::{item.name}" for item in items}
    modules = {item.path.name for item in items}
    stale = {test for test in DRILLS_BESIDE if test.split("::")[0] in modules} - names
    if stale:
        pytest.exit(f"conftest.py DRILLS_BESIDE names no collected test: {sorted(stale)}", 4)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist hands out whole groups (`run_group`), each to one worker, in the
    order of `start_order`. (Its own `--dist loadgroup` renames node ids, which pytest
    9.2 no longer allows: groups would be silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # its order is by number of tests, not time

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return run_group(nodeid)

    return ByGroup(config, log)
