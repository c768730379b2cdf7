"""GFS retention (restic's and borgmatic's keep_hourly/daily/weekly/monthly/yearly) on top
of retention_days and keep_min: each rule on its own, gaps, the reasons reported, a year
of daily backups written as names and manifests pruned locally (also as a dry run) and
in S3, the compliance preset, and Object Lock retention following the rule that keeps a
backup (SeaweedFS's lock-enabled bucket, GOVERNANCE so the test can clean up)."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from sandbox import constants as stack
from sandbox.stack import _ensure_bucket
from tasks.store.archive import Manifest, manifest_name
from tasks.store.local import (
    Retention,
    backup_name,
    parse_keep,
    period_end,
    plan_retention,
    prune_local,
    resolve_retention,
)
from tasks.store.s3 import object_key, prune_remote
from tests.conftest import require

SOURCE = "redis.internal:6379"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)  # a Friday, ISO week 48


def backup(created: datetime, kind: str = "redis", source_id: str = SOURCE) -> Manifest:
    data = f"{kind} {created.isoformat()}".encode()
    return Manifest(
        kind=kind,
        name=backup_name(kind, created, "gzip", source_id),
        created_at=created.isoformat(),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        compression="gzip",
        raw_size=len(data),
        duration_seconds=0.1,
        source_id=source_id,
    )


def at(day: date, hour: int = 1) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def kept_days(plan_keep: list[Manifest]) -> set[date]:
    return {datetime.fromisoformat(m.created_at).date() for m in plan_keep}


def plan(backups: list[Manifest], **rules: int) -> tuple[set[date], dict[str, list[str]]]:
    days = rules.pop("days", 0)
    result = plan_retention(
        backups, NOW, Retention(days, rules.pop("keep_min", 1), **rules), SOURCE
    )
    by_day = {datetime.fromisoformat(m.created_at).date(): m.name for m in result.keep}
    return kept_days(result.keep), {str(d): result.reasons[n] for d, n in by_day.items()}


def daily(first: date, last: date, hour: int = 1) -> list[Manifest]:
    return [backup(at(first + timedelta(days=n), hour)) for n in range((last - first).days + 1)]


# ------------------------------------------------------------------- each rule alone


def test_hourly_keeps_the_newest_of_each_of_the_last_n_hours() -> None:
    # every 20 minutes for 5 hours before NOW: 15 backups, 3 per hour
    backups = [backup(NOW - timedelta(minutes=20 * n + 1)) for n in range(15)]
    result = plan_retention(backups, NOW, Retention(0, 1, hourly=3), SOURCE)
    assert {datetime.fromisoformat(m.created_at).strftime("%H:%M") for m in result.keep} == {
        "11:59",  # newest: keep_min 1 and the newest of hour 11
        "10:59",
        "09:59",
    }
    assert result.reasons[result.keep[0].name] == ["newest 1", "hourly 2026-11-27 11:00"]
    assert len(result.delete) == 12


def test_daily_keeps_the_newest_of_each_day_with_a_backup_and_skips_gaps() -> None:
    # four a day, but nothing on the 24th and 25th: the rule counts days that HAVE one
    backups = [
        backup(at(day, hour))
        for day in (date(2026, 11, d) for d in (21, 22, 23, 26, 27))
        for hour in (0, 6, 12, 18)
        if at(day, hour) <= NOW
    ]
    kept, reasons = plan(backups, daily=4)
    assert kept == {date(2026, 11, d) for d in (22, 23, 26, 27)}
    assert reasons["2026-11-26"] == ["daily 2026-11-26"]
    assert reasons["2026-11-27"] == ["newest 1", "daily 2026-11-27"]
    kept_26 = [m for m in backups if m.created_at.startswith("2026-11-26")][-1]  # its newest
    assert kept_26.name in plan_retention(backups, NOW, Retention(0, 1, daily=4), SOURCE).reasons


def test_weekly_keeps_the_newest_of_each_iso_week() -> None:
    kept, reasons = plan(daily(date(2026, 10, 1), date(2026, 11, 27)), weekly=3)
    # W48 (Mon 23 – Fri 27 so far), W47 ends Sunday 22, W46 ends Sunday 15
    assert kept == {date(2026, 11, 27), date(2026, 11, 22), date(2026, 11, 15)}
    assert reasons["2026-11-22"] == ["weekly 2026-W47"]


def test_monthly_keeps_the_last_backup_of_each_month() -> None:
    kept, reasons = plan(daily(date(2026, 1, 1), date(2026, 11, 27)), monthly=4)
    assert kept == {date(2026, 11, 27), date(2026, 10, 31), date(2026, 9, 30), date(2026, 8, 31)}
    assert reasons["2026-09-30"] == ["monthly 2026-09"]


def test_yearly_keeps_the_last_backup_of_each_year_even_years_apart() -> None:
    backups = [backup(at(date(y, m, 15))) for y in (2020, 2023, 2026) for m in (3, 9) if y < 2026]
    backups.append(backup(at(date(2026, 11, 1))))
    kept, reasons = plan(backups, yearly=2)
    assert kept == {date(2026, 11, 1), date(2023, 9, 15)}  # 2021, 2022 had none: not counted
    assert reasons["2023-09-15"] == ["yearly 2023"]


def test_rules_add_up_and_days_and_keep_min_still_apply() -> None:
    backups = daily(date(2026, 9, 1), date(2026, 11, 27))
    kept, reasons = plan(backups, days=3, keep_min=5, monthly=3)
    five_newest = {date(2026, 11, 27) - timedelta(days=n) for n in range(5)}
    assert kept == five_newest | {date(2026, 10, 31), date(2026, 9, 30)}
    assert reasons["2026-11-27"] == ["newest 5", "within 3 days", "monthly 2026-11"]
    assert reasons["2026-11-23"] == ["newest 5"]


def test_other_sources_and_future_backups_are_left_alone() -> None:
    ours = daily(date(2026, 11, 1), date(2026, 11, 27))
    theirs = [backup(at(date(2026, 1, 1)), source_id="other:6379")]
    future = backup(NOW + timedelta(days=2))
    result = plan_retention([*ours, *theirs, future], NOW, Retention(0, 1, daily=2), SOURCE)
    assert len(result.keep) == 2 and result.future == [future] and result.other_sources == 1
    assert theirs[0] not in result.delete


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("", {}),
        ("daily=7 weekly=4", {"daily": 7, "weekly": 4}),
        ("hourly=24,monthly=12, yearly=3", {"hourly": 24, "monthly": 12, "yearly": 3}),
        ("compliance", {"days": 366}),
    ],
)
def test_keep_settings_parse(text: str, parsed: dict[str, float]) -> None:
    assert parse_keep(text) == parsed


@pytest.mark.parametrize("text", ["daily", "daily=-1", "fortnightly=2", "daily=x"])
def test_keep_settings_refuse_what_they_do_not_understand(text: str) -> None:
    with pytest.raises(ValueError, match="not understood: use hourly=N daily=N"):
        parse_keep(text)


def test_run_parameters_win_over_the_setting_and_a_preset_only_adds() -> None:
    given = {"hourly": None, "daily": 2, "weekly": None, "monthly": None, "yearly": None}
    retention = resolve_retention(30, 3, given, "daily=7 weekly=4 compliance")
    assert retention == Retention(366, 3, daily=2, weekly=4)
    assert resolve_retention(400, 3, given, "compliance").days == 400
    with pytest.raises(ValueError, match="keep_daily must be 0 or more"):
        Retention(7, 3, daily=-1)


def test_a_lock_follows_a_rule_only_once_its_period_is_over() -> None:
    retention = Retention(7, 1, daily=7, monthly=12)
    created = datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
    reasons = ["daily 2026-10-31", "monthly 2026-10"]
    # October is over: the monthly rule's 12 months count
    assert retention.kept_until(created, reasons, NOW) == created + 12 * timedelta(days=31)
    # on the same evening a later backup of October could still take its place
    evening = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)
    assert retention.kept_until(created, reasons, evening) == created + timedelta(days=7)
    assert period_end("weekly", NOW) == datetime(2026, 11, 30, tzinfo=UTC)
    assert period_end("monthly", datetime(2026, 12, 31, 5, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )


# ------------------------------------------------- a year of daily backups, simulated

YEAR = daily(date(2025, 11, 28), date(2026, 11, 27))  # 365 backups at 01:00
YEAR_RULES = Retention(7, 3, daily=14, weekly=8, monthly=12, yearly=2)
# What those rules keep, worked out by calendar rather than by the code under test.
WITHIN_7_DAYS = {date(2026, 11, d) for d in range(21, 28)}  # cutoff Nov 20 12:00
DAILY_14 = {date(2026, 11, d) for d in range(14, 28)}
WEEKLY_8 = {date(2026, 11, 27)} | {date(2026, m, d) for m, d in [(11, 22), (11, 15), (11, 8),
                                                                  (11, 1), (10, 25), (10, 18),
                                                                  (10, 11)]}  # fmt: skip
MONTHLY_12 = {date(2026, 11, 27), date(2025, 12, 31)} | {
    date(2026, m, d)
    for m, d in [
        (1, 31),
        (2, 28),
        (3, 31),
        (4, 30),
        (5, 31),
        (6, 30),
        (7, 31),
        (8, 31),
        (9, 30),
        (10, 31),
    ]  # fmt: skip
}
YEARLY_2 = {date(2026, 11, 27), date(2025, 12, 31)}
EXPECTED_YEAR = WITHIN_7_DAYS | DAILY_14 | WEEKLY_8 | MONTHLY_12 | YEARLY_2


def write_local(folder: Path, backups: list[Manifest]) -> None:
    for m in backups:
        path = folder / m.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{m.kind} {m.created_at}".encode())
        (folder / manifest_name(m.name)).write_text(m.to_json())


def test_a_year_of_daily_backups_keeps_exactly_what_the_rules_say(tmp_path: Path) -> None:
    assert len(YEAR) == 365 and len(EXPECTED_YEAR) == 30
    write_local(tmp_path, YEAR)
    dry = prune_local.fn(tmp_path, "redis", SOURCE, YEAR_RULES, dry_run=True, now=NOW)
    assert kept_days(dry.keep) == EXPECTED_YEAR
    assert len(list((tmp_path / "redis").iterdir())) == 2 * 365  # a dry run deletes nothing
    reasons = {datetime.fromisoformat(m.created_at).date(): dry.reasons[m.name] for m in dry.keep}
    assert reasons[date(2025, 12, 31)] == ["monthly 2025-12", "yearly 2025"]
    assert reasons[date(2026, 10, 11)] == ["weekly 2026-W41"]
    assert reasons[date(2026, 11, 14)] == ["daily 2026-11-14"]  # W46's newest is the 15th
    assert reasons[date(2026, 11, 27)][:2] == ["newest 3", "within 7 days"]
    done = prune_local.fn(tmp_path, "redis", SOURCE, YEAR_RULES, now=NOW)
    assert kept_days(done.keep) == EXPECTED_YEAR and len(done.delete) == 365 - 30
    left = {p.name for p in (tmp_path / "redis").iterdir()}
    assert left == {
        n for m in dry.keep for n in (Path(m.name).name, manifest_name(Path(m.name).name))
    }


def test_compliance_keeps_every_daily_log_backup_for_a_year(tmp_path: Path) -> None:
    logs = [backup(at(date(2025, 11, 1) + timedelta(days=n)), "logs", "gw") for n in range(392)]
    retention = resolve_retention(30, 3, dict.fromkeys(("hourly", "daily"), None), "compliance")
    result = plan_retention(logs, NOW, retention, "gw")
    cutoff = NOW - timedelta(days=366)
    assert {m.name for m in result.keep} == {
        m.name for m in logs if datetime.fromisoformat(m.created_at) >= cutoff
    }
    assert len(result.keep) == 366 and all(
        datetime.fromisoformat(m.created_at) < cutoff for m in result.delete
    )


# --------------------------------------------------------------------------- in S3


@pytest.fixture
def locked_prefix() -> Iterator[str]:
    """A prefix in the lock-enabled bucket; GOVERNANCE locks only, removed afterwards."""
    require(stack.S3_HOST, stack.S3_PORT, "SeaweedFS S3")
    _ensure_bucket()
    prefix = f"test-gfs-{uuid.uuid4().hex[:10]}"
    yield prefix
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_object_versions(Bucket=stack.S3_LOCKED_BUCKET, Prefix=prefix + "/")
    for entry in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
        with contextlib.suppress(ClientError):
            s3.delete_object(
                Bucket=stack.S3_LOCKED_BUCKET,
                Key=entry["Key"],
                VersionId=entry["VersionId"],
                BypassGovernanceRetention=True,
            )


def upload(bucket: str, prefix: str, backups: list[Manifest], lock: bool = False) -> None:
    """Each backup and its manifest; `lock`: GOVERNANCE-locked for a minute from now."""
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    until = datetime.now(UTC) + timedelta(minutes=1)
    for m in backups:
        locking = {}
        if lock:
            locking = {"ObjectLockMode": "GOVERNANCE", "ObjectLockRetainUntilDate": until}
        key = object_key(prefix, m.name)
        s3.put_object(Bucket=bucket, Key=key, Body=f"{m.kind} {m.created_at}".encode(), **locking)
        s3.put_object(Bucket=bucket, Key=manifest_name(key), Body=m.to_json().encode(), **locking)


def test_s3_pruning_applies_the_same_rules_per_source(s3_prefix: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    ours = [backup(now - timedelta(days=n, hours=1)) for n in range(40)]
    theirs = [backup(now - timedelta(days=n, hours=1), source_id="other:6379") for n in (30, 39)]
    upload(stack.S3_BUCKET, s3_prefix, ours + theirs)
    rules = Retention(2, 1, weekly=2)
    args = (stack.S3_BUCKET, s3_prefix, "redis", SOURCE, stack.S3_ENDPOINT, rules)
    dry = prune_remote.fn(*args, dry_run=True)
    expected = {m.name for m in plan_retention(ours, now, rules, SOURCE).keep}
    assert {m.name for m in dry.keep} == expected and dry.other_sources == 2
    # 2 days, plus the newest of this ISO week and of the last when they are older (on a
    # Monday both are among the 2 days: a CI rehearsal failed on one with 3 <= 2)
    assert 2 <= len(expected) <= 4
    done = prune_remote.fn(*args)
    listing = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT).list_objects_v2(
        Bucket=stack.S3_BUCKET, Prefix=s3_prefix + "/"
    )
    left = {item["Key"].removeprefix(s3_prefix + "/") for item in listing["Contents"]}
    assert {n for n in left if not n.endswith(".json")} == expected | {m.name for m in theirs}
    assert len(done.delete) == 40 - len(expected)


def test_an_object_lock_is_extended_to_the_end_of_the_rule_keeping_it(locked_prefix: str) -> None:
    """Uploaded locked for a minute (`days`); the daily rule keeps the backups of closed
    days 3 days each: their lock is extended to that (created + 3 days), today's is not
    (a later backup today may replace it); neither is a backup kept by `days` alone."""
    now = datetime.now(UTC).replace(microsecond=0)
    backups = [backup(now - timedelta(days=n, minutes=1)) for n in (0, 1, 2)]
    minute = 1 / 1440
    upload(stack.S3_LOCKED_BUCKET, locked_prefix, backups, lock=True)
    rules = Retention(minute, 1, daily=3)
    plan_ = prune_remote.fn(
        stack.S3_LOCKED_BUCKET,
        locked_prefix,
        "redis",
        SOURCE,
        stack.S3_ENDPOINT,
        rules,
        lock_mode="governance",
    )
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    until = {}
    for m in backups:
        head = s3.head_object(Bucket=stack.S3_LOCKED_BUCKET, Key=object_key(locked_prefix, m.name))
        until[m.name] = head["ObjectLockRetainUntilDate"]
        sidecar = s3.head_object(
            Bucket=stack.S3_LOCKED_BUCKET, Key=manifest_name(object_key(locked_prefix, m.name))
        )
        assert sidecar["ObjectLockRetainUntilDate"] == until[m.name]
    today, yesterday, before = backups
    created = datetime.fromisoformat(yesterday.created_at)
    assert until[yesterday.name] == created + timedelta(days=3)
    assert until[before.name] == datetime.fromisoformat(before.created_at) + timedelta(days=3)
    if period_end("daily", datetime.fromisoformat(today.created_at)) > now:  # not at 00:00
        assert until[today.name] < now + timedelta(minutes=2)
    assert len(plan_.extended) in (2, 3) and "daily" in plan_.extended[0]
