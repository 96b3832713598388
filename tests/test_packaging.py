"""pyproject.toml keeps the promises the README makes about it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_dev_extra_is_every_extra_plus_the_tools():
    """README: "extra `dev`: pytest, ruff, and the extras above"; CI installs .[dev] and runs every test."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    others = set().union(*(_names(v) for k, v in extras.items() if k != "dev"))
    assert {"transformers", "datasets", "tiktoken", "submitit"} <= others
    assert _names(extras["dev"]) == others | {"pytest", "ruff"}
    # the same version floors as the extras themselves
    floors = {r for k, v in extras.items() if k != "dev" for r in v}
    assert floors <= set(extras["dev"])
