"""What a backup is a backup OF: a stable source identity per kind, never holding a
credential, and the short tag derived from it that goes into backup names.

Retention counts backups per source (several servers may share one backup_dir or
S3 prefix), and the tag keeps two sources' backups of the same second apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.common.redis_url import parse_redis_url
from tasks.common.secrets import check_url

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


def derived_source_id(kind: str, source: dict[str, Any]) -> str:
    """The identity of a backup whose manifest predates `source_id`, from the source
    facts it recorded (Redis/Prometheus `server`, the config `project_dir`, the logs
    `container` list); "" when they do not say, and such a backup is never pruned."""
    try:
        if kind == "redis" and source.get("server"):
            return redis_source_id(source["server"])
        if kind == "prometheus" and source.get("server"):
            return prometheus_source_id(source["server"])
        if kind == "config" and source.get("project_dir"):
            return str(source["project_dir"])  # recorded resolved already
        if kind == "logs" and source.get("container"):
            return logs_source_id(source["container"].split(","))
    except ValueError:
        return ""
    return ""
