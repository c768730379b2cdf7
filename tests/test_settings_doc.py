"""docs/settings.md is generated from the Settings class, as prefect.yaml is from the
catalog: a setting added, renamed, re-defaulted or re-described without regenerating
the file fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.__main__ import main
from deployments.settings_doc import SETTINGS_DOC_COMMAND, settings_markdown
from flows.support.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "settings.md"


def test_docs_settings_md_is_generated_from_the_settings_class() -> None:
    assert DOC.read_text() == settings_markdown(), (
        f"docs/settings.md is stale: run `{SETTINGS_DOC_COMMAND}`"
    )


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    main(["settings"])
    assert capsys.readouterr().out == settings_markdown()


def test_every_setting_is_described_with_its_variable_and_default() -> None:
    text = settings_markdown()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no Field(description=...)"
        assert f"| `PROXILION_DR_{name.upper()}` | " in text


def test_a_secret_default_is_shown_empty_and_lines_stay_readable() -> None:
    text = settings_markdown()
    assert "| `PROXILION_DR_NOTIFY_WEBHOOK_URL` | *(empty)* |" in text
    assert "SecretStr" not in text and "**" not in text
    long = [line for line in text.splitlines() if len(line) > 200]
    assert not long, f"lines over 200 characters (shorten the description): {long}"
