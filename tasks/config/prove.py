"""Proving a restored config backup: every file its manifest lists is there, the
secrets it withheld are named, and each compose file is a valid project with the
restored environment (`prove_config`: the checks recover-host and the drill run)."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from tasks.common.checks import Check
from tasks.config.capture import ENV_FILE
from tasks.config.redact import COMPOSE_PATTERNS
from tasks.docker.compose import project_files, validate_compose
from tasks.store.archive import Manifest


class ConfigNotRestored(RuntimeError):
    """The restored project lacks what its backup's manifest lists."""


def is_compose_file(name: str) -> bool:
    """A compose file at the project's top (`docker-compose.yml`, `compose.yaml`, …)."""
    return "/" not in name and any(fnmatch(name, pattern) for pattern in COMPOSE_PATTERNS)


def files_present(folder: Path, source: dict[str, Any]) -> str:
    """Every file the manifest lists is in the restored folder (env.txt as `.env`)."""
    expected = [ENV_FILE if name == ENV_FILE else name for name in source.get("files") or []]
    absent = [
        name for name in expected if not (folder / (".env" if name == ENV_FILE else name)).is_file()
    ]
    if absent:
        raise ConfigNotRestored(f"the archive lacks {', '.join(absent)} (its manifest lists them)")
    return f"all {len(expected)} files: {', '.join(expected)}"


def nothing_missing_at_backup(source: dict[str, Any]) -> str:
    """The project held every file a stack needs when it was backed up."""
    if source.get("missing"):
        raise ConfigNotRestored(
            f"the backup lacks {', '.join(source['missing'])}: missing from the project "
            "folder when it was taken"
        )
    return "compose file, prometheus.yml, alerts.yml and grafana/dashboards/ all backed up"


def withheld_listed(source: dict[str, Any]) -> str:
    """What the backup withheld, by name: the operator supplies those values."""
    redacted = source.get("redacted") or {}
    in_files = "; ".join(f"{f}: {', '.join(names)}" for f, names in redacted.items())
    return (
        f"environment withheld: {', '.join(source.get('env_withheld') or []) or 'none'}; "
        f"replaced in files: {in_files or 'none'}"
    )


def compose_files_validate(folder: Path, source: dict[str, Any], env: dict[str, str]) -> str:
    """The project as compose reads it (primary file and override, together) validates
    with the restored environment (withheld secrets and absent env files get dummy
    values, for validation only); other compose files are named, not read."""
    files = project_files(folder)
    if not files:
        return "not checked: the backup holds no compose.yaml or docker-compose.yml"
    check = validate_compose([folder / name for name in files], env)
    others = [n for n in source.get("files") or [] if is_compose_file(n) and n not in files]
    detail = f"{' + '.join(files)}: services {', '.join(check.services)}; "
    detail += f"dummies for {', '.join(check.dummies) or 'none'}"
    return detail + (f"; not read by compose by default: {', '.join(others)}" if others else "")


def prove_config(
    folder: Path, manifest: Manifest, env: dict[str, str], complete: bool = True
) -> list[Check]:
    """The checks that prove the project restored into `folder` (its `.env` holding
    `env`) is the backup `manifest` describes; with `complete` (the drill), also that
    the backup held every file a stack needs."""
    source = manifest.source
    complete_check = [
        Check("project complete when backed up", lambda: nothing_missing_at_backup(source))
    ]
    return [
        Check("expected files present", lambda: files_present(folder, source)),
        *(complete_check if complete else []),
        Check("withheld secrets listed", lambda: withheld_listed(source)),
        Check("compose file validates", lambda: compose_files_validate(folder, source, env)),
    ]
