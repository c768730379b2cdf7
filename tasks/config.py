"""Configuration: the project's config files and allow-listed environment, without secrets.

What is collected (runbook "Configuration Backup"): compose files, prometheus.yml,
alerts.yml and the other rule files prometheus.yml lists, grafana/dashboards/ and
redis.conf (or redis/redis.conf) from the project directory, and the allow-listed
environment variables (from the gateway container's config or this process) as
env.txt. Secrets never leave this module:

- an environment variable whose name or value looks like a secret is withheld
  (its name is reported, never its value), even when allow-listed;
- in YAML files (compose, Prometheus) the values of secret-looking keys
  (`GATEWAY_API_TOKEN: ...`, `- DB_PASSWORD=...`, `password:` under basic_auth) are
  replaced in the stored copy, keeping every other byte, comment and the layout;
  in compose files the replacement is `${NAME:?...}`, so a restored stack refuses
  to start until the secret is supplied again (from the environment or a .env
  file) instead of running with a wrong value;
- in redis.conf the arguments of `requirepass`, `masterauth`… and the passwords of
  `user` ACL lines are replaced;
- credentials inside URLs (`scheme://user:pass@host`) become `scheme://***@host`
  in every file.
Symlinks are followed only inside the project directory (the target's content is
stored under the link's name, as `cp` does); one pointing outside is skipped and
reported. Config files are small: each is read once into memory, so the content
digest and the archive see the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks import containers
from tasks.archive import (
    ArchiveError,
    CompressedFile,
    CompressedWriter,
    Compression,
    Manifest,
    tar_stream,
    verify_file,
)
from tasks.log import run_logger
from tasks.secrets import SECRET_VALUE, redact_urls, secret_name, secret_value, words
from tasks.storage import BackupNotFound, explain_write_error, find_local

COMPOSE_PATTERNS = (
    "docker-compose.yml",
    "docker-compose.yaml",
    "docker-compose.*.yml",
    "docker-compose.*.yaml",
    "compose.yml",
    "compose.yaml",
    "compose.*.yml",
    "compose.*.yaml",
)
EXPECTED = ("prometheus.yml", "alerts.yml", "grafana/dashboards")
# Kept when present, not missed when absent: Redis's config file (its secrets redacted).
OPTIONAL = ("redis.conf", "redis/redis.conf")
ENV_FILE = "env.txt"
PLACEHOLDER = "<redacted>"

_PATH_WORDS = ("file", "path", "dir")  # `password_file: /run/secrets/x` names a file
_REFERENCE = re.compile(r"\$\{[A-Za-z_]\w*(?::?\?[^}]*)?\}|\$[A-Za-z_]\w*")
_ENV_ITEM = re.compile(r"([A-Za-z_][\w.]*)=(.*)", re.S)
_ENV_NAME = re.compile(r"[A-Za-z_]\w*")
_MAPPING_LINE = re.compile(
    r"(?P<head>(?P<indent>[ ]*)(?:-[ ]+)?(?P<q>[\"']?)(?P<key>[\w.-]+)(?P=q)[ ]*:)"
    r"(?P<gap>[ ]+)(?P<value>\S.*?)[ ]*$"
)
_LIST_LINE = re.compile(
    r"(?P<head>[ ]*-[ ]+(?P<q>[\"']?))(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*?)(?P=q)[ ]*$"
)


# ------------------------------------------------------------------ what a secret is


def _is_reference(value: str) -> bool:
    """`${NAME}` (or `${NAME:?message}`): compose fills it in, it holds no secret."""
    return _REFERENCE.fullmatch(value.strip()) is not None


def _secret_key(key: str) -> bool:
    """A YAML key whose value is a secret (`password_file`, `key_file` name files)."""
    parts = words(key)
    return secret_name(key) and not (parts and parts[-1] in _PATH_WORDS)


def _hides_secret(key: str, value: str) -> bool:
    """Whether a YAML `key: value` (or `- KEY=value`) string must be replaced whole."""
    if value == PLACEHOLDER or _is_reference(value) or not value.strip():
        return False
    return _secret_key(key) or bool(SECRET_VALUE.search(value))


def _placeholder(key: str, compose: bool) -> str:
    if compose and _ENV_NAME.fullmatch(key):
        return f"${{{key}:?secret withheld by backup-config}}"
    return PLACEHOLDER


# -------------------------------------------------------------------- YAML redaction


def _scrub(node: Any, path: str, compose: bool, found: list[str]) -> Any:
    """A copy of parsed YAML with every secret replaced; `found` gets their key paths."""
    if isinstance(node, dict):
        clean = {}
        for key, value in node.items():
            label = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and _hides_secret(str(key), value):
                found.append(label)
                clean[key] = _placeholder(str(key), compose)
            else:
                clean[key] = _scrub(value, label, compose, found)
        return clean
    if isinstance(node, list):
        return [
            _scrub_item(item, f"{path}[{i}]", path, compose, found) for i, item in enumerate(node)
        ]
    if isinstance(node, str) and secret_value(node):
        found.append(path)
        text, _count = redact_urls(node)
        return PLACEHOLDER if SECRET_VALUE.search(text) else text
    return node


def _scrub_item(item: Any, label: str, parent: str, compose: bool, found: list[str]) -> Any:
    match = _ENV_ITEM.fullmatch(item) if isinstance(item, str) else None
    if match and _hides_secret(match[1], match[2]):
        found.append(f"{parent}.{match[1]}")
        return f"{match[1]}={_placeholder(match[1], compose)}"
    return _scrub(item, label, compose, found)


def _secrets_in(text: str, compose: bool) -> list[str] | None:
    """Key paths of the secrets left in a YAML text; None when it does not parse."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return None
    found: list[str] = []
    for document in documents:
        _scrub(document, "", compose, found)
    return found


def _string_scalar(value: str) -> bool:
    try:
        return isinstance(yaml.safe_load(value), str)
    except yaml.YAMLError:
        return False


def _redact_lines(text: str, compose: bool) -> tuple[str, list[str]]:
    """Replace secret values line by line, keeping everything else byte for byte
    (mapping `KEY: value`, list `- KEY=value`, block scalars `KEY: |`)."""
    out: list[str] = []
    names: list[str] = []
    lines = text.splitlines(keepends=True)
    skip_deeper_than: int | None = None
    for line in lines:
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        indent = len(body) - len(body.lstrip(" "))
        if skip_deeper_than is not None:
            if not body.strip() or indent > skip_deeper_than:
                continue  # the block scalar holding the secret
            skip_deeper_than = None
        listed = _LIST_LINE.match(body)
        if listed and _hides_secret(listed["key"], listed["value"]):
            names.append(listed["key"])
            key = listed["key"]
            out.append(f"{listed['head']}{key}={_placeholder(key, compose)}{listed['q']}{ending}")
            continue
        mapped = _MAPPING_LINE.match(body)
        if mapped:
            key, value = mapped["key"], mapped["value"]
            block = _secret_key(key) and re.fullmatch(r"[|>][-+0-9]*([ ]+#.*)?", value) is not None
            if block or (_string_scalar(value) and _hides_secret(key, yaml.safe_load(value))):
                names.append(key)
                replacement = json.dumps(_placeholder(key, compose))
                out.append(f"{mapped['head']}{mapped['gap']}{replacement}{ending}")
                skip_deeper_than = len(mapped["indent"]) if block else None
                continue
        out.append(line)
    return "".join(out), names


def redact_yaml(text: str, compose: bool) -> tuple[str, list[str], str]:
    """A YAML file with its secrets replaced: (text, key paths replaced, how).

    In place when possible (comments and layout kept); when a secret hides where
    lines cannot reach (flow mappings, anchors), the parsed document is rewritten
    without it; a file that does not parse is redacted line by line."""
    text, count = redact_urls(text)
    urls = [f"{count} URL credential(s)"] if count else []
    found = _secrets_in(text, compose)
    if found == []:
        return text, urls, "in place"
    redacted, names = _redact_lines(text, compose)
    if found is None:
        return redacted, urls + names, "line by line (not valid YAML)"
    if _secrets_in(redacted, compose) == []:
        return redacted, urls + found, "in place"
    clean = [_scrub(doc, "", compose, []) for doc in yaml.safe_load_all(text)]
    rewritten = yaml.safe_dump_all(clean, sort_keys=False, default_flow_style=False)
    return rewritten, urls + found, "rewritten (comments and layout not kept)"


# redis.conf directives holding a secret that secret_name() does not recognise.
_REDIS_SECRET_DIRECTIVES = ("masterauth", "masteruser")
_REDIS_ACL_PASSWORD = re.compile(r"(?<=\s)([>#<!])\S+")


def redact_redis_conf(text: str) -> tuple[str, list[str]]:
    """redis.conf without its secrets: the arguments of `requirepass`, `masterauth`,
    `tls-key-file-pass`… and the passwords and hashes (`>pass`, `#sha256`) of `user`
    ACL lines become <redacted>; comments and every other line kept."""
    out, names = [], []
    for line in text.splitlines(keepends=True):
        parts = line.split(None, 1)
        directive = parts[0].lower() if parts and not parts[0].startswith("#") else ""
        secret = directive in _REDIS_SECRET_DIRECTIVES or (
            secret_name(directive) and not directive.endswith(("-file", "-dir"))
        )
        if secret and len(parts) > 1:
            ending = line[len(line.rstrip("\r\n")) :]
            out.append(f"{parts[0]} {PLACEHOLDER}{ending}")
            names.append(directive)
        elif directive == "user" and _REDIS_ACL_PASSWORD.search(line):
            out.append(_REDIS_ACL_PASSWORD.sub(lambda m: f"{m[1]}{PLACEHOLDER}", line))
            names.append(f"user {line.split()[1] if len(line.split()) > 1 else ''}".strip())
        else:
            out.append(line)
    return "".join(out), names


def redact_file(relative: str, data: bytes) -> tuple[bytes, list[str], str]:
    """The bytes to store for one config file, and what was redacted from it."""
    text = data.decode("utf-8", errors="surrogateescape")
    name = Path(relative).name
    if name.endswith(".conf"):
        clean, found = redact_redis_conf(redact_urls(text)[0])
        how = "in place"
    elif name.endswith((".yml", ".yaml")):
        compose = any(fnmatch(name, pattern) for pattern in COMPOSE_PATTERNS)
        clean, found, how = redact_yaml(text, compose)
    else:  # dashboards (JSON) hold panels, not credentials; a datasource URL still might
        clean, count = redact_urls(text)
        found, how = ([f"{count} URL credential(s)"] if count else []), "in place"
    return clean.encode("utf-8", errors="surrogateescape"), found, how


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
    found = ProjectFiles(project_dir=str(root))
    seen: set[Path] = set()
    names = list(_candidates(root))
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


@task(cache_policy=NO_CACHE)
def read_env(allowlist: list[str], container: str | None) -> EnvCapture:
    """The allow-listed variables from the container's config (`Config.Env`), or from
    this process when no container is named; secrets are withheld by name."""
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


@task(cache_policy=NO_CACHE)
def unchanged_since(backup_dir: Path, digest: str, source_id: str) -> str | None:
    """The newest complete config backup of this project when it has this digest and
    is intact, else None."""
    try:
        manifest, path = find_local(Path(backup_dir), "config", "latest", source_id)
    except BackupNotFound:
        return None
    if manifest.source.get("digest") != digest:
        return None
    try:
        verify_file(path, manifest.size, manifest.sha256)
    except ArchiveError as error:
        run_logger().warning("Newest config backup is damaged, taking a new one: %s", error)
        return None
    return manifest.name


def archive_folder(name: str) -> str:
    """The folder inside the archive: `config_YYYYmmdd_HHMMSS_<tag>` for that backup name."""
    return Path(name).name.split(".", 1)[0]


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(mtime)
    archive.addfile(info, io.BytesIO(data))


@task(cache_policy=NO_CACHE)
def write_config_archive(
    files: ProjectFiles, env: EnvCapture, name: str, staging: Path, compression: Compression
) -> CompressedFile:
    """Tar the files and env.txt under `config_<stamp>/` (relative names only) straight
    into the compressor; the partial file is removed on any failure."""
    folder = archive_folder(name)
    writer = CompressedWriter(staging, compression)
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


def config_source(files: ProjectFiles, env: EnvCapture, digest: str) -> dict[str, Any]:
    """What the manifest records about a config backup: names and reasons, no values."""
    return {
        "digest": digest,
        "project_dir": files.project_dir,
        "files": [item.path for item in files.files] + [ENV_FILE],
        "missing": files.missing,
        "skipped": files.skipped,
        "redacted": files.redacted,
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


@task(cache_policy=NO_CACHE)
def publish_unchanged_report(previous: str, source: dict[str, Any]) -> None:
    """The report of a run that stored nothing because nothing changed."""
    rows = [{"field": "result", "value": f"unchanged since {previous}: no new backup"}]
    rows += [{"field": k, "value": v} for k, v in config_details(source).items()]
    create_table_artifact(
        table=rows, key="backup-config", description=f"config unchanged since {previous}"
    )
