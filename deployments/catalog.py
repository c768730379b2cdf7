"""Every deployment: name, flow, schedule. The one source of truth for both
`python -m deployments serve` and the generated prefect.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of one flow; `cron` is None for flows launched by hand."""

    name: str
    entrypoint: str
    cron: str | None
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ("proxilion-dr",)

    @property
    def flow_name(self) -> str:
        return self.entrypoint.rsplit(":", 1)[1].replace("_", "-")


TIMEZONE = "UTC"

DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name="every-6-hours",
        entrypoint="flows/backup_redis.py:backup_redis",
        cron="0 */6 * * *",
        description="Redis session state: snapshot, store, upload, keep 7 days.",
        tags=("proxilion-dr", "backup", "redis"),
    ),
)
