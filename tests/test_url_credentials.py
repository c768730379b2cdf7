"""Credentials in URLs: one Redis parser (redis-py's), never shown, ambiguous URLs refused.

A password with an unencoded `#`, `/` or `?` makes the URL parse as something else
(the rest becomes fragment, path or query): such a URL is refused before anything
connects, with a message that holds no part of it past the scheme, and the password
reaches nothing Prefect keeps. Percent-encoded credentials work for every fetch.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect_records import concurrency_limit_names, module_text, prefect_records
from redis_servers import running_redis

from flows.backup_prometheus import backup_prometheus
from flows.backup_redis import backup_redis
from flows.support.settings import SecretParameter
from tasks.common.redis_url import BadRedisUrl, parse_redis_url
from tasks.common.secrets import (
    CREDENTIAL_FREE_URL,
    AmbiguousUrl,
    carries_credentials,
    redact_url,
)
from tasks.store.archive import open_decompressed
from tasks.store.local import list_local

SPECIALS = ["#", "/", "?"]


def secret_with(special: str) -> tuple[str, list[str]]:
    """A unique password holding `special`, and the pieces of it that must never show."""
    head, tail = f"pw{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}zz"
    return f"{head}{special}{tail}", [head, tail]


CREDENTIAL_URLS = [
    ("redis://:hunter#2secret@h:6379/0", ["hunter", "2secret"]),
    ("redis://:s3cr/etpass@h:6379/0", ["s3cr", "etpass"]),
    ("redis://:pa?sssecret@h/0", ["pa?s", "sssecret"]),
    ("redis://op:pa@ss@h:6379/0", ["pa@ss", "op:"]),
    ("rediss://admin:pw123456@h:6380/2", ["admin", "pw123456"]),
    ("redis://h:6379/0?password=qs-secret&db=1", ["qs-secret"]),
    ("unix://:sockpass@/run/redis.sock?db=3", ["sockpass"]),
    ("redis://:nohostsecret", ["nohostsecret"]),
    ("user:barepass@h:6379", ["barepass"]),
    ("http://u:promsecret#x@prom:9090", ["promsecret", "u:"]),
    ("http://prom:9090/api?token=tok-secret#frag-secret", ["tok-secret", "frag-secret"]),
]
PLAIN_URLS = [
    "redis://h:6379/0",
    "http://prom:9090",
    "unix:///run/redis.sock?db=2",
    "localhost:8333",
]


@task
def leave_marks(mark: str) -> None:
    get_run_logger().info(f"log {mark}")
    create_markdown_artifact(f"artifact {mark}", key="scan-check")


@flow
def marked_run(mark: str) -> None:
    leave_marks(mark)


def test_the_scans_read_what_this_modules_runs_left() -> None:
    """The scans the tests below rely on (`... not in prefect_records()`) see a value
    in each place a run of this module leaves it: they are not blind."""
    mark = f"mark{uuid.uuid4().hex}"
    marked_run(mark)
    records = prefect_records()
    assert f'"mark":"{mark}"' in records, "the flow run's parameters are not read"
    assert f"log {mark}" in records and f"artifact {mark}" in records
    assert f"log {mark}" in module_text() and f"artifact {mark}" in module_text()


@pytest.mark.parametrize(("url", "pieces"), CREDENTIAL_URLS)
def test_redact_url_never_returns_a_credential(url: str, pieces: list[str]) -> None:
    shown = redact_url(url)
    assert all(piece not in shown for piece in pieces), shown


def test_url_parameter_schema_pattern_refuses_what_carries_credentials() -> None:
    """The pattern the run form and the server check URL parameters against (no Python
    there) refuses every URL that `carries_credentials`, and takes plain ones."""
    for url, _pieces in CREDENTIAL_URLS:
        assert carries_credentials(url) and not re.search(CREDENTIAL_FREE_URL, url), url
    for url in PLAIN_URLS:
        assert not carries_credentials(url) and re.search(CREDENTIAL_FREE_URL, url), url


def test_redact_url_keeps_what_identifies_the_server() -> None:
    assert redact_url("rediss://admin:pw@h:6380/2") == "rediss://***@h:6380/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("http://prom:9090") == "http://prom:9090"


@pytest.mark.parametrize("special", SPECIALS)
def test_ambiguous_url_is_refused_naming_the_fix_and_nothing_of_the_url(special: str) -> None:
    password, pieces = secret_with(special)
    with pytest.raises(AmbiguousUrl) as refused:
        parse_redis_url(f"redis://:{password}@db.example:6379/0")
    message = str(refused.value)
    assert "%23" in message and "%2F" in message and "%3F" in message
    assert "db.example" not in message and all(piece not in message for piece in pieces)
    assert isinstance(refused.value, BadRedisUrl) and isinstance(refused.value, ValueError)


def test_parser_is_redis_pys() -> None:
    target = parse_redis_url("rediss://us%2Fer:p%23w%3Fx@h.example:6380/4")
    assert (target.host, target.port, target.db, target.tls) == ("h.example", 6380, 4, True)
    assert (target.username, target.password) == ("us/er", "p#w?x")
    assert target.where == "rediss://***@h.example:6380/4"
    unix = parse_redis_url("unix://:pw@/run/redis.sock?db=2")
    assert (unix.socket_path, unix.db, unix.password) == ("/run/redis.sock", 2, "pw")
    assert unix.where == "unix://***@/run/redis.sock?db=2"
    with pytest.raises(BadRedisUrl, match="must start with redis://, rediss:// or unix://"):
        parse_redis_url("http://h:6379")


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("given_as", ["parameter", "environment"])
def test_unencoded_special_character_in_password_is_refused_and_never_stored(
    special: str,
    given_as: str,
    backup_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password, pieces = secret_with(special)
    with running_redis(tmp_path / "r", requirepass=password) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        parameters = {"redis_url": url} if given_as == "parameter" else {}
        if given_as == "environment":
            monkeypatch.setenv("PROXILION_DR_REDIS_URL", url)
        state = backup_redis(
            **parameters,
            container="",
            fetch="network",
            backup_dir=str(backup_dir),
            s3_bucket="",
            return_state=True,
        )
    assert state.is_failed()
    if given_as == "parameter":  # any password in a parameter is refused, encoded or not
        with pytest.raises(SecretParameter, match="put the URL in PROXILION_DR_REDIS_URL"):
            state.result()
    else:
        with pytest.raises(AmbiguousUrl, match=r"(?i)percent-encode.*# → %23"):
            state.result()
    stored = prefect_records() + "\n".join(concurrency_limit_names())
    assert all(piece not in stored for piece in pieces)
    assert all(piece not in (state.message or "") for piece in pieces)
    assert list_local(backup_dir, "redis") == []


@pytest.mark.parametrize("fetch", ["network", "path"])
def test_percent_encoded_password_and_acl_user_work_and_never_show(
    fetch: str, backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password, pieces = secret_with("#/?@")
    user = "back/up#er"
    with running_redis(tmp_path / "r", requirepass=password) as server:
        admin = server.client()
        admin.acl_setuser(
            user, enabled=True, passwords=[f"+{password}"], commands=["+@all"], keys=["*"]
        )
        admin.mset({f"k{i}": i for i in range(37)})
        url = f"redis://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{server.port}/0"
        monkeypatch.setenv("PROXILION_DR_REDIS_URL", url)
        manifest = backup_redis(
            container="",
            fetch=fetch,
            data_dir=str(server.dir) if fetch == "path" else "",
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    assert manifest["source"]["keyspace"]["db0"]["keys"] == 37
    assert manifest["source"]["server"] == f"redis://***@127.0.0.1:{server.port}/0"
    manifest_text = (backup_dir / (manifest["name"] + ".manifest.json")).read_text()
    everything = prefect_records() + manifest_text + "\n".join(concurrency_limit_names())
    encoded = quote(password, safe="")
    assert all(piece not in everything for piece in [*pieces, encoded, "back/up", "up#er"])


def test_network_fetch_over_a_unix_socket_reads_that_server(
    backup_dir: Path, tmp_path: Path
) -> None:
    # A short path: unix socket paths are limited to ~107 bytes.
    socket_path = Path("/tmp") / f"dr-{uuid.uuid4().hex[:8]}.sock"
    try:
        with running_redis(tmp_path / "r", unixsocket=str(socket_path), unixsocketperm=700):
            client = redis.Redis(unix_socket_path=str(socket_path))
            client.mset({f"only-here:{i}": i for i in range(23)})
            manifest = backup_redis(
                redis_url=f"unix://{socket_path}?db=0",
                container="",
                fetch="network",
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
    finally:
        socket_path.unlink(missing_ok=True)
    assert manifest["source"]["fetch"] == "network"
    assert manifest["source"]["keyspace"] == {"db0": {"keys": 23, "expires": 0}}
    assert manifest["source"]["server"] == f"unix://{socket_path}?db=0"
    [stored] = list_local(backup_dir, "redis")
    with open_decompressed(backup_dir / stored.name, stored.compression) as rdb:
        raw = rdb.read()
    assert raw.count(b"only-here:") == 23, "the RDB came from another server"


@pytest.mark.parametrize("special", SPECIALS)
def test_prometheus_url_with_unencoded_special_character_is_refused_and_never_stored(
    special: str, backup_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password, pieces = secret_with(special)
    user = f"op{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PROXILION_DR_PROMETHEUS_URL", f"http://{user}:{password}@127.0.0.1:9090")
    state = backup_prometheus(
        container="", fetch="path", backup_dir=str(backup_dir), s3_bucket="", return_state=True
    )
    with pytest.raises(AmbiguousUrl, match=r"prometheus_url \(http://…\).*%23"):
        state.result()
    stored = prefect_records() + "\n".join(concurrency_limit_names())
    assert all(piece not in stored for piece in [*pieces, user])
    assert list(backup_dir.iterdir()) == []
