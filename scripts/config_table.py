"""Regenerate README's configuration table from service/config.py: `.venv/bin/python scripts/config_table.py`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import Settings  # noqa: E402

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, default, meaning in Settings.describe():
        shown = default if default.startswith("`") else "(empty)" if default == "" else f"`{default}`"
        rows.append(f"| `{name}` | {shown} | {meaning} |")
    return "\n".join(rows)


def main() -> None:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{table()}\n{END}", text, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    main()
