"""The report of recover-host: the Recovery record plus the runbook's "DISASTER RECOVERY
RUNBOOK" checklist, each line ticked, failed, marked "by hand" or not reached, with
its evidence."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flows.support.recovery import Recovery, Step
from tasks.common.errors import one_line

# The runbook's "DISASTER RECOVERY RUNBOOK" checklist, section by section.
RUNBOOK: dict[str, list[str]] = {
    "1. ASSESS": [
        "Identify failed components",
        "Check backup availability",
        "Notify stakeholders",
    ],
    "2. PROVISION INFRASTRUCTURE": [
        "New host or repair existing",
        "Docker installed",
        "Network connectivity verified",
    ],
    "3. RESTORE GATEWAY": [
        "docker-compose.yml in place",
        "Environment variables configured",
        "docker-compose up -d gateway",
        "curl localhost:8787/health returns OK",
    ],
    "4. RESTORE REDIS": [
        "dump.rdb restored to /var/lib/redis",
        "docker-compose up -d redis",
        "redis-cli PING returns PONG",
    ],
    "5. RESTORE MONITORING": [
        "Prometheus data restored (optional)",
        "docker-compose up -d prometheus grafana",
        "Grafana dashboards accessible",
    ],
    "6. VERIFY": [
        "Test /analyze endpoint",
        "Check metrics at /metrics",
        "Review Grafana dashboards",
        "Confirm alerting works",
    ],
    "7. POST-INCIDENT": [
        "Document incident timeline",
        "Update backup procedures if needed",
        "Schedule post-mortem",
    ],
}


ASSESS, PROVISION, GATEWAY, REDIS, MONITORING, VERIFY, POST_INCIDENT = RUNBOOK
BY_HAND = {  # what a flow cannot do; the report says so instead of ticking it
    "Notify stakeholders": "by the operator",
    "Review Grafana dashboards": "by the operator, in Grafana",
    "Update backup procedures if needed": "by the operator, after the post-mortem",
    "Schedule post-mortem": "by the operator",
}


MARKS = {"ok": "✅", "failed": "❌", "by hand": "✋", "n/a": "➖", "not reached": "⬜"}


@dataclass
class HostRecovery(Recovery):
    """The Recovery record plus the runbook's checklist (item → outcome, evidence)."""

    checklist: dict[str, dict[str, tuple[str, str]]] = field(
        default_factory=lambda: {
            section: {
                item: ("by hand", BY_HAND[item]) if item in BY_HAND else ("not reached", "")
                for item in items
            }
            for section, items in RUNBOOK.items()
        }  # fmt: skip
    )

    def check(self, section: str, item: str, evidence: str, outcome: str = "ok") -> None:
        self.checklist[section][item] = (outcome, evidence)

    @contextmanager
    def step_for(self, name: str, section: str, item: str) -> Iterator[Step]:
        """A step whose failure also fails its checklist line, with the reason."""
        try:
            with self.step(name) as step:
                yield step
        except BaseException as error:
            self.check(section, item, f"step '{name}' failed: {one_line(error)}", "failed")
            raise

    def checklist_markdown(self) -> str:
        lines = ["", "## DISASTER RECOVERY RUNBOOK", ""]
        for section, items in self.checklist.items():
            lines.append(f"**{section}**")
            lines.append("")
            for item, (outcome, evidence) in items.items():
                if outcome == "not reached" and self.dry_run:
                    evidence = evidence or "planned (dry run)"
                box = "[x]" if outcome == "ok" else "[ ]"
                text = f"- {box} {MARKS[outcome]} {item}"
                lines.append(text + (f" — {evidence}" if evidence else f" — {outcome}"))
            lines.append("")
        return "\n".join(lines)

    def markdown(self) -> str:
        return super().markdown() + self.checklist_markdown()

    def result(self) -> dict[str, Any]:
        facts = super().result()
        facts["checklist"] = {
            section: {item: {"outcome": o, "evidence": e} for item, (o, e) in items.items()}
            for section, items in self.checklist.items()
        }
        return facts
