"""Putting a log backup back: decompressed into a plain file an operator can read
(`zgrep` reads the stored file directly; this is for tools that cannot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.common.files import create_file, make_dirs
from tasks.store.archive import iter_chunks, open_decompressed
from tasks.store.find import FoundBackup


@dataclass(frozen=True)
class RestoredLog:
    """A log backup decompressed into `path`: its lines and bytes as written."""

    path: Path
    lines: int
    size: int


def restore_log(found: FoundBackup, folder: Path) -> RestoredLog:
    """Decompress the verified backup into `folder/<its name without .gz/.zst>`."""
    make_dirs(folder)
    path = folder / Path(found.manifest.name).name.rsplit(".", 1)[0]
    lines = size = 0
    with (
        open_decompressed(found.path, found.manifest.compression) as stream,
        create_file(path) as out,
    ):
        for chunk in iter_chunks(stream):
            out.write(chunk)
            lines += chunk.count(b"\n")
            size += len(chunk)
    return RestoredLog(path, lines, size)
