"""What every recovery flow shares: timed steps, the backup used, RTO and RPO, the
report; finding and verifying the backup; undoing a failed restore.

A recovery flow creates one `Recovery`, runs each runbook step inside
`with recovery.step("…"):`, and ends with `recovery.publish()` in a `finally`, so
the report exists whether the flow succeeded or not. The flow returns
`recovery.result()`; when a step failed, the flow fails with `recovery.failure()`,
one line naming the step and the reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.support.failures import StepFailed
from tasks.common.aside import MovedAside, put_back
from tasks.common.checks import Check
from tasks.common.clock import age_text, parse_time
from tasks.common.errors import one_line
from tasks.docker.containers import start_container, stop_container
from tasks.store.archive import Manifest
from tasks.store.find import FoundBackup, fetch_backup
from tasks.store.kinds import source_of
from tasks.store.report import escape_markdown as _escape
from tasks.store.status import PROOF_KEY, proof_rows


@dataclass
class Step:
    """One runbook step as it went: `ok`, `failed`, `skipped` or `planned` (dry run)."""

    name: str
    outcome: str
    seconds: float
    detail: str = ""


@dataclass
class Recovery:
    """The record of one recovery run, from flow start to verified healthy."""

    flow: str
    dry_run: bool = False
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    steps: list[Step] = field(default_factory=list)
    backup: dict[str, Any] | None = None
    moved_aside: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attachments: list[tuple[str, list[str]]] = field(default_factory=list)
    healthy_seconds: float | None = None
    # A point-in-time restore: the time restored to and the last command kept.
    restore_point: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None
    # (kind, source, backup) of each restore this run proved against its manifest.
    proven: list[tuple[str, str, str]] = field(default_factory=list)
    # Decrypted copies of locally encrypted backups (FoundBackup.discard), removed at the end.
    temporary: list[FoundBackup] = field(default_factory=list)
    prefix: str = ""  # of every step's name, inside `scope`
    _start: float = field(default_factory=time.perf_counter)

    @contextmanager
    def scope(self, what: str) -> Iterator[None]:
        """Steps recorded inside are named `<what>: <step>` (one of several replicas)."""
        saved, self.prefix = self.prefix, f"{what}: "
        try:
            yield
        finally:
            self.prefix = saved

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time a step; record it ok, or failed with the reason (and re-raise)."""
        record = Step(self.prefix + name, "ok", 0.0)
        began = time.perf_counter()
        try:
            yield record
        except BaseException as error:
            record.outcome = "failed"
            record.detail = record.detail or one_line(error)
            if self.error is None:
                self.error = error
            raise
        finally:
            record.seconds = round(time.perf_counter() - began, 3)
            self.steps.append(record)

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """Around a flow's body: the report is published whatever happens, and any
        failure becomes StepFailed with the one-line `failure()` message."""
        try:
            yield
        except Exception as error:
            message = self.failure() if self.failed_step() else f"{self.flow}: {one_line(error)}"
            raise StepFailed(message) from error
        finally:
            self.discard_temporary()
            self.publish()

    def found(self, backup: FoundBackup) -> FoundBackup:
        """A backup this run restores from; a decrypted copy is removed at the end."""
        if backup.temporary:
            self.temporary.append(backup)
        return backup

    def discard_temporary(self) -> None:
        """Remove the decrypted copies this run made (no plain copy is left behind)."""
        while self.temporary:
            self.temporary.pop().discard()

    def prove(self, checks: list[Check], manifest: Manifest) -> None:
        """Run a data source's checks (its prove function) for the restore of `manifest`,
        each as a step; when all pass, that backup's kind and source count as proven
        (backup-status's "last verified restore")."""
        for check in checks:
            with self.step(check.name) as step:
                step.detail = check.run()
        self.proven.append((manifest.kind, source_of(manifest), manifest.name))

    def skip(self, name: str, why: str) -> None:
        outcome = "planned" if self.dry_run else "skipped"
        self.steps.append(Step(self.prefix + name, outcome, 0.0, why))

    def attach(self, title: str, lines: list[str]) -> None:
        """Add verbatim text (log lines) to the report, below the steps, shown as is."""
        self.attachments.append((title, list(lines)))

    def used_backup(self, manifest: Manifest, location: str) -> None:
        """Record the backup restored and its age at the start of the run (the RPO)."""
        age = (self.started_at - parse_time(manifest.created_at)).total_seconds()
        self.backup = {
            "name": manifest.name,
            "kind": manifest.kind,
            "from": location,
            "created_at": manifest.created_at,
            "sha256": manifest.sha256,
            "rpo_seconds": round(max(age, 0.0), 1),
        }

    def used_chain(self, generation: str, ts: int | None, location: str) -> None:
        """Record the AOF generation a point-in-time restore uses; its RPO is the age of
        the restore point at the start (what was written since is not restored)."""
        point = datetime.fromtimestamp(ts, UTC) if ts is not None else self.started_at
        self.backup = {
            "name": f"AOF generation {generation}",
            "kind": "redis-aof",
            "from": location,
            "created_at": point.isoformat(),
            "sha256": "",
            "rpo_seconds": round(max((self.started_at - point).total_seconds(), 0.0), 1),
        }

    def point(
        self, ts: int | None, last: dict[str, Any] | None, how: str, undone: str = "FLUSHALL"
    ) -> None:
        """Say the exact time restored to (or the flush `undone`) and the last command kept."""
        when = f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S} UTC" if ts is not None else "?"
        reason = {
            "time": f"{when}: every write up to the end of that second, none after",
            "flush": f"just before the {undone} of {when}",
            "newest": f"the newest state shipped ({when})",
        }[how]
        command = "none: the AOF base alone"
        if last:
            at = datetime.fromtimestamp(last["ts"], UTC) if last.get("ts") else None
            command = f"{last['name']} {last['key']}".strip() + (
                f" (written at {at:%H:%M:%S} UTC)" if at else ""
            )
        self.restore_point = {"restored to": reason, "last command kept": command}

    def healthy(self) -> None:
        """Mark the moment the recovered service was verified healthy (ends the RTO)."""
        self.healthy_seconds = round(time.perf_counter() - self._start, 3)

    def failed_step(self) -> Step | None:
        return next((s for s in self.steps if s.outcome == "failed"), None)

    def failure(self) -> str:
        """One line for the failed state: the step, the reason, and what was kept."""
        step = self.failed_step()
        where = f"step '{step.name}' failed: {step.detail}" if step else "failed"
        kept = f"; previous data kept at {', '.join(self.moved_aside)}" if self.moved_aside else ""
        return f"{self.flow}: {where}{kept}"

    def result(self) -> dict[str, Any]:
        """The facts the flow returns (and the report shows)."""
        return {
            "flow": self.flow,
            "dry_run": self.dry_run,
            "ok": self.failed_step() is None,
            "rto_seconds": self.healthy_seconds,
            "rpo_seconds": self.backup["rpo_seconds"] if self.backup else None,
            "backup": self.backup,
            "moved_aside": list(self.moved_aside),
            "steps": [vars(s).copy() for s in self.steps],
            "notes": list(self.notes),
            "restore_point": dict(self.restore_point),
        }

    def markdown(self) -> str:
        """The report: outcome, RTO/RPO, backup used, each step, where old data went."""
        failed = self.failed_step()
        title = "DRY RUN (nothing changed)" if self.dry_run else ("FAILED" if failed else "OK")
        lines = [f"# {self.flow}: {title}", ""]
        if failed:
            lines += [f"**{_escape(self.failure())}**", ""]
        rto = f"{self.healthy_seconds:.1f} s" if self.healthy_seconds is not None else "—"
        lines += ["| | |", "|---|---|", f"| started (UTC) | {self.started_at:%Y-%m-%d %H:%M:%S} |"]
        if not self.dry_run:
            lines.append(f"| RTO measured (start → verified healthy) | {rto} |")
        if self.backup:
            b = self.backup
            lines += [
                f"| backup | `{b['name']}` from {_escape(b['from'])} |",
                f"| backup created (UTC) | {b['created_at']} |",
                f"| RPO (age of the backup at start) | {age_text(b['rpo_seconds'])} |",
            ]
        for label, value in self.restore_point.items():
            lines.append(f"| {label} | {_escape(value)} |")
        for path in self.moved_aside:
            lines.append(f"| previous data moved aside to | `{path}` |")
        lines += ["", "| step | outcome | seconds | detail |", "|---|---|---|---|"]
        for s in self.steps:
            row = f"| {_escape(s.name)} | {s.outcome} | {s.seconds:.2f} | {_escape(s.detail)} |"
            lines.append(row)
        if self.notes:
            lines += [""] + [f"- {_escape(note)}" for note in self.notes]
        for title, text in self.attachments:
            lines += ["", f"## {_escape(title)}", "", *_verbatim(text)]
        return "\n".join(lines) + "\n"

    def publish(self) -> None:
        """Create the report artifact in the current flow run (key: the flow's name), and
        the `restore-proof` table of what it proved (none for a dry run)."""
        if self.proven and not self.dry_run:
            publish_proofs(self.proven, self.flow)
        create_markdown_artifact(
            markdown=self.markdown(),
            key=self.flow,
            description=f"{self.flow} report" + (" (dry run)" if self.dry_run else ""),
        )


def _verbatim(lines: list[str]) -> list[str]:
    """A fenced block showing `lines` as they are: the fence is longer than any run of
    backticks inside, so no line can close it early or be read as markdown."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", *lines, fence]


@dataclass(frozen=True)
class BackupSource:
    """Where a recovery or the drill looks for backups: `backup_dir`, else S3; and the
    age identity that decrypts encrypted ones."""

    backup_dir: Path
    s3_bucket: str
    s3_prefix: str
    s3_endpoint_url: str | None
    age_identity_file: Path | None

    @classmethod
    def of(cls, resolved: dict[str, Any]) -> BackupSource:
        """From a flow's resolved parameters (flows.support.settings.resolve)."""
        identity = resolved.get("age_identity_file")
        return cls(
            Path(resolved["backup_dir"]),
            resolved["s3_bucket"],
            resolved["s3_prefix"],
            resolved["s3_endpoint_url"] or None,
            Path(identity) if identity else None,
        )


def find_backup(
    r: Recovery, source: BackupSource, kind: str, name: str, source_id: str | None
) -> FoundBackup:
    """The step "find and verify the backup" (here, else S3; `latest` is the newest of
    `source_id`, the server restored), recorded as the one used."""
    with r.step("find and verify the backup") as step:
        found = fetch(r, source, kind, name, source_id)
        r.used_backup(found.manifest, found.location)
        step.detail = f"{found.manifest.name}: size and sha256 match the manifest"
    return found


def fetch(
    r: Recovery, source: BackupSource, kind: str, name: str, source_id: str | None
) -> FoundBackup:
    """A backup by name, or the newest of `source_id` here or in S3, verified; what the
    search passed over goes into the report's notes. A dry run keeps no download, and
    a decrypted or temporary copy is removed when the run ends."""
    found = fetch_backup(
        source.backup_dir,
        kind,
        name,
        source.s3_bucket,
        source.s3_prefix,
        source.s3_endpoint_url,
        source_id,
        source.age_identity_file,
        keep_downloads=not r.dry_run,
    )
    r.notes.extend(f"{kind}: {note}" for note in found.notes)
    return r.found(found)


def roll_back(
    r: Recovery,
    container: str,
    moved: MovedAside | None,
    failed_folder: Path,
    names: list[str] | None,
    was_running: bool,
    keep: tuple[Path, ...] = (),
) -> None:
    """Record a "roll back" step: what the failed restore left (`names` of the data dir,
    every entry but `keep` when None) kept in `failed_folder`, the old data put back,
    the container started again if it ran. Never raises (the original failure is what
    the run reports); a roll back that could not finish is said in the report's
    notes."""
    try:
        with r.step("roll back") as step:
            stop_container(container)
            done = []
            if moved is not None:
                failed = put_back(moved, failed_folder, names, keep)
                r.moved_aside.clear()
                done.append(f"previous data put back in {moved.data_dir}")
                if failed:
                    r.notes.append(f"what the failed restore left is kept in {failed}")
            if was_running:
                start_container(container)
                done.append(f"container {container} started again")
            step.detail = "; ".join(done) or "nothing to undo"
    except Exception as error:  # noqa: BLE001 - recorded in the step; the cause is reported
        r.notes.append(f"roll back incomplete: {one_line(error)}; check {container} by hand")


def publish_proofs(proven: list[tuple[str, str, str]], flow: str) -> None:
    """The `restore-proof` table artifact of the current run: the restores it proved,
    each by kind, source and backup (what backup-status counts, per source)."""
    create_table_artifact(
        table=proof_rows(proven, flow),
        key=PROOF_KEY,
        description=f"restores {flow} proved against their manifests",
    )
