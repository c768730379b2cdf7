"""The kinds of backup, one registry entry each: how its files are named, and what a
backup is a backup OF (its source: a stable identity per kind, never holding a
credential, and the short tag of it that goes into backup names).

Retention counts backups per source (several servers may share one backup_dir or
S3 prefix), and the tag keeps two sources' backups of the same second apart. Every
part of the project that treats kinds alike (listing, retention, backup-status,
the drill) iterates over `KINDS`; what a kind's backup holds and how it is
captured, restored and proven lives in its own package (tasks/<kind>/).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.common.redis_url import parse_redis_url
from tasks.common.secrets import check_url
from tasks.store.archive import SUFFIXES, Manifest

TAG_LENGTH = 8


def _unparsable(what: str) -> ValueError:
    # Never echo the URL: a password with an unencoded '#', '/' or '?' is what breaks it.
    return ValueError(
        f"the {what} URL cannot be parsed (percent-encode '#', '/', '?' and '@' in its "
        "user name or password)"
    )


def redis_source_id(url: str) -> str:
    """`host:port` of a Redis (or `unix:<socket path>`), read the way redis-py reads the
    URL. The database number is left out: an RDB holds every database of the server."""
    target = parse_redis_url(url)
    if target.socket_path:
        return f"unix:{target.socket_path}"
    return f"{(target.host or 'localhost').lower()}:{target.port or 6379}"


def prometheus_source_id(url: str) -> str:
    """The Prometheus URL without credentials, query or trailing slash."""
    try:
        parts = urlsplit(check_url(url, "prometheus_url"))
        port = parts.port
    except ValueError:
        raise _unparsable("Prometheus") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise _unparsable("Prometheus")
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{port}" if port else ""
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def config_source_id(project_dir: str | Path) -> str:
    """The absolute project folder the configuration is read from."""
    return str(Path(project_dir).resolve())


def logs_source_id(containers: Iterable[str]) -> str:
    """The set of containers whose logs are kept (order does not change what is kept)."""
    return ",".join(sorted(set(containers)))


def source_tag(source_id: str) -> str:
    """A short, stable tag of a source identity for backup names (hex digest)."""
    return hashlib.sha256(source_id.encode()).hexdigest()[:TAG_LENGTH]


@dataclass(frozen=True)
class Kind:
    """One kind of backup. Its files are named
    `<folder>/<stem>_<UTC stamp>_<source tag><ext><.gz|.zst>`; a manifest written
    before manifests recorded their source names it in `source[legacy_fact]`, which
    `legacy_source` turns into the source identity."""

    name: str
    folder: str
    stem: str
    ext: str
    legacy_fact: str
    legacy_source: Callable[[str], str]
    # Pieces that restore only together, in generations (tasks/store/pieces.py), not
    # backups that each restore alone: listed, kept and restored their own way.
    chained: bool = False

    def staging_pattern(self) -> re.Pattern[str]:
        """Our hidden staging files in this kind's folder (see `staging_path`; a chained
        kind also stages raw bytes before it checks and compresses them)."""
        suffixes = "|".join(re.escape(s) for s in [*SUFFIXES.values(), ".raw"])
        return re.compile(
            rf"\.{re.escape(self.stem)}_\d{{8}}_\d{{6}}(_[0-9a-f]+)?{re.escape(self.ext)}"
            rf"(?:{suffixes})(?:\.age)?\.[0-9a-f]{{8}}\.partial"
        )

    def source_from_facts(self, source: dict[str, Any]) -> str:
        """The source of a manifest that predates `source_id`, from the fact it recorded;
        "" when it does not say (such a backup is never pruned)."""
        fact = source.get(self.legacy_fact)
        try:
            return self.legacy_source(str(fact)) if fact else ""
        except ValueError:
            return ""


KINDS: dict[str, Kind] = {
    "redis": Kind("redis", "redis", "dump", ".rdb", "server", redis_source_id),
    "prometheus": Kind(
        "prometheus", "prometheus", "prometheus", ".tar", "server", prometheus_source_id
    ),
    "config": Kind("config", "config", "config", ".tar", "project_dir", str),  # resolved
    "logs": Kind(
        "logs", "logs", "gateway", ".log", "container", lambda v: logs_source_id(v.split(","))
    ),
    # The Redis AOF, shipped continuously for point-in-time recovery (tasks/redis/ship.py).
    "redis-aof": Kind("redis-aof", "redis-aof", "aof", ".piece", "server", redis_source_id, True),
}


def source_of(manifest: Manifest) -> str:
    """The source identity of a backup: recorded, or for manifests written before it
    was recorded, derived from their source facts ("" when they do not say)."""
    return manifest.source_id or KINDS[manifest.kind].source_from_facts(manifest.source)
