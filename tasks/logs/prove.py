"""Proving a restored log backup: its lines and bytes are what the manifest recorded."""

from __future__ import annotations

from tasks.common.checks import Check
from tasks.logs.restore import RestoredLog
from tasks.store.archive import Manifest


class LogsNotRestored(RuntimeError):
    """The restored log differs from what its manifest recorded."""


def lines_and_bytes(restored: RestoredLog, manifest: Manifest) -> str:
    want = manifest.source.get("lines")
    if want is not None and restored.lines != want:
        raise LogsNotRestored(f"{restored.lines} lines decompressed, the manifest says {want}")
    if restored.size != manifest.raw_size:
        raise LogsNotRestored(
            f"{restored.size} bytes decompressed, the manifest says {manifest.raw_size}"
        )
    return f"{restored.lines} lines, {restored.size} bytes: as the manifest says"


def prove_logs(restored: RestoredLog, manifest: Manifest) -> list[Check]:
    """The checks that prove the restored log is the backup `manifest` describes."""
    return [Check("decompress fully and count lines", lambda: lines_and_bytes(restored, manifest))]
