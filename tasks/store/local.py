"""The local backup directory: names, durable commits, listing, retention.

A backup is complete only when its manifest sidecar exists; the manifest is
written last, after the data is fsynced. Incomplete backups are never listed,
restored or counted for retention.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.clock import parse_time, utc_now
from tasks.common.files import OWNER_ONLY, Modes, fsync_dir, make_dirs, write_durably
from tasks.common.log import run_logger
from tasks.store.archive import (
    AGE_SUFFIX,
    SUFFIXES,
    CompressedFile,
    Compression,
    Manifest,
    manifest_name,
)
from tasks.store.kinds import KINDS, source_of, source_tag

FUTURE_TOLERANCE = timedelta(minutes=5)
# A staging file untouched this long belongs to a run that died: no backup run goes this
# long without writing to it (the lock wait is 15 min, the Redis save deadline 10 min by
# default, and copies write continuously). Its mtime is its last write, not its start.
STALE_PARTIAL_AGE = timedelta(hours=24)


class BackupNotFound(LookupError):
    """No complete backup matches the request."""


def backup_name(kind: str, created_at: datetime, compression: Compression, source_id: str) -> str:
    """The relative name of a new backup, in the seed scripts' shape (UTC) with the
    source's tag, so two sources' backups of the same second never collide:
    `redis/dump_20260101_000000_1a2b3c4d.rdb.gz`."""
    spec = KINDS[kind]
    stamp = created_at.astimezone(UTC).strftime("%Y%m%d_%H%M%S")
    tag = source_tag(source_id)
    return f"{spec.folder}/{spec.stem}_{stamp}_{tag}{spec.ext}{SUFFIXES[compression]}"


def new_backup_name(backup_dir: Path, kind: str, compression: Compression, source_id: str) -> str:
    """The name of a backup of `source_id` made now (`backup_name`); when this source
    already has a backup of this second (a run right after another), the next second's:
    names stay unique and in time order, and the second run does not fail."""
    while True:
        now = utc_now()
        name = backup_name(kind, now, compression, source_id)
        taken = resolve_name(backup_dir, name)
        if not taken.exists() and not taken.with_name(taken.name + AGE_SUFFIX).exists():
            return name
        time.sleep(1.001 - now.microsecond / 1_000_000)


def resolve_name(backup_dir: Path, name: str) -> Path:
    """The path of a backup name, refusing names that escape the backup directory."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name.strip():
        raise ValueError(
            f"backup name {name!r} is not a plain relative name: give one as listed "
            "(e.g. 'redis/dump_20260101_000000_1a2b3c4d.rdb.gz') or 'latest'"
        )
    root = backup_dir.resolve()
    path = (root / candidate).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"backup name {name!r} points outside the backup directory {root}")
    return path


@task(cache_policy=NO_CACHE)
def prepare_backup_dir(backup_dir: Path, kind: str, modes: Modes = OWNER_ONLY) -> Path:
    """Create the kind's folder (missing folders with `modes.directory`, whatever the
    umask) and prove it is writable before any work starts; remove staging files that
    killed runs left behind (logged by name)."""
    folder = Path(backup_dir) / KINDS[kind].folder
    probe = folder / f".write-test-{os.getpid()}"
    try:
        make_dirs(folder, modes.directory)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"backup directory {folder} is not writable ({error.strerror or error}): "
            "fix its permissions or free space, or choose another backup_dir"
        ) from None
    removed = remove_stale_partials(folder, kind, utc_now())
    if removed:
        run_logger().warning(
            "Removed %d partial file(s) left by killed runs in %s (untouched for over %s): %s",
            len(removed),
            folder,
            STALE_PARTIAL_AGE,
            ", ".join(removed),
        )
    return folder


def remove_stale_partials(folder: Path, kind: str, now: datetime) -> list[str]:
    """Delete our hidden staging files (and only ours: the `staging_path` pattern) not
    written to for `STALE_PARTIAL_AGE`; a running backup's file is always younger."""
    pattern = KINDS[kind].staging_pattern()
    cutoff = (now - STALE_PARTIAL_AGE).timestamp()
    removed = []
    for path in sorted(Path(folder).glob(".*.partial")):
        try:
            stale = pattern.fullmatch(path.name) and path.lstat().st_mtime < cutoff
            if stale and path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path.name)
        except FileNotFoundError:
            continue  # another run cleaned it up at the same time
    return removed


def explain_write_error(error: OSError, path: Path) -> OSError:
    """A full disk or quota while writing a backup, said plainly with the fix;
    other OS errors unchanged."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    return OSError(
        error.errno,
        f"no space left on the device of {Path(path).parent} while writing a backup "
        f"({error.strerror}); nothing was stored: free space or choose another backup_dir",
    )


def staging_path(backup_dir: Path, name: str) -> Path:
    """Where a backup is written before it is complete: hidden, beside its final place,
    unique to this run (two runs never write the same partial file)."""
    final = resolve_name(backup_dir, name)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")


@task(cache_policy=NO_CACHE)
def commit_local(
    backup_dir: Path, staged: CompressedFile, manifest: Manifest, modes: Modes = OWNER_ONLY
) -> Path:
    """Move a finished, fsynced file to its name (`manifest.local_name`: `.age` added
    when the local copy is encrypted) with `modes.file`, then write its manifest (same
    mode, named after the file) last."""
    final = resolve_name(Path(backup_dir), manifest.local_name)
    make_dirs(final.parent, modes.directory)  # a chained kind's generation folder
    if final.exists():
        raise FileExistsError(f"backup {manifest.local_name} already exists; not overwriting it")
    os.chmod(staged.path, modes.file)
    os.replace(staged.path, final)
    fsync_dir(final.parent)
    record_manifest.fn(backup_dir, manifest, modes)
    return final


@task(cache_policy=NO_CACHE)
def record_manifest(backup_dir: Path, manifest: Manifest, modes: Modes = OWNER_ONLY) -> None:
    """Write (or replace, atomically) the manifest of a stored backup, durably: after
    its data, and again once facts about its S3 copy are known."""
    final = resolve_name(Path(backup_dir), manifest.local_name)
    write_durably(
        final.with_name(manifest_name(final.name)), manifest.to_json().encode(), modes.file
    )


def list_local(backup_dir: Path, kind: str, source_id: str | None = None) -> list[Manifest]:
    """Complete local backups of a kind (manifest and data present, plain or age-encrypted
    as the manifest says), oldest first; only those of `source_id` when given (see
    `source_of`)."""
    folder = Path(backup_dir) / KINDS[kind].folder
    found: list[Manifest] = []
    for sidecar in folder.glob(f"*{manifest_name('')}"):
        if sidecar.name.startswith("."):
            continue
        try:
            manifest = Manifest.from_json(sidecar.read_bytes())
        except (ValueError, TypeError):
            continue  # an unreadable manifest is not a complete backup
        if manifest.kind != kind or (source_id is not None and source_of(manifest) != source_id):
            continue
        if (Path(backup_dir) / manifest.local_name).is_file():
            found.append(manifest)
    return sorted(found, key=lambda m: m.created_at)


def find_local(
    backup_dir: Path, kind: str, name: str = "latest", source_id: str | None = None
) -> tuple[Manifest, Path]:
    """A complete local backup by name, or the newest one for 'latest' (of `source_id`
    when given, else of any source), and its file (`manifest.local_name`)."""
    if name != "latest":
        resolve_name(Path(backup_dir), name)
    complete = list_local(backup_dir, kind, source_id)
    now = utc_now()
    if name == "latest":
        current = [m for m in complete if parse_time(m.created_at) <= now + FUTURE_TOLERANCE]
        if not current:
            raise BackupNotFound(
                f"no complete {kind} backup in {Path(backup_dir) / KINDS[kind].folder}: "
                f"run backup-{kind} first or point backup_dir at the right place"
            )
        manifest = current[-1]
    else:
        matches = [m for m in complete if m.name == name]
        if not matches:
            raise BackupNotFound(
                f"no complete backup named {name!r} in {backup_dir} (a backup without its "
                "manifest is incomplete): pick one from the list or use 'latest'"
            )
        manifest = matches[0]
    return manifest, resolve_name(Path(backup_dir), manifest.local_name)


# The GFS rules (restic's `forget --keep-*`, borgmatic's `keep_*`), each with the
# calendar bucket it keeps one backup of (UTC, as names and manifests) and how long,
# at most, it keeps that one: N of its periods (a month counted as 31 days, a year as
# 366, so an Object Lock following the rule never ends before the rule lets go).
GFS_RULES: dict[str, tuple[str, timedelta]] = {
    "hourly": ("%Y-%m-%d %H:00", timedelta(hours=1)),
    "daily": ("%Y-%m-%d", timedelta(days=1)),
    "weekly": ("%G-W%V", timedelta(days=7)),
    "monthly": ("%Y-%m", timedelta(days=31)),
    "yearly": ("%Y", timedelta(days=366)),
}
# Presets a `*_KEEP` setting may name instead of rules: what each adds on top.
PRESETS: dict[str, dict[str, float]] = {
    # PCI DSS 10.7 (the runbook's compliance table): a year of logs, every backup kept
    # (each log backup is another window, not a newer copy); 366 covers a leap year.
    "compliance": {"days": 366},
}


@dataclass(frozen=True)
class Retention:
    """How long one source's backups stay. A complete backup is kept when ANY rule
    keeps it: the newest `keep_min`, those younger than `days`, and per GFS rule the
    newest backup of each of the last N hours / days / ISO weeks / months / years that
    hold a backup (restic's model: a gap in the backups does not eat into N). Every
    other one is deleted; the newest is always kept."""

    days: float
    keep_min: int
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        check_retention(self.days, self.keep_min)
        for rule, count in self.gfs().items():
            if count < 0:
                raise ValueError(f"keep_{rule} must be 0 or more, got {count}")

    def gfs(self) -> dict[str, int]:
        """The GFS rules by name (0: rule off)."""
        return {rule: int(getattr(self, rule)) for rule in GFS_RULES}

    def describe(self) -> str:
        """`7 days, newest 3, daily 7, monthly 12`: the rules as the reports name them."""
        rules = [f"{self.days:g} days", f"newest {self.keep_min}"]
        return ", ".join(rules + [f"{r} {n}" for r, n in self.gfs().items() if n])

    def kept_until(self, created_at: datetime, reasons: list[str], now: datetime) -> datetime:
        """The latest time the rules in `reasons` (as `plan_retention` gives them) may
        keep a backup made at `created_at`: what an Object Lock follows. A GFS rule
        counts once its hour / day / week / month / year is over (`now` is past it):
        until then a newer backup of the same period may take its place."""
        until = created_at + timedelta(days=self.days)
        for reason in reasons:
            rule = reason.split(" ", 1)[0]
            if rule in GFS_RULES and period_end(rule, created_at) <= now:
                until = max(until, created_at + self.gfs()[rule] * GFS_RULES[rule][1])
        return until


def period_end(rule: str, moment: datetime) -> datetime:
    """When the GFS period (UTC hour, day, ISO week, month, year) holding `moment` ends."""
    t = moment.astimezone(UTC)
    if rule == "hourly":
        return t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if rule == "daily":
        return day + timedelta(days=1)
    if rule == "weekly":
        return day + timedelta(days=7 - day.weekday())
    if rule == "monthly":
        return (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return day.replace(year=t.year + 1, month=1, day=1)


def parse_keep(text: str) -> dict[str, float]:
    """A `*_KEEP` setting: GFS rules `hourly=24 daily=7 weekly=4 monthly=12 yearly=3`
    (any of them, space- or comma-separated) and/or a preset name (`compliance`), as
    the values they set. Refuses anything else, naming what is accepted."""
    found: dict[str, float] = {}
    for word in text.replace(",", " ").split():
        rule, _, count = word.partition("=")
        if word in PRESETS:
            found.update(PRESETS[word])
        elif rule in GFS_RULES and count.isdigit():
            found[rule] = int(count)
        else:
            raise ValueError(
                f"retention rule {word!r} not understood: use "
                f"{' '.join(f'{r}=N' for r in GFS_RULES)} or a preset ({', '.join(PRESETS)})"
            )
    return found


def resolve_retention(
    days: float, keep_min: int, given: dict[str, int | None], setting: str
) -> Retention:
    """The retention a run applies: each GFS rule from `given` (the run's keep_*
    parameters) unless None, else from the `*_KEEP` setting; a preset there raises
    `days` to its own (rules only ever add what is kept)."""
    from_setting = parse_keep(setting)
    rules = {r: n if n is not None else int(from_setting.get(r, 0)) for r, n in given.items()}
    return Retention(max(days, from_setting.get("days", 0)), keep_min, **rules)


@dataclass
class RetentionPlan:
    """Which complete backups of one source to keep and delete (with, per kept name,
    the rules that keep it), which were dated in the future, and how many other
    sources' backups were left alone."""

    keep: list[Manifest] = field(default_factory=list)
    delete: list[Manifest] = field(default_factory=list)
    future: list[Manifest] = field(default_factory=list)
    other_sources: int = 0
    reasons: dict[str, list[str]] = field(default_factory=dict)
    # In a versioned S3 bucket: backups due for deletion whose versions are still under
    # Object Lock ("name (locked until …)"), kept for now; and the bytes really freed.
    locked: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    # Object Lock retentions extended to follow the GFS rule that keeps the backup.
    extended: list[str] = field(default_factory=list)


def check_retention(retention_days: float, keep_min: int) -> None:
    """Refuse retention settings that could delete what must be kept."""
    if retention_days < 0:
        raise ValueError(f"retention_days must be 0 or more, got {retention_days}")
    if keep_min < 1:
        raise ValueError(f"keep_min must be at least 1 (the newest is always kept), got {keep_min}")


def keep_reasons(backups: list[Manifest], now: datetime, retention: Retention) -> list[list[str]]:
    """For `backups` (one source's, newest first), the rules that keep each one: `newest
    3`, `within 7 days`, `daily 2026-11-27`… (empty: nothing keeps it)."""
    reasons: list[list[str]] = [[] for _ in backups]
    cutoff = now - timedelta(days=retention.days)
    times = [parse_time(m.created_at) for m in backups]
    for position, created in enumerate(times):
        if position < retention.keep_min:
            reasons[position].append(f"newest {retention.keep_min}")
        if retention.days and created >= cutoff:  # 0: no age rule
            reasons[position].append(f"within {retention.days:g} days")
    for rule, count in retention.gfs().items():
        seen: set[str] = set()
        for position, created in enumerate(times):
            bucket = created.astimezone(UTC).strftime(GFS_RULES[rule][0])
            if len(seen) < count and bucket not in seen:  # the newest of its bucket
                seen.add(bucket)
                reasons[position].append(f"{rule} {bucket}")
    return reasons


def plan_retention(
    backups: list[Manifest], now: datetime, retention: Retention, source_id: str
) -> RetentionPlan:
    """For the backups of `source_id`: keep what any rule of `retention` keeps (never
    the newest complete backup, never fewer than `keep_min`) and delete the rest;
    backups dated in the future are left alone, and so are other sources' (a server
    whose backups fail for a while keeps its last ones, whatever the others do)."""
    plan = RetentionPlan()
    current = []
    for manifest in backups:
        if source_of(manifest) != source_id:
            plan.other_sources += 1
        elif parse_time(manifest.created_at) > now + FUTURE_TOLERANCE:
            plan.future.append(manifest)
        else:
            current.append(manifest)
    current.sort(key=lambda m: parse_time(m.created_at), reverse=True)
    for manifest, reasons in zip(current, keep_reasons(current, now, retention), strict=True):
        if reasons:
            plan.keep.append(manifest)
            plan.reasons[manifest.name] = reasons
        else:
            plan.delete.append(manifest)
    return plan


@task(cache_policy=NO_CACHE)
def prune_local(
    backup_dir: Path,
    kind: str,
    source_id: str,
    retention: Retention,
    dry_run: bool = False,
    now: datetime | None = None,
) -> RetentionPlan:
    """Apply retention to one source's backups in the local directory: manifest first,
    so a half-pruned backup is never mistaken for a complete one. `dry_run`: only the
    plan (what would go, which rule keeps the rest); nothing is deleted. `now`: the time
    ages count from (default: now)."""
    plan = plan_retention(list_local(backup_dir, kind), now or utc_now(), retention, source_id)
    for manifest in [] if dry_run else plan.delete:
        data = resolve_name(Path(backup_dir), manifest.local_name)
        data.with_name(manifest_name(data.name)).unlink(missing_ok=True)
        data.unlink(missing_ok=True)
    return plan
