"""One Prefect server, a worker on each Docker host: the host's own copy of every
deployment, on the host's own work queue.

`python -m deployments yaml --host db-1` prints prefect.yaml with each deployment
named `<name>-db-1`, tagged `host:db-1` and sent to work queue `db-1` of the
`proxilion-dr` pool; the worker on that host (`prefect worker start --pool
proxilion-dr --work-queue db-1`) runs them with that host's PROXILION_DR_* settings.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class BadHostName(ValueError):
    """A host name that cannot name a work queue and a deployment suffix."""


def check_host(host: str) -> str:
    """`host` if it is a lower-case DNS label (letters, digits, inner dashes)."""
    if not HOST_NAME.fullmatch(host):
        raise BadHostName(
            f"host name {host!r} is not usable as a work queue name: use lower-case "
            "letters, digits and inner dashes (e.g. db-1), at most 63 characters"
        )
    return host


def for_host(prefect_yaml: str, host: str) -> str:
    """The generated prefect.yaml (`render_yaml()`) turned into `host`'s copy."""
    check_host(host)
    header, _, _ = prefect_yaml.partition("\n")
    document: dict[str, Any] = yaml.safe_load(prefect_yaml)
    for deployment in document["deployments"]:
        deployment["name"] = f"{deployment['name']}-{host}"
        deployment["tags"] = [*deployment.get("tags", []), f"host:{host}"]
        deployment["work_pool"] = {**deployment["work_pool"], "work_queue_name": host}
    note = f"# Deployments of host {host}: `python -m deployments yaml --host {host}`.\n"
    return header + "\n" + note + yaml.safe_dump(document, sort_keys=False)
