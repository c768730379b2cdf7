"""Making Redis write a snapshot we can prove is ours: BGSAVE (SCHEDULE behind an AOF
rewrite), then INFO persistence polled with a deadline until that save is done.
`start_save` returns as soon as Redis has forked the snapshot, so the copy can follow
the file while the fork writes it (tasks.redis.capture); `save_status` tells its end.

The runbook's loop compared two reads of LASTSAVE and never ended; this waits for
Redis's own counters (rdb_saves, rdb_bgsave_in_progress, rdb_last_bgsave_status)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from tasks.common.retry import retrying_task
from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.redis.server import connect, explain

POLL_SECONDS = 0.02  # INFO persistence is cheap; the end of a save is seen sooner


class SaveFailed(RuntimeError):
    """Redis could not write its snapshot (disk, permissions, fork)."""


class SaveTimeout(RuntimeError):
    """The snapshot did not finish before the deadline."""


@dataclass
class SaveResult:
    """The snapshot we waited for: Redis's LASTSAVE after it, the server's clock
    when BGSAVE was sent (an RDB from this save has a `ctime` at or after it), and
    how long it took."""

    last_save_time: int
    seconds: float
    started_at: int = 0
    started_at_us: int = 0  # the same, in microseconds (server TIME)
    keyspace: dict[str, dict[str, int]] = field(default_factory=dict)  # as BGSAVE was sent
    keyspace_exact: str = ""  # why `keyspace` is the snapshot's; "" when it may not be


def _persistence(client: redis.Redis) -> dict[str, Any]:
    return client.info("persistence")


BUSY = (
    "Redis is busy with a background save it did not start for us (a replica's full "
    "sync, or another backup)"
)


def _wait_for_save_idle(client: redis.Redis, deadline: float) -> None:
    """Wait for a save someone else started (maybe a diskless replication child)."""
    while int(_persistence(client)["rdb_bgsave_in_progress"]):
        if time.monotonic() > deadline:
            raise SaveTimeout(
                f"{BUSY} that did not finish before the deadline: retry later or raise "
                "save_timeout_seconds"
            )
        time.sleep(POLL_SECONDS)


@dataclass
class _Started:
    """Where the save counters stood when our BGSAVE was accepted, and the keys Redis
    held then: exactly the snapshot's when nothing ran between that read and the fork."""

    saves: int | None  # INFO rdb_saves (Redis 7+; counts a save when it starts)
    server_time_us: int
    keyspace: dict[str, dict[str, int]] = field(default_factory=dict)
    keyspace_exact: str = ""  # why the keyspace is the snapshot's; "" when it may not be


# What changes the keys: writes (and deletions) count in rdb_changes_since_last_save,
# expiries and evictions in their own counters.
_KEY_CHANGES = ("rdb_changes_since_last_save", "expired_keys", "evicted_keys")


def _exact_at_fork(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Why the keyspace read just before BGSAVE is the snapshot's ("" if it may not be):
    BGSAVE forked at once (not scheduled behind an AOF rewrite) and no write, expiry or
    eviction came between the read and the fork."""
    forked = int(after["rdb_bgsave_in_progress"]) and "rdb_saves" in after
    if not forked or int(after["rdb_saves"]) != int(before["rdb_saves"]) + 1:
        return ""
    if any(int(after.get(k, 0)) != int(before.get(k, 0)) for k in _KEY_CHANGES):
        return ""
    return "read in the same round trip as BGSAVE, nothing changed before the fork"


def _start_bgsave(client: redis.Redis, deadline: float) -> _Started:
    """BGSAVE SCHEDULE (it forks at once unless an AOF rewrite runs), sent in one round
    trip with INFO before and after it: Redis runs a client's pipelined commands back
    to back, so the keyspace read first is the snapshot's when the counters around the
    fork say so. Retried once past another save."""
    for _attempt in range(2):
        pipe = client.pipeline(transaction=False)
        pipe.info()  # persistence, stats and keyspace in one read
        pipe.time()
        pipe.execute_command("BGSAVE", "SCHEDULE")
        pipe.info()
        try:
            state, (seconds, micros), _reply, after = pipe.execute(raise_on_error=True)
        except redis.ResponseError as error:
            if "already in progress" not in str(error):
                raise
            _wait_for_save_idle(client, deadline)
            continue
        keyspace = {
            name: {"keys": int(v["keys"]), "expires": int(v.get("expires", 0))}
            for name, v in state.items()
            if name.startswith("db") and isinstance(v, dict)
        }
        return _Started(
            int(state["rdb_saves"]) if "rdb_saves" in state else None,
            int(seconds) * 1_000_000 + int(micros),
            keyspace,
            _exact_at_fork(state, after),
        )
    raise SaveFailed(f"{BUSY} twice in a row, so ours could not start: try again later")


def _wait_past_last_save(client: redis.Redis, before: int, deadline: float, where: str) -> None:
    """Redis < 7 only (no rdb_saves): LASTSAVE has 1 s resolution, so wait until the
    server clock has passed it before saving, within the deadline. A LASTSAVE ahead
    of the clock (a clock stepped back) would otherwise be waited for forever."""
    while (now := int(client.time()[0])) <= before:
        if time.monotonic() > deadline:
            raise SaveTimeout(
                f"Redis at {where} reports its last save at {before}, {before - now} s ahead "
                "of its own clock (was the clock set back?): a new save cannot be told "
                "apart; run one save by hand (BGSAVE) once the clock has passed it, or "
                "upgrade to Redis 7"
            )
        time.sleep(POLL_SECONDS)


def _our_save_ran(state: dict[str, Any], started: _Started, before: int) -> bool:
    """Has the save we started been run (it may still be in progress)?"""
    if started.saves is not None:
        return int(state["rdb_saves"]) > started.saves
    return int(state["rdb_last_save_time"]) > before


def _may_be_ours(state: dict[str, Any], started: _Started) -> bool:
    """Redis < 7: a failed save leaves LASTSAVE as it was, so an error status once no
    AOF rewrite holds our scheduled save back is taken as ours."""
    return started.saves is None and not int(state["aof_rewrite_in_progress"])


_LOG_PREFIX = re.compile(r"^\d+:[A-Z] .*? [.*#-] ")  # "1:C 28 Nov 2026 08:42:20.693 # "


def save_failure_reason(container: str | None) -> str:
    """Redis's own words for a failed save, from its log when we can read it."""
    if not container:
        return "see the Redis log"
    try:
        lines = containers.log_tail(container, 80)
    except containers.ContainerError:
        return "see the Redis log"
    reasons = [  # e.g. "Failed opening the temp RDB file … for saving: Read-only file system"
        _LOG_PREFIX.sub("", line).strip()
        for line in lines
        if ("sav" in line.lower() or "rdb" in line.lower())
        and any(word in line.lower() for word in ("fail", "error", "can't"))
    ]
    specific = [line for line in reasons if not line.startswith("Background saving error")]
    return (specific or reasons or ["see the Redis log"])[-1]


@dataclass(frozen=True)
class SaveStarted:
    """Our BGSAVE, accepted and running (Redis forked its snapshot): what tells its end
    apart from any other save's, and its deadline (`time.monotonic()`)."""

    redis_url: str
    container: str | None
    saves: int | None  # INFO rdb_saves before it (Redis 7+)
    last_save_before: int  # LASTSAVE before it (Redis < 7)
    started_at_us: int  # server TIME when BGSAVE was sent
    began: float  # time.monotonic() then
    deadline: float
    timeout_seconds: float
    keyspace: dict[str, dict[str, int]] = field(default_factory=dict)  # as BGSAVE was sent
    keyspace_exact: str = ""  # why `keyspace` is the snapshot's; "" when it may not be


def _running(state: dict[str, Any], started: _Started, before: int) -> bool:
    """Has our BGSAVE forked (not merely scheduled behind an AOF rewrite)?"""
    return bool(int(state["rdb_bgsave_in_progress"])) or _our_save_ran(state, started, before)


@retrying_task(2, 10)
def start_save(redis_url: str, timeout_seconds: float, container: str | None = None) -> SaveStarted:
    """BGSAVE (SCHEDULE behind an AOF rewrite), returned once Redis has forked the
    snapshot: the data it holds is fixed from here on, while the fork writes it out."""
    began = time.monotonic()
    deadline = began + timeout_seconds
    where = redact_url(redis_url)
    client = connect(redis_url)
    try:
        state = _persistence(client)
        before = int(state["rdb_last_save_time"])
        if "rdb_saves" not in state:
            _wait_past_last_save(client, before, deadline, where)
        ours = _start_bgsave(client, deadline)
        started = SaveStarted(
            redis_url,
            container,
            ours.saves,
            before,
            ours.server_time_us,
            began,
            deadline,
            timeout_seconds,
            ours.keyspace,
            ours.keyspace_exact,
        )
        while not _running(state := _persistence(client), ours, before):
            save_status(client, started, state)  # a scheduled save can fail or time out
            time.sleep(POLL_SECONDS)
        return started
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


def save_status(
    client: redis.Redis, started: SaveStarted, state: dict[str, Any] | None = None
) -> SaveResult | None:
    """None while our save runs; its result once Redis reports it done. Raises SaveFailed
    when Redis says it failed, SaveTimeout past the deadline."""
    state = state or _persistence(client)
    ours = _Started(started.saves, started.started_at_us)
    before = started.last_save_before
    idle = not int(state["rdb_bgsave_in_progress"])
    done = idle and _our_save_ran(state, ours, before)
    failed = state["rdb_last_bgsave_status"] == "err"
    where = redact_url(started.redis_url)
    if done and not failed:
        return SaveResult(
            int(state["rdb_last_save_time"]),
            round(time.monotonic() - started.began, 3),
            started.started_at_us // 1_000_000,
            started.started_at_us,
            started.keyspace,
            started.keyspace_exact,
        )
    if failed and (done or (idle and _may_be_ours(state, ours))):
        raise SaveFailed(
            f"Redis at {where} failed to write its snapshot: "
            f"{save_failure_reason(started.container)}. Check free space and that Redis "
            "can write to its `dir`"
        )
    if time.monotonic() > started.deadline:
        raise SaveTimeout(
            f"Redis at {where} did not finish its snapshot within "
            f"{started.timeout_seconds:.0f} s: raise save_timeout_seconds or check the server"
        )
    return None


def wait_for_save(started: SaveStarted) -> SaveResult:
    """Poll until our save is done (see `save_status`)."""
    client = connect(started.redis_url)
    try:
        while (result := save_status(client, started)) is None:
            time.sleep(POLL_SECONDS)
        return result
    except redis.RedisError as error:
        raise explain(error, started.redis_url) from None


@retrying_task(2, 10)
def trigger_save(
    redis_url: str, timeout_seconds: float, container: str | None = None
) -> SaveResult:
    """BGSAVE and wait until Redis reports that save done; every wait has the deadline."""
    return wait_for_save(start_save.fn(redis_url, timeout_seconds, container))
