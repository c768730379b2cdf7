"""recover-host refuses, before writing anything, what would make things worse: a target
folder that holds something, a host where the services' addresses already answer (the
shared sandbox runs here: exactly that case), an env file it cannot read. And the
pure pieces: which variables a compose file needs, how an env file is read."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require

from flows.backup_config import backup_config
from flows.backup_redis import backup_redis
from flows.recover_host import recover_host
from flows.support.failures import StepFailed
from sandbox import constants as stack
from tasks.docker.compose import compose_command
from tasks.docker.project import (
    EnvFileError,
    env_file_text,
    parse_env_text,
    required_variables,
)

TOKEN = stack.GATEWAY_SECRET_ENV["GATEWAY_API_TOKEN"]


@pytest.fixture
def backups_in_s3(tmp_path: Path, s3_prefix: str) -> dict[str, Any]:
    """A config and a Redis backup of the sandbox in S3, and the recover-host parameters
    that find them there (the local folder is empty), with the secret supplied."""
    require(stack.GATEWAY_HOST, stack.GATEWAY_PORT, f"the gateway ({stack.GATEWAY_CONTAINER})")
    to = {
        "backup_dir": str(tmp_path / "old-host"),
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": s3_prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }
    backup_config(project_dir=str(stack.PROJECT_DIR), env_container=stack.GATEWAY_CONTAINER, **to)
    backup_redis(redis_url=stack.REDIS_URL, container=stack.REDIS_CONTAINER, **to)
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"GATEWAY_API_TOKEN={TOKEN}\n")
    return {
        **to,
        "backup_dir": str(tmp_path / "new-host"),
        "source_project_dir": str(stack.PROJECT_DIR),
        "secrets_env_file": str(secrets_file),
        "gateway_url": stack.GATEWAY_URL,
        "redis_url": stack.REDIS_URL,
        "prometheus_url": stack.PROMETHEUS_URL,
    }


def test_a_host_where_the_services_already_answer_is_refused(
    backups_in_s3: dict[str, Any], tmp_path: Path
) -> None:
    target = tmp_path / "proxilion"
    with pytest.raises(StepFailed, match="something already answers at gateway"):
        recover_host(target_dir=str(target), **backups_in_s3)
    assert not target.exists()


def test_a_target_that_holds_something_is_refused_and_kept(
    backups_in_s3: dict[str, Any], tmp_path: Path
) -> None:
    target = tmp_path / "proxilion"
    target.mkdir()
    (target / "notes.txt").write_text("operator's file")
    with pytest.raises(StepFailed, match="is not an empty folder"):
        recover_host(target_dir=str(target), **backups_in_s3)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_an_unreadable_secrets_file_is_named(backups_in_s3: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "no-such.env"
    run = {**backups_in_s3, "secrets_env_file": str(missing)}
    with pytest.raises(StepFailed, match=f"cannot read secrets_env_file {missing}"):
        recover_host(target_dir=str(tmp_path / "proxilion"), dry_run=True, **run)


def test_required_variables_are_the_references_without_a_default() -> None:
    compose = (
        "services:\n  gateway:\n    environment:\n"
        "      TOKEN: ${GATEWAY_API_TOKEN}\n"
        "      DB: ${DB_PASSWORD:?secret withheld by backup-config}\n"
        "      MODE: ${MODE:-monitor}\n"
        "      TAG: ${TAG-latest}\n"
        "      HOME_DIR: $HOME\n"
        "      LITERAL: $$NOT_A_VARIABLE\n"
    )
    assert required_variables(compose) == {"GATEWAY_API_TOKEN", "DB_PASSWORD", "HOME"}


def test_env_files_round_trip_and_a_bad_line_is_named_without_its_value() -> None:
    values = {"MODE": "monitor", "TOKEN": "a b#c", "QUOTED": 'say "hi" \\ bye'}
    assert parse_env_text(env_file_text(values), "x") == values
    assert parse_env_text("# c\n\nexport A=1\nB='two'\n", "x") == {"A": "1", "B": "two"}
    with pytest.raises(EnvFileError, match="secrets line 2 is not NAME=value") as error:
        parse_env_text("A=1\nhunter2-not-a-line\n", "secrets")
    assert "hunter2" not in str(error.value)


def test_compose_reads_every_secret_back_literally_from_the_env_file(tmp_path: Path) -> None:
    """`.env` as recover-host writes it, read by the compose CLI of this host (Debian 12:
    docker-compose 1.29 and its python-dotenv, which expands `${…}` inside any quoting;
    `docker compose` v2 is not installed here): every value comes back as it was given,
    `x${HOME}y` no longer as `x/rooty`."""
    values = {
        "DOLLAR_BRACE": "x${HOME}y",
        "DEFAULT_FORM": "${UNSET:-fallback}",
        "BARE": "$HOME and $$ and trailing $",
        "QUOTES": 'it\'s "quoted" \\ and #not-a-comment ',
        "NEWLINE": "two\nlines",
        "PLAIN": "plain-value.1",
    }
    (tmp_path / ".env").write_text(env_file_text(values))
    environment = {name: f"${{{name}}}" for name in values}
    compose = {"services": {"s": {"image": "x", "environment": environment}}}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(compose))
    done = subprocess.run(
        [*compose_command(), "config"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    read = yaml.safe_load(done.stdout)["services"]["s"]["environment"]
    assert {name: value.replace("$$", "$") for name, value in read.items()} == values
