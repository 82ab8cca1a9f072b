"""README stays true: its configuration table is the settings' own, and its two commands exist."""

from __future__ import annotations

import os
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_table_matches_settings() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.table() in readme, "README's table is stale: run .venv/bin/python scripts/config_table.py"
    for name, _, _ in Settings.describe():
        assert f"`{name}`" in readme


def test_the_two_commands_exist_and_are_executable() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in ("./scripts/run", "./scripts/test"):
        assert f"```sh\n{command}\n```" in readme
        assert os.access(ROOT / command, os.X_OK)
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()
