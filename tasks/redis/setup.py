"""What a restore must know about the target Redis before touching it: its version
(the newest RDB it loads), where its data lives and whether it runs with an AOF;
read from the running server, or, when it does not answer, from its container's
binary, config file and arguments, or from the data folder alone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.docker import containers
from tasks.redis.rdb import MAX_RDB_VERSION, max_rdb_for_redis
from tasks.redis.server import RedisUnreachable, connect, explain, inspect_redis


@dataclass
class RedisSetup:
    """What the restore must know about the target Redis, read before it is touched."""

    redis_version: str
    answered: bool  # False: Redis did not answer; the facts come from its binary and files
    dir: str | None
    dbfilename: str
    aof_enabled: bool | None  # None: unknown until the data dir is seen
    appenddirname: str
    appendfilename: str
    keyspace: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rdb_version(self) -> int:
        """The newest RDB version this Redis loads (any, when its version is unknown)."""
        return max_rdb_for_redis(self.redis_version) if self.redis_version else MAX_RDB_VERSION

    def aof_name(self) -> str:
        """The AOF's entry in the data dir: its folder (Redis 7) or its file."""
        return self.appenddirname or self.appendfilename

    def data_names(self) -> list[str]:
        """What Redis loads from its data dir: the RDB and the AOF (folder and the single
        file of Redis < 7: Redis 7 upgrades a lone appendonly.aof and loads it)."""
        return list(dict.fromkeys(n for n in (self.dbfilename, self.appenddirname,
                                               self.appendfilename) if n))  # fmt: skip


def _version_from_binary(container: str, argv: list[str]) -> str:
    """`redis-server --version` run from the container's own image and mounts."""
    binary = next((a for a in argv if os.path.basename(a).startswith("redis-server")), None)
    output = containers.run_like(container, [binary or "redis-server", "--version"])
    for word in output.split():
        if word.startswith("v="):
            return word[2:]
    raise containers.ContainerError(
        f"Redis in {container!r} does not answer and its binary did not tell its version "
        f"({output.strip()[:120]!r}): start it, or check the container"
    )


SETTINGS = ("dir", "dbfilename", "appendonly", "appenddirname", "appendfilename")


def _settings_from_command(container: str, argv: list[str], workdir: str) -> dict[str, str]:
    """The persistence settings a stopped Redis would start with: its config file (the
    first `.conf` argument, read through the container's mount), then `--name value`
    arguments, which win. Empty when there is neither."""
    found: dict[str, str] = {}
    conf = next((a for a in argv[1:] if a.endswith(".conf") and not a.startswith("-")), None)
    host = containers.host_path(container, str(PurePosixPath(workdir) / conf)) if conf else None
    if host is not None and host.is_file():
        for line in host.read_text(errors="replace").splitlines():
            words = line.split(None, 1)
            if len(words) == 2 and words[0].lower() in SETTINGS:
                found[words[0].lower()] = words[1].strip().strip("\"'")
    for position, arg in enumerate(argv[:-1]):
        if arg.startswith("--") and arg[2:].lower() in SETTINGS:
            found[arg[2:].lower()] = argv[position + 1]
    return found


def _setup_from_container(container: str) -> RedisSetup:
    """What a Redis that does not answer (crashed, stopped) would start with."""
    attrs = containers.get_container(container).attrs
    argv = [attrs.get("Path", ""), *attrs.get("Args", [])]
    workdir = attrs.get("Config", {}).get("WorkingDir") or "/"
    version = _version_from_binary(container, argv)
    found = _settings_from_command(container, argv, workdir)
    aof = found.get("appendonly")
    multi_part_aof = max_rdb_for_redis(version) >= 10  # Redis 7: AOF is a folder
    return RedisSetup(
        redis_version=version,
        answered=False,
        dir=str(PurePosixPath(workdir) / found.get("dir", ".")),
        dbfilename=found.get("dbfilename", "dump.rdb"),
        aof_enabled=None if aof is None else aof == "yes",
        appenddirname=found.get("appenddirname", "appendonlydir" if multi_part_aof else ""),
        appendfilename=found.get("appendfilename", "appendonly.aof"),
    )


def _aof_config(client: redis.Redis) -> dict[str, str]:
    """appendonly, appendfilename, appenddirname; {} where CONFIG is forbidden."""
    try:
        return dict(client.config_get("append*"))
    except redis.ResponseError:
        return {}


@task(cache_policy=NO_CACHE)
def read_redis_setup(redis_url: str, container: str | None) -> RedisSetup:
    """Version, data location and AOF settings from the running Redis; when it does not
    answer (crashed, stopped), from the container: its binary's version, its config
    file and arguments."""
    try:
        facts = inspect_redis.fn(redis_url)
        config = _aof_config(connect(redis_url))
    except RedisUnreachable:
        if not container:
            raise
        return _setup_from_container(container)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    return RedisSetup(
        redis_version=facts.redis_version,
        answered=True,
        dir=facts.rdb_dir,
        dbfilename=facts.rdb_filename or "dump.rdb",
        aof_enabled=config.get("appendonly", "yes" if facts.aof_enabled else "no") == "yes",
        appenddirname=config.get("appenddirname", ""),
        appendfilename=config.get("appendfilename") or "appendonly.aof",
        keyspace=facts.keyspace,
    )


def settle_aof(setup: RedisSetup, data_dir: Path) -> RedisSetup:
    """When Redis could not say whether AOF is on, its data dir tells: an AOF there
    means it was on."""
    if setup.aof_enabled is None:
        setup.aof_enabled = any(os.path.lexists(data_dir / name) for name in setup.data_names()[1:])
    return setup


def folder_setup(data_dir: Path) -> RedisSetup:
    """The setup of a Redis that is not there to ask (a folder it will start from): the
    default file names, AOF on when an AOF is in the folder, any RDB version."""
    legacy = not (data_dir / "appendonlydir").exists() and (data_dir / "appendonly.aof").exists()
    setup = RedisSetup(
        redis_version="",
        answered=False,
        dir=str(data_dir),
        dbfilename="dump.rdb",
        aof_enabled=None,
        appenddirname="" if legacy else "appendonlydir",
        appendfilename="appendonly.aof",
    )
    return settle_aof(setup, data_dir)
