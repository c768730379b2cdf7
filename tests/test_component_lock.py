"""A recovery and a backup of the same component never overlap: they share the
component's lock, so a backup started while recover-redis runs waits for it (saying
so in its run log) and then backs up the recovered data, never half-runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect_records import log_messages
from test_recover_redis import back_up, flushall, recover, seed
from throwaway_services import gateway_healthy_when, redis_container

from flows.backup_redis import backup_redis
from tasks.common.locks import lock_name
from tasks.common.redis_url import parse_redis_url

DEADLINE_SECONDS = 120


def until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def slot_taken(name: str) -> bool:
    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=1000, offset=0)
    return any(limit.name == name and limit.active_slots > 0 for limit in limits)


def test_backup_started_while_recover_redis_runs_waits_for_it(
    tmp_path: Path, backup_dir: Path
) -> None:
    release = threading.Event()
    outcome: dict[str, Any] = {}
    with redis_container(tmp_path) as service, gateway_healthy_when(release) as health:
        seed(service)
        good = back_up(service, backup_dir)
        keys = sum(db["keys"] for db in good.source["keyspace"].values())
        flushall(service)  # the data loss the recovery repairs
        lock = lock_name("backup-redis", parse_redis_url(service.url).server)
        waiting = f"waiting for {lock!r}: another run holds it"

        def recovery() -> None:
            outcome["recovery"] = recover(service, backup_dir, gateway_health_url=health)

        def backup() -> None:
            later = tmp_path / "later-backups"
            later.mkdir()
            outcome["backup"] = backup_redis(
                redis_url=service.url,
                container=service.name,
                fetch="container",
                backup_dir=str(later),
                s3_bucket="",
                return_state=True,
            )

        recovering = threading.Thread(target=recovery)
        recovering.start()
        until(lambda: slot_taken(lock), f"recover-redis never took {lock}")
        backing_up = threading.Thread(target=backup)
        backing_up.start()
        # The recovery now waits for the gateway: the backup either waits too, or runs.
        until(
            lambda: not backing_up.is_alive() or any(waiting in m for m in log_messages()),
            "the backup neither waited nor ended",
        )
        ran_during_recovery = not backing_up.is_alive()
        release.set()
        recovering.join(timeout=DEADLINE_SECONDS)
        backing_up.join(timeout=DEADLINE_SECONDS)

    assert outcome["recovery"]["ok"]
    assert not ran_during_recovery, "the backup ran while recover-redis held Redis"
    state = outcome["backup"]
    assert state.is_completed(), state.message
    manifest = state.result()
    # It backed up the recovered data, not the flushed Redis nor a stopped one.
    assert sum(db["keys"] for db in manifest["source"]["keyspace"].values()) == keys
