"""Each Docker host gets its own copy of every deployment, on its own work queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.__main__ import render_yaml
from deployments.catalog import DEPLOYMENTS
from deployments.hosts import BadHostName, for_host

REPO = Path(__file__).resolve().parent.parent


def test_host_copy_names_queues_and_tags_every_deployment() -> None:
    document = yaml.safe_load(for_host(render_yaml(), "db-1"))
    deployments = document["deployments"]
    assert [d["name"] for d in deployments] == [f"{s.name}-db-1" for s in DEPLOYMENTS]
    for deployment, spec in zip(deployments, DEPLOYMENTS, strict=True):
        assert deployment["work_pool"] == {"name": "proxilion-dr", "work_queue_name": "db-1"}
        assert deployment["tags"] == [*spec.tags, "host:db-1"]
        assert deployment["entrypoint"] == spec.entrypoint
    assert document["pull"] == yaml.safe_load(render_yaml())["pull"]


@pytest.mark.parametrize("host", ["", "DB-1", "db_1", "-db", "db-", "a" * 64, "db 1"])
def test_a_host_name_that_cannot_name_a_queue_is_refused(host: str) -> None:
    with pytest.raises(BadHostName, match="lower-case letters, digits and inner dashes"):
        for_host(render_yaml(), host)


def test_the_command_line_prints_the_host_copy_or_says_what_is_wrong() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deployments", "yaml", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    good = run("--host", "db-2")
    assert good.returncode == 0 and good.stdout == for_host(render_yaml(), "db-2")
    bad = run("--host", "DB_2")
    assert bad.returncode == 2 and "'DB_2' is not usable as a work queue name" in bad.stderr
