"""Configuration: the project's config files and allow-listed environment, without secrets.

What is collected (runbook "Configuration Backup"): compose files, prometheus.yml,
alerts.yml and the other rule files prometheus.yml lists, grafana/dashboards/ and
redis.conf (or redis/redis.conf) from the project directory, and the allow-listed
environment variables (from the gateway container's config or this process) as
env.txt. Secrets never leave this module:

- an environment variable whose name or value looks like a secret is withheld
  (its name is reported, never its value), even when allow-listed;
- the stored copy of each file has its secrets replaced (tasks/config/redact.py: secret
  keys whatever the value's type, command-line passwords, comments, Grafana's
  secureJsonData, redis.conf passwords, URL credentials), named in the report,
  never their values.
Symlinks are followed only inside the project directory (the target's content is
stored under the link's name, as `cp` does); one pointing outside is skipped and
reported. Config files are small: each is read once into memory, so the content
digest and the archive see the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.log import run_logger
from tasks.common.secrets import secret_name, secret_value
from tasks.config.redact import COMPOSE_PATTERNS, PLACEHOLDER, redact_file
from tasks.config.slots import find_slots
from tasks.docker import containers
from tasks.docker.project import EnvFileError, parse_env_text
from tasks.store.archive import (
    ArchiveError,
    CompressedFile,
    Compression,
    Manifest,
    tar_stream,
    verify_file,
)
from tasks.store.encryption import AgeCopy, staged_writer
from tasks.store.local import BackupNotFound, explain_write_error, find_local
from tasks.store.report import publish_table

EXPECTED = ("prometheus.yml", "alerts.yml", "grafana/dashboards")
# Kept when present, not missed when absent: Redis's config file (its secrets redacted).
OPTIONAL = ("redis.conf", "redis/redis.conf")
ENV_FILE = "env.txt"


# ------------------------------------------------------------------- project files


@dataclass(frozen=True)
class ConfigFile:
    """One file as it goes into the archive (already redacted)."""

    path: str
    data: bytes
    mode: int
    mtime: float


@dataclass
class ProjectFiles:
    """What the project directory gave, and what it did not."""

    project_dir: str
    files: list[ConfigFile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    redacted: dict[str, list[str]] = field(default_factory=dict)
    env_files: list[str] = field(default_factory=list)  # stored with every value withheld


def check_project_dir(project_dir: Path) -> Path:
    """The project directory, resolved, or an error naming it and the setting."""
    path = Path(project_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"config project_dir {path} {what}: set PROXILION_DR_CONFIG_PROJECT_DIR (or the "
            "project_dir parameter) to the folder holding docker-compose.yml"
        )
    return path.resolve()


def rule_files(root: Path) -> list[str]:
    """The rule files prometheus.yml lists (`rule_files:` globs, relative to it) that
    are inside the project: a restored prometheus.yml must find its rules."""
    try:
        config = yaml.safe_load((root / "prometheus.yml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    found: list[str] = []
    for pattern in config.get("rule_files") or [] if isinstance(config, dict) else []:
        if isinstance(pattern, str) and not Path(pattern).is_absolute():
            found += sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))
    return [name for name in dict.fromkeys(found) if name not in EXPECTED]


def env_files_named(root: Path) -> list[str]:
    """The `env_file:` files the project's compose files name, inside the project (a
    restored project needs them; their values are secrets: stored withheld)."""
    found: list[str] = []
    for name in sorted(n for n in os.listdir(root) if any(fnmatch(n, p) for p in COMPOSE_PATTERNS)):
        try:
            document = yaml.safe_load((root / name).read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            continue
        services = document.get("services") if isinstance(document, dict) else None
        for spec in (services or {}).values():
            entries = (spec or {}).get("env_file") if isinstance(spec, dict) else None
            listed = [entries] if isinstance(entries, str | dict) else list(entries or [])
            for entry in listed:
                path = entry.get("path") if isinstance(entry, dict) else entry
                relative = os.path.normpath(str(path or ""))
                inside = (root / relative).resolve().is_relative_to(root)
                if path and inside and relative != ".env" and relative not in found:
                    found.append(relative)
    return found


def withheld_env_text(text: str) -> tuple[str, list[str]]:
    """An env file with every value replaced by the placeholder (names, comments and
    blank lines kept): the names a restore must be given."""
    out, names = [], []
    for line in text.splitlines(keepends=True):
        body = line.strip()
        name = body.removeprefix("export ").split("=", 1)[0].strip()
        if body and not body.startswith("#") and "=" in body and name:
            out.append(f"{name}={PLACEHOLDER}\n")
            names.append(name)
        else:
            out.append(line)
    return "".join(out), names


def _candidates(root: Path) -> Iterator[str]:
    names = sorted(entry.name for entry in root.iterdir())
    for pattern in COMPOSE_PATTERNS:
        yield from (name for name in names if fnmatch(name, pattern))
    yield from EXPECTED
    yield from rule_files(root)
    yield from OPTIONAL


def _collect(root: Path, relative: str, found: ProjectFiles, seen: set[Path]) -> None:
    """Add one path (file or folder, recursively) if it stays inside the project."""
    path = root / relative
    if path.is_symlink() and not path.exists():
        found.skipped[relative] = f"dangling symlink to {os.readlink(path)}"
        return
    real = path.resolve()
    if not real.is_relative_to(root):
        link = f"symlink to {os.readlink(path)}" if path.is_symlink() else "behind a symlink"
        found.skipped[relative] = f"{link}, outside the project directory: not followed"
        return
    if real.is_dir():
        if real in seen:
            found.skipped[relative] = "symlink loop: folder already stored"
            return
        seen.add(real)
        for child in sorted(os.listdir(real)):
            _collect(root, f"{relative}/{child}", found, seen)
    elif real.is_file() and relative in found.env_files:
        status = real.stat()
        text, names = withheld_env_text(real.read_text(errors="replace"))
        found.redacted[relative] = names + ["(every value withheld: an env_file)"]
        found.files.append(
            ConfigFile(relative, text.encode(), status.st_mode & 0o777, status.st_mtime)
        )
    elif real.is_file():
        status = real.stat()
        data, redacted, how = redact_file(relative, real.read_bytes())
        if redacted:
            found.redacted[relative] = redacted + ([f"({how})"] if how != "in place" else [])
        found.files.append(ConfigFile(relative, data, status.st_mode & 0o777, status.st_mtime))
    else:
        found.skipped[relative] = "not a regular file"


@task(cache_policy=NO_CACHE)
def read_project_files(project_dir: Path) -> ProjectFiles:
    """Compose files, prometheus.yml, alerts.yml, the other rule files prometheus.yml
    lists, grafana/dashboards/ and redis.conf of the project, redacted. Missing ones
    are reported; a project with none of them is an error."""
    root = check_project_dir(project_dir)
    found = ProjectFiles(project_dir=str(root), env_files=env_files_named(root))
    seen: set[Path] = set()
    names = list(_candidates(root)) + found.env_files
    for relative in names:
        if os.path.lexists(root / relative):
            _collect(root, relative, found, seen)
        elif relative in EXPECTED:
            found.missing.append(relative)
    if not any(fnmatch(n, p) for n in names for p in COMPOSE_PATTERNS):
        found.missing.insert(0, "docker-compose.yml (or compose.yaml)")
    if not found.files:
        raise FileNotFoundError(
            f"config project_dir {root} holds none of the config files (docker-compose.yml, "
            f"prometheus.yml, alerts.yml, grafana/dashboards/): point project_dir (or "
            "PROXILION_DR_CONFIG_PROJECT_DIR) at the gateway's deployment folder"
        )
    return found


# ---------------------------------------------------------------------- environment


@dataclass
class EnvCapture:
    """Allow-listed variables as stored, and the names withheld or not set."""

    source: str
    values: dict[str, str] = field(default_factory=dict)
    withheld: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def text(self) -> str:
        """env.txt: `NAME=value` lines, sorted (newlines in values written as \\n)."""
        return "".join(
            f"{name}={value}".replace("\n", "\\n") + "\n"
            for name, value in sorted(self.values.items())
        )


def allowlist_names(allowlist: str | list[str]) -> list[str]:
    items = allowlist.split(",") if isinstance(allowlist, str) else allowlist
    return list(dict.fromkeys(name.strip() for name in items if name.strip()))


# What compose itself reads from the project's `.env` to find and name the project: a
# restore needs them to bring it up as it ran (they hold no secret).
COMPOSE_SETTINGS = ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PATH_SEPARATOR")


def compose_settings(project_dir: Path | None) -> dict[str, str]:
    """COMPOSE_FILE, COMPOSE_PROJECT_NAME and COMPOSE_PATH_SEPARATOR from the project's
    `.env` (only those: the rest of it holds secrets)."""
    dotenv = Path(project_dir) / ".env" if project_dir else None
    if dotenv is None or not dotenv.is_file():
        return {}
    try:
        values = parse_env_text(dotenv.read_text(errors="replace"), str(dotenv))
    except EnvFileError:
        return {}
    return {name: values[name] for name in COMPOSE_SETTINGS if values.get(name)}


@task(cache_policy=NO_CACHE)
def read_env(
    allowlist: list[str], container: str | None, project_dir: Path | None = None
) -> EnvCapture:
    """The allow-listed variables from the container's config (`Config.Env`), or from
    this process when no container is named; secrets are withheld by name. Plus the
    compose settings of the project's `.env` (`compose_settings`)."""
    if container:
        hint = "Fix env_container, or leave it empty to read this process's environment"
        pairs = containers.get_container(container, hint).attrs["Config"].get("Env") or []
        environment = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        capture = EnvCapture(source=f"container {container}")
    else:
        environment = dict(os.environ)
        capture = EnvCapture(source="process environment")
    for name in allowlist:
        if name not in environment:
            capture.missing.append(name)
        elif secret_name(name) or secret_value(environment[name]):
            capture.withheld.append(name)
        else:
            capture.values[name] = environment[name]
    capture.values.update(compose_settings(project_dir))
    return capture


# -------------------------------------------------------------------- the archive


def config_digest(files: ProjectFiles, env: EnvCapture) -> str:
    """SHA-256 over the sorted relative paths and stored bytes, env.txt included:
    equal digests mean an identical backup (modes and mtimes aside)."""
    digest = hashlib.sha256()
    entries = [(f.path, f.data) for f in files.files] + [(ENV_FILE, env.text().encode())]
    for path, data in sorted(entries):
        digest.update(b"%s\0%d\0" % (path.encode(), len(data)))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class NewestBackup:
    """What the newest complete config backup says about this run's content."""

    unchanged_since: str | None = None  # intact, and holds exactly this content
    damaged: str | None = None  # it fails its checksum: why (no secret in it)


@task(cache_policy=NO_CACHE)
def check_newest(backup_dir: Path, digest: str, source_id: str) -> NewestBackup:
    """Whether the newest complete config backup already holds this content. Its
    stored bytes are verified against its manifest first: the digest of a damaged
    backup is not trusted, so a damaged newest never makes a run "unchanged"."""
    try:
        manifest, path = find_local(Path(backup_dir), "config", "latest", source_id)
    except BackupNotFound:
        return NewestBackup()
    try:
        verify_file(path, *manifest.local_facts)
    except ArchiveError as error:
        damaged = f"{manifest.name}: {error}"
        run_logger().warning("Newest config backup is damaged, storing a new one: %s", damaged)
        return NewestBackup(damaged=damaged)
    same = manifest.source.get("digest") == digest
    return NewestBackup(unchanged_since=manifest.name if same else None)


def archive_folder(name: str) -> str:
    """The folder inside the archive: `config_YYYYmmdd_HHMMSS_<tag>` for that backup name."""
    return Path(name).name.split(".", 1)[0]


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(mtime)
    archive.addfile(info, io.BytesIO(data))


@task(cache_policy=NO_CACHE)
def write_config_archive(
    files: ProjectFiles,
    env: EnvCapture,
    name: str,
    staging: Path,
    compression: Compression,
    encrypt: AgeCopy | None = None,
) -> CompressedFile:
    """Tar the files and env.txt under `config_<stamp>/` (relative names only) straight
    into the compressor (age-encrypted in the same pass as `encrypt` says); the partial
    file is removed on any failure."""
    folder = archive_folder(name)
    writer = staged_writer(staging, compression, encrypt)
    try:
        with tar_stream(writer) as archive:
            for item in files.files:
                _add(archive, f"{folder}/{item.path}", item.data, item.mode, item.mtime)
            _add(archive, f"{folder}/{ENV_FILE}", env.text().encode(), 0o600, time.time())
        return writer.close()
    except OSError as error:
        writer.abort()
        raise explain_write_error(error, staging) from None
    except BaseException:
        writer.abort()
        raise


def file_secrets(files: ProjectFiles) -> dict[str, list[str]]:
    """Per stored file, the names under which a restore needs the secrets withheld in
    it (tasks/config/slots.py)."""
    named = {}
    for item in files.files:
        text = item.data.decode(errors="replace")
        slots = find_slots(item.path, text, item.path in files.env_files)
        if slots:
            named[item.path] = [slot.name for slot in slots]
    return named


def config_source(files: ProjectFiles, env: EnvCapture, digest: str) -> dict[str, Any]:
    """What the manifest records about a config backup: names and reasons, no values."""
    return {
        "digest": digest,
        "project_dir": files.project_dir,
        "files": [item.path for item in files.files] + [ENV_FILE],
        "missing": files.missing,
        "skipped": files.skipped,
        "redacted": files.redacted,
        "env_files": files.env_files,
        "file_secrets": {
            item.path: [
                slot.name
                for slot in find_slots(
                    item.path, item.data.decode(errors="replace"), item.path in files.env_files
                )
            ]
            for item in files.files
            if find_slots(
                item.path, item.data.decode(errors="replace"), item.path in files.env_files
            )
        },
        "env_source": env.source,
        "env": sorted(env.values),
        "env_withheld": env.withheld,
        "env_missing": env.missing,
    }


def config_manifest(
    name: str, archive: CompressedFile, source: dict[str, Any], duration: float, source_id: str
) -> Manifest:
    return Manifest.describe("config", name, archive, duration, source=source, source_id=source_id)


def config_details(source: dict[str, Any]) -> dict[str, str]:
    """The report rows of a config backup (names only, never a value)."""

    def listed(items: Any) -> str:
        if isinstance(items, dict):
            items = [
                f"{key} ({value if isinstance(value, str) else ', '.join(value)})"
                for key, value in items.items()
            ]
        return "; ".join(items) or "none"

    return {
        "project dir": source["project_dir"],
        "files": f"{len(source['files'])}: {listed(source['files'])}",
        "missing (optional)": listed(source["missing"]),
        "skipped": listed(source["skipped"]),
        "secrets redacted in files": listed(source["redacted"]),
        "environment": f"{source['env_source']}: {listed(source['env'])}",
        "env withheld (secret)": listed(source["env_withheld"]),
        "env not set": listed(source["env_missing"]),
        "content digest": source["digest"],
    }


def publish_unchanged_report(
    previous: str, source: dict[str, Any], details: dict[str, Any] | None = None
) -> None:
    """The report of a run that stored nothing because nothing changed (in the flow
    run), with the run's `details` (its warnings)."""
    rows = [{"field": "result", "value": f"unchanged since {previous}: no new backup"}]
    facts = config_details(source) | (details or {})
    rows += [{"field": k, "value": v} for k, v in facts.items()]
    publish_table(rows, "backup-config", f"config unchanged since {previous}")
