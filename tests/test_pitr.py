"""Point-in-time recovery on a real Redis 7 (`appendonly yes`, `aof-timestamp-enabled
yes`) in a throwaway container: backup-redis-aof ships the AOF, recover-redis puts it
back cut at a chosen second (exactly the keys written up to it: values and TTLs) or
just before the last FLUSHALL, also from S3 alone; an AOF rewrite between two runs
loses nothing; without timestamps the flow says why PITR is unavailable and ships
anyway; a route to another Redis's AOF is refused.

Keys are written in batches inside one second each (polled on Redis's own clock, well
inside the second), in consecutive seconds, so the second a batch belongs to is certain
and a cut one second off fails."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_servers import (
    RedisServer,
    Snapshot,
    assert_same_keyspace,
    keyspace_snapshot,
    running_redis,
    seed_mixed_data,
)
from test_recover_redis import data_files, recover, report, step
from throwaway_services import Service, redis_container

from flows.backup_redis_aof import backup_redis_aof
from flows.backup_status import backup_status
from flows.prune_backups import prune_backups
from flows.support.failures import StepFailed
from flows.verify_restore import verify_restore
from sandbox import constants as stack
from tasks.redis import ship as aof_shipping
from tasks.redis.aof import MARKER_KEY
from tasks.redis.pitr import utc
from tasks.store.kinds import source_tag
from tasks.store.pieces import (
    generations_to_delete,
    pieces_local,
    pieces_remote,
    snapshot_cutoff,
)
from tasks.store.s3 import S3Error

TIMESTAMPS = ("aof-timestamp-enabled yes",)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with redis_container(tmp_path, appendonly=True, extra=TIMESTAMPS) as started:
        yield started


def client(service: Service) -> redis.Redis:
    return redis.Redis(port=service.port, socket_timeout=30)


def ship(service: Service, backup_dir: Path, **storage: Any) -> dict[str, Any]:
    """The real backup-redis-aof flow; the AOF is read through the container's mount."""
    storage.setdefault("s3_bucket", "")
    return backup_redis_aof(
        redis_url=service.url, container=service.name, backup_dir=str(backup_dir), **storage
    )


def on_s3(prefix: str) -> dict[str, str]:
    return {"s3_bucket": stack.S3_BUCKET, "s3_prefix": prefix, "s3_endpoint_url": stack.S3_ENDPOINT}


def seeded(service: Service) -> None:
    """Every core type, TTLs, a >1 MiB value, two dbs (tests/redis_servers.py)."""
    seed_mixed_data(RedisServer(service.port, service.url, service.data_dir, None), 300)  # type: ignore[arg-type]


def fresh_second(r: redis.Redis, after: int) -> int:
    """Wait (on Redis's clock) until a second later than `after` is 200-500 ms old: a
    batch written now belongs to that second, whatever the AOF's cached clock lags."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seconds, micros = r.time()
        if seconds > after and 200_000 <= micros < 500_000:
            return int(seconds)
        time.sleep(0.02)
    raise AssertionError("Redis's clock did not move")


def batch(r: redis.Redis, label: str, after: int) -> int:
    """Keys of several types, with and without a TTL, written inside one second; returns
    that second."""
    second = fresh_second(r, after)
    pipe = r.pipeline(transaction=False)
    for i in range(40):
        pipe.set(f"{label}:s:{i}", f"{label}-{i}", ex=3600 + i if i % 2 else None)
    pipe.hset(f"{label}:h", mapping={"a": 1, "b": label})
    pipe.rpush(f"{label}:l", *range(5))
    pipe.zadd(f"{label}:z", {"m": 1.5})
    # redis-check-aof 7.0 takes a plain file with a line starting "file" for a manifest
    pipe.set(f"{label}:text", "line one\nfile that looks like a manifest line\n# a comment")
    pipe.pexpire(f"{label}:h", 7_200_000)
    pipe.incr("counter")  # one key changed by every batch: its value says which came last
    pipe.execute()
    assert int(r.time()[0]) == second, "a batch spilled into the next second: machine too slow"
    return second


def written_batches(service: Service) -> tuple[list[int], list[Snapshot]]:
    """Three batches, each followed by a snapshot of the whole keyspace (the state
    at the end of its second: nothing else writes)."""
    r = client(service)
    seconds, states = [], []
    last = int(r.time()[0])
    for label in ("a", "b", "c"):
        last = batch(r, label, last)
        seconds.append(last)
        states.append(keyspace_snapshot(service.url))
    return seconds, states


def at(second: int) -> str:
    return utc(second).removesuffix(" UTC")


# ------------------------------------------------------------------------- to a second


def test_recover_to_a_second_gives_exactly_the_keys_written_up_to_it(
    service: Service, tmp_path: Path, s3_prefix: str
) -> None:
    s3 = on_s3(s3_prefix)
    backups = tmp_path / "backups"
    seeded(service)
    first = ship(service, backups, **s3)
    assert first["new_generation"] and first["point_in_time"] and first["marker"]["piece"]
    seconds, states = written_batches(service)
    fresh_second(client(service), seconds[-1])
    client(service).set("after-everything", 1)  # in a later second than every batch
    shipped = ship(service, backups, **s3)
    assert not shipped["new_generation"] and shipped["uploaded"] == shipped["shipped"]

    result = recover(service, backups, target_time=at(seconds[0]))
    assert_same_keyspace(states[0], keyspace_snapshot(service.url))
    assert result["ok"] and result["backup"]["kind"] == "redis-aof"
    point = result["restore_point"]
    assert point["restored to"].startswith(f"{utc(seconds[0])}: every write up to the end")
    assert point["last command kept"].startswith("INCRBY counter (written at ")
    assert step(result, "marker keys at the restore point")["outcome"] == "ok"
    assert (
        "1 markers written up to the cut present"
        in step(result, "marker keys at the restore point")["detail"]
    )
    assert "every byte of the cut chain" in step(result, "what Redis loaded")["detail"]
    published = report("recover-redis")
    assert "restored to" in published and "INCRBY counter" in published

    # the same chain, from S3 alone (the host that held backup_dir is gone)
    shutil.rmtree(backups)
    result = recover(service, tmp_path / "new-host", target_time=at(seconds[1]), **s3)
    assert_same_keyspace(states[1], keyspace_snapshot(service.url))
    assert result["backup"]["from"].startswith(f"s3://{stack.S3_BUCKET}/{s3_prefix}/")
    # ISO 8601 with an offset names the same second
    result = recover(
        service,
        tmp_path / "new-host",
        target_time=f"{at(seconds[2]).replace(' ', 'T')}+00:00",
        **s3,
    )
    assert_same_keyspace(states[2], keyspace_snapshot(service.url))
    assert client(service).get("after-everything") is None


def test_undo_flushall_gives_the_state_before_the_flush(
    service: Service, tmp_path: Path, s3_prefix: str
) -> None:
    s3 = on_s3(s3_prefix)
    backups = tmp_path / "backups"
    r = client(service)
    seeded(service)
    ship(service, backups, **s3)
    batch(r, "before", int(r.time()[0]))
    r.set("same-second-as-the-flush", 1)  # no second boundary helps here: only the cut's place
    expected = keyspace_snapshot(service.url)
    flushed_at = int(r.time()[0])
    r.flushall()
    r.set("written-after-the-flush", "x")
    ship(service, backups, **s3)
    [row] = [
        row for row in backup_status(backup_dir=str(backups), **s3) if row["kind"] == "redis-aof"
    ]
    assert (row["local"], row["S3"], row["source"]) == (
        "fresh",
        "fresh",
        f"127.0.0.1:{service.port}",
    )
    assert row["schedule"] == "every 1 min (late after 2 min)" and row["trend"] == "AOF pieces"

    dry = recover(service, backups, undo_flushall=True, dry_run=True)
    assert dry["restore_point"]["last command kept"].startswith("SET same-second-as-the-flush")
    assert "FLUSHALL" in step(dry, "find the AOF pieces")["detail"]
    assert client(service).get("written-after-the-flush") == b"x"  # the dry run changed nothing

    result = recover(service, backups, undo_flushall=True, target_time=at(flushed_at - 5))
    assert_same_keyspace(expected, keyspace_snapshot(service.url))
    assert "just before the FLUSHALL" in result["restore_point"]["restored to"]
    assert (
        "truncated before the FLUSHALL"
        in step(result, "assemble, cut and validate the AOF")["detail"]
    )

    shutil.rmtree(backups)
    recover(service, tmp_path / "elsewhere", undo_flushall=True, **s3)
    assert_same_keyspace(expected, keyspace_snapshot(service.url))
    with pytest.raises(StepFailed, match="no FLUSHALL or FLUSHDB at or after"):
        recover(
            service,
            tmp_path / "elsewhere",
            undo_flushall=True,
            target_time=at(flushed_at + 60),
            **s3,
        )


def test_a_rewrite_between_two_runs_loses_no_write(service: Service, tmp_path: Path) -> None:
    """Redis rewrites its AOF (a new base; the INCR file it appended to is deleted)
    between two runs: the next run ships that file's last bytes from the hard link the
    run before kept, and a time before, between and after the rewrite restores."""
    backups = tmp_path / "backups"
    r = client(service)
    ship(service, backups)
    second = batch(r, "old", int(r.time()[0]))  # only in the INCR file the rewrite ends
    before = keyspace_snapshot(service.url)
    r.bgrewriteaof()
    deadline = time.monotonic() + 30
    while int(r.info("persistence")["aof_rewrite_in_progress"]) or int(
        r.info("persistence")["aof_rewrite_scheduled"]
    ):
        assert time.monotonic() < deadline, "the AOF rewrite did not finish"
        time.sleep(0.05)
    later = batch(r, "new", second)
    after = keyspace_snapshot(service.url)
    fresh_second(r, later)  # a run covers the seconds before the one it reads in
    run = ship(service, backups)
    assert run["new_generation"] and not run["notes"]
    old_tail = [
        n for n in run["shipped"] if ".incr.aof." in n and not n.endswith(".000000000000.gz")
    ]
    assert old_tail, "the old INCR file's last bytes were not shipped"

    recover(service, backups, target_time=at(second))
    assert_same_keyspace(before, keyspace_snapshot(service.url))
    recover(service, backups, target_time=at(later))
    assert_same_keyspace(after, keyspace_snapshot(service.url))

    # retention: an RDB backup made when the new generation began is the oldest kept:
    # the old generation is no longer needed (dry run first: it lists, deletes nothing)
    source = f"127.0.0.1:{service.port}"
    old_generation, new_generation = run["shipped"][0].split("/")[2], run["generation"]
    rdb = backups / "redis" / f"dump_{new_generation[:15]}_{source_tag(source)}.rdb.gz"
    rdb.parent.mkdir()
    rdb.with_name(rdb.name + ".manifest.json").write_text("{}")  # retention reads names
    rules = {"retention_days": 0.0001, "keep_min": 1, "backup_dir": str(backups), "s3_bucket": ""}
    dry = prune_backups(kind="redis-aof", source=source, dry_run=True, **rules)
    assert {r["backup"]: r["verdict"] for r in dry["rows"]} == {
        old_generation: "would delete",
        new_generation: "keep",
    }
    assert (backups / "redis-aof" / source_tag(source) / old_generation).is_dir()
    prune_backups(kind="redis-aof", source=source, **rules)
    assert sorted(p.name for p in (backups / "redis-aof" / source_tag(source)).iterdir()) == [
        new_generation
    ]


def test_a_dry_run_names_the_pieces_and_changes_nothing(service: Service, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    r = client(service)
    ship(service, backups)
    second = batch(r, "x", int(r.time()[0]))
    fresh_second(r, second)  # a run covers the seconds before the one it reads in
    ship(service, backups)
    files, keys = data_files(service), keyspace_snapshot(service.url)
    started = service.container().attrs["State"]["StartedAt"]
    result = recover(service, backups, target_time=at(second), dry_run=True)
    assert result["ok"] and result["dry_run"]
    found = step(result, "find the AOF pieces")["detail"]
    assert "appendonly.aof.1.base.rdb" in found and "appendonly.aof.1.incr.aof" in found
    assert "sha256 verified" in found
    assert step(result, "place the AOF")["outcome"] == "planned"
    assert (
        data_files(service) == files and service.container().attrs["State"]["StartedAt"] == started
    )
    assert_same_keyspace(keys, keyspace_snapshot(service.url))
    assert not [p for p in backups.iterdir() if p.name.startswith(".pitr-staging")]
    with pytest.raises(StepFailed, match="no AOF shipped covers .*: covered are"):
        recover(service, backups, target_time=at(second - 3600), dry_run=True)
    with pytest.raises(StepFailed, match="is not a time"):
        recover(service, backups, target_time="yesterday", dry_run=True)


# --------------------------------------------------------------- what cannot be done


def test_without_timestamps_the_aof_ships_and_the_run_says_why_pitr_is_unavailable(
    tmp_path: Path,
) -> None:
    with redis_container(tmp_path, appendonly=True) as service:
        r = client(service)
        written = int(r.time()[0])
        r.set("k", "v")
        fresh_second(r, written)  # a run covers the seconds before the one it reads in
        run = ship(service, tmp_path / "backups")
        assert not run["point_in_time"] and run["shipped"]
        assert "aof-timestamp-enabled is no" in run["no_pitr"]
        assert "UNAVAILABLE: aof-timestamp-enabled is no" in report("backup-redis-aof")
        with pytest.raises(StepFailed, match="shipped with aof-timestamp-enabled no"):
            recover(service, tmp_path / "backups", target_time=at(written))


def test_appendonly_no_ends_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        state = backup_redis_aof(
            redis_url=server.url,
            container="",
            data_dir=str(server.dir),
            backup_dir=str(tmp_path / "backups"),
            s3_bucket="",
            return_state=True,
        )
        assert state.is_completed() and state.name == "Unavailable"
        assert "appendonly no" in state.message
        assert not (tmp_path / "backups" / "redis-aof").exists()
        assert server.client().hlen(MARKER_KEY) == 0


def test_another_redis_aof_is_refused_by_the_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir names the AOF folder of another Redis: the marker this run wrote to the
    Redis at redis_url is never in it. (The marker's deadline is cut to 2 s: a marker
    is in its own Redis's file within milliseconds, and the wait is not the subject.)"""
    monkeypatch.setattr(aof_shipping, "MARKER_DEADLINE", 2.0)
    aof = {"appendonly": "yes", "aof_timestamp_enabled": "yes"}
    with (
        running_redis(tmp_path / "a", **aof) as ours,
        running_redis(tmp_path / "b", **aof) as other,
    ):
        other.client().set("theirs", 1)
        with pytest.raises(RuntimeError, match="does not hold the marker"):
            backup_redis_aof(
                redis_url=ours.url,
                container="",
                data_dir=str(other.dir),
                backup_dir=str(tmp_path / "backups"),
                s3_bucket="",
            )
        assert not list((tmp_path / "backups").rglob("*.manifest.json"))  # nothing stored


# ------------------------------------------------------------------- drill, retention


def test_the_drill_restores_the_newest_chain_to_a_marker_time(
    service: Service, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    r = client(service)
    ship(service, backups)
    for label in ("d1", "d2"):  # two more runs, each marker in a second of its own
        second = batch(r, label, int(r.time()[0]))
        fresh_second(r, second)
        ship(service, backups)
    result = verify_restore(
        components=["redis-aof"],
        redis_container=service.name,
        backup_dir=str(backups),
        s3_bucket="",
        scratch_dir=str(tmp_path / "scratch"),
    )
    drill = result["components"]["redis-aof"]
    markers = step(drill, "marker keys at the restore point")
    assert markers["outcome"] == "ok"
    assert "markers written up to the cut present" in markers["detail"]
    assert "1 written after it absent" in markers["detail"]
    assert "every byte of the cut chain" in step(drill, "what Redis loaded")["detail"]
    assert drill["restore_point"]["restored to"].endswith("none after")


def test_aof_generations_go_once_the_rdb_backups_no_longer_reach_them() -> None:
    g = ["20261201_000000_aaaaaaaa", "20261202_000000_bbbbbbbb", "20261203_000000_cccccccc"]
    moment = datetime(2026, 12, 2, 12, tzinfo=UTC)
    assert generations_to_delete(g, moment) == ([g[0]], g[1:])  # Dec 2 12:00 needs g[1]
    assert generations_to_delete(g, datetime(2026, 12, 3, tzinfo=UTC)) == (g[:2], g[2:])
    assert generations_to_delete(g, None) == ([], g)
    assert generations_to_delete(g, datetime(2030, 1, 1, tzinfo=UTC))[1] == g[2:]  # newest stays
    tag = source_tag("10.0.0.1:6379")
    names = [f"dump_2026120{d}_060000_{tag}.rdb.gz" for d in (1, 2, 3)]
    names.append(f"dump_20261130_060000_{source_tag('other:6379')}.rdb.gz")
    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    # within 1.5 days: Dec 2 06:00 and Dec 3; keep_min 1 adds nothing older
    assert snapshot_cutoff(names, "10.0.0.1:6379", now, 1.5, 1) == datetime(
        2026, 12, 2, 6, tzinfo=UTC
    )
    # keep_min 3 reaches back to Dec 1 (another server's older backup never counts)
    assert snapshot_cutoff(names, "10.0.0.1:6379", now, 1.5, 3) == datetime(
        2026, 12, 1, 6, tzinfo=UTC
    )
    assert snapshot_cutoff([], "10.0.0.1:6379", now, 7, 3) is None


def test_pieces_s3_lacked_after_a_failed_upload_go_up_with_the_next_run(
    service: Service, tmp_path: Path, s3_prefix: str
) -> None:
    s3 = on_s3(s3_prefix)
    backups, source = tmp_path / "backups", f"127.0.0.1:{service.port}"
    first = ship(service, backups, **s3)
    client(service).set("while-s3-refused", 1)
    with pytest.raises(S3Error, match="does not exist"):  # a real S3 refusal, not retried
        ship(service, backups, **(s3 | {"s3_bucket": "proxilion-dr-no-such-bucket"}))
    assert "stored locally, NOT uploaded" in report("backup-redis-aof")

    def listed(where: str) -> set[str]:
        if where == "local":
            found = pieces_local(backups, "redis-aof", source, first["generation"])
        else:
            found = pieces_remote(stack.S3_BUCKET, s3_prefix, "redis-aof", source,
                                  first["generation"], stack.S3_ENDPOINT)  # fmt: skip
        return {p.name for p in found}

    stranded = listed("local") - listed("S3")
    assert len(stranded) == 1  # the failed run's piece: stored here, not there
    run = ship(service, backups, **s3)
    assert set(run["caught_up"]) == stranded and listed("local") == listed("S3")
