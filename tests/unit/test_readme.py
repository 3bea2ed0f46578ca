"""The README documents every setting, and its Quick start names the two commands CI and users run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from worker import settings as settings_module

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for group in dataclasses.fields(settings_module.Settings):
        cls = getattr(settings_module, group.type) if isinstance(group.type, str) else group.type
        missing += [name.upper() for name in cls.model_fields if f"| `{name.upper()}` |" not in readme]
    assert missing == []


def test_quick_start_commands_exist_and_ci_runs_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "bash deploy/local/demo.sh" in quick_start
    assert "bash deploy/local/test.sh" in quick_start
    assert (ROOT / "deploy/local/demo.sh").exists()
    assert "bash deploy/local/test.sh" in (ROOT / ".ci/run").read_text()
