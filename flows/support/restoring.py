"""The steps every restore flow shares: find and verify the backup; undo a failed
restore (stop what the restore started, put the old data back, keep what the failed
restore left aside, start the container again if it ran before the recovery)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.support.recovery import Recovery, one_line
from tasks.common.aside import MovedAside, put_back
from tasks.docker.containers import start_container, stop_container
from tasks.store.find import FoundBackup, fetch_backup


def find_backup(r: Recovery, p: dict[str, Any], kind: str, source_id: str) -> FoundBackup:
    """The step "find and verify the backup" (here, else S3; `latest` is the newest of
    `source_id`, the server restored), recorded as the one used."""
    with r.step("find and verify the backup") as step:
        found = r.found(
            fetch_backup(
                Path(p["backup_dir"]),
                kind,
                p["backup"],
                p["s3_bucket"],
                p["s3_prefix"],
                p["s3_endpoint_url"] or None,
                source_id,
                Path(p["age_identity_file"]) if p.get("age_identity_file") else None,
            )
        )
        r.used_backup(found.manifest, found.location)
        step.detail = f"{found.manifest.name}: size and sha256 match the manifest"
    return found


def roll_back(
    r: Recovery,
    container: str,
    moved: MovedAside | None,
    failed_folder: Path,
    names: list[str] | None,
    was_running: bool,
) -> None:
    """Record a "roll back" step; never raises (the original failure is what the run
    reports), a roll back that could not finish is said in the report's notes."""
    try:
        with r.step("roll back") as step:
            stop_container(container)
            done = []
            if moved is not None:
                failed = put_back(moved, failed_folder, names)
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
