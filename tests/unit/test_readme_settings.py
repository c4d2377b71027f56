"""The README's ops configuration table is checked against control_api/settings.py: every API
setting has a row, every row names a real setting (or a TorchServe container variable of
.env.example), and each default shown parses to the code's default."""
import re
from dataclasses import fields
from pathlib import Path

from control_api.settings import ENV_VARS, Settings
from tests.support.deploy_parsing import env_example_sections

REPO = Path(__file__).resolve().parents[2]


def readme_rows() -> dict[str, str]:
    """variable -> the default shown (first backticked value of its cell, "" for "empty")."""
    text = (REPO / "README.md").read_text().split("### Configuration", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        defaults = [part.strip() for part in cells[1].split(" / ")]
        for name, default in zip(names, defaults + defaults[-1:] * len(names)):
            shown = re.match(r"`([^`]*)`", default)
            rows[name] = shown.group(1) if shown else "" if default.startswith("empty") else default
    return rows


def test_every_setting_has_a_row_and_every_row_a_setting():
    rows = readme_rows()
    _, serve = env_example_sections(REPO / ".env.example")
    assert set(ENV_VARS) <= set(rows), f"settings missing from the README: {set(ENV_VARS) - set(rows)}"
    unknown = set(rows) - set(ENV_VARS) - set(serve)
    assert not unknown, f"README rows that are no setting: {unknown}"


def test_defaults_shown_are_the_code_defaults():
    rows, default = readme_rows(), Settings()
    for f in fields(Settings):
        name = f.metadata["env"]
        parsed = getattr(Settings.from_env({name: rows[name]}), f.name)
        assert parsed == getattr(default, f.name), f"README shows {rows[name]!r} for {name}"
