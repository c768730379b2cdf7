"""Putting a config backup back: the compose project unpacked safely into a new or
empty folder with its `.env` written from the backup's env.txt and the operator's
secrets (which the backup never holds); the one restore path recover-host and the
drill share. Everything it needs is checked before anything is written."""

from __future__ import annotations

import os
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from tasks.config.capture import COMPOSE_PATTERNS, ENV_FILE, archive_folder
from tasks.config.slots import Slot, fill_slots, find_slots, missing_slots
from tasks.docker.project import (
    env_file_text,
    read_env_file,
    required_variables,
)
from tasks.store.archive import extract_archive, open_decompressed
from tasks.store.find import FoundBackup
from tasks.store.local import BackupNotFound


class MissingSecrets(RuntimeError):
    """Variables the compose file needs are neither in the backup nor supplied."""


class TargetNotEmpty(FileExistsError):
    """The folder to restore into holds something already."""


@dataclass
class Archive:
    """What the flow reads from the config backup before anything is written: the
    compose files, env.txt, and the secrets withheld inside its files (slots)."""

    compose_files: dict[str, str]
    env: dict[str, str]
    slots: list[Slot] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)


def read_archive(found: FoundBackup, need_compose: bool = True) -> Archive:
    """The compose files, env.txt and withheld secrets of a config backup, read in
    memory (small files) from the verified archive; a backup without a compose file is
    refused when `need_compose`."""
    folder = PurePosixPath(archive_folder(found.manifest.name))
    env_files = list(found.manifest.source.get("env_files") or [])
    compose: dict[str, str] = {}
    slots: list[Slot] = []
    env_text = ""
    with (
        open_decompressed(found.path, found.manifest.compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        for member in archive:
            path = PurePosixPath(member.name)
            if not member.isfile() or not path.is_relative_to(folder):
                continue
            source = archive.extractfile(member)
            assert source is not None
            text = source.read().decode(errors="replace")
            relative = str(path.relative_to(folder))
            if path.parent == folder and any(fnmatch(path.name, p) for p in COMPOSE_PATTERNS):
                compose[path.name] = text
            elif relative == ENV_FILE:
                env_text = text
            else:
                slots += find_slots(relative, text, relative in env_files)
    if need_compose and not compose:
        raise BackupNotFound(f"config backup {found.manifest.name} holds no compose file")
    env = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    return Archive(compose, env, slots, env_files)


@dataclass(frozen=True)
class Secrets:
    """What a restore writes that the backup does not hold: `.env`'s values (env.txt
    plus the secrets the compose files need) and each withheld file secret's value."""

    env: dict[str, str]
    in_files: dict[str, str]

    def names(self) -> list[str]:
        return sorted({*self.env, *self.in_files})


def check_secrets(archive: Archive, withheld: list[str], secrets_file: str | None) -> Secrets:
    """env.txt plus the operator's secrets file must give every variable the compose
    files need and every secret withheld inside a file (by its slot's name). Raises
    MissingSecrets naming each one missing, where it is used, and where to put it."""
    supplied = read_env_file(Path(secrets_file)) if secrets_file else {}
    needed = set(withheld)
    for text in archive.compose_files.values():
        needed |= required_variables(text)
    known = {**archive.env, **supplied}
    missing = sorted(needed - set(known))
    missing += [
        f"{slot.name} ({slot.file}: {slot.key})" for slot in missing_slots(archive.slots, known)
    ]
    if missing:
        where = f"add them to {secrets_file}" if secrets_file else (
            "write them as NAME=value lines into a file only you can read and give its path "
            "as secrets_env_file"
        )  # fmt: skip
        raise MissingSecrets(
            f"the config backup withholds (or lacks) {', '.join(missing)}: {where}, then run "
            "again (nothing was changed)"
        )
    env = {name: value for name, value in known.items() if name in archive.env or name in needed}
    return Secrets(env, {slot.name: known[slot.name] for slot in archive.slots})


def require_empty(target: Path) -> None:
    """Refuse a target_dir that holds anything: a restore never mixes with old files."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TargetNotEmpty(
            f"target_dir {target} is not an empty folder: restore into a new or empty one "
            "(nothing was changed)"
        )


def restore_project(found: FoundBackup, target: Path, secrets_: Secrets) -> list[str]:
    """Unpack the config backup into `target`, new or empty (safe extract into a
    staging folder beside it, then renamed in), with every withheld secret written
    back into its file (never the literal placeholder), `.env` (0600) from
    `secrets_.env`, env.txt dropped."""
    require_empty(target)
    staging = target.parent / f".{target.name}.restoring-{secrets.token_hex(3)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    env_files = set(found.manifest.source.get("env_files") or [])
    try:
        extract_archive(found.path, found.manifest.compression, staging)
        folder = staging / archive_folder(found.manifest.name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            relative = str(path.relative_to(folder))
            text = path.read_text(errors="surrogateescape")
            if find_slots(relative, text, relative in env_files):
                filled = fill_slots(relative, text, secrets_.in_files, relative in env_files)
                path.write_text(filled, errors="surrogateescape")
        target.mkdir(exist_ok=True)
        names = sorted(entry.name for entry in folder.iterdir())
        for name in names:
            os.replace(folder / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (target / ENV_FILE).unlink(missing_ok=True)
    descriptor = os.open(target / ".env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as env:
        env.write(env_file_text(secrets_.env))
    return [name for name in names if name != ENV_FILE] + [".env"]


@contextmanager
def previewed(found: FoundBackup, secrets_: Secrets) -> Iterator[Path]:
    """The config backup unpacked with its `.env` into a temporary folder, removed
    afterwards: compose resolves the project there as the restore will write it,
    before anything is written where it belongs (the dry run's view too)."""
    folder = Path(tempfile.mkdtemp(prefix="proxilion-dr-preview-"))
    try:
        restore_project(found, folder / "project", secrets_)
        yield folder / "project"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
