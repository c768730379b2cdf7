"""A named check of restored data, as every data source's prove function returns them.

A prove function (`tasks/<kind>/prove.py`) returns the checks that prove a restore
against its manifest, in order; each raises when it fails (naming what differs) and
returns its evidence when it passes. Recoveries and the drill run each as a step of
their report, so the same check reads the same in every report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One comparison of what is live or loaded with what the backup holds."""

    name: str
    run: Callable[[], str]
