"""The shipped presets (TOML files in this package: training presets here, study presets in studies/) and
how any preset or user TOML file is read: by name or path, with one-line errors for a missing file or bad
TOML, and each preset's one-line description and estimated wall time for `quietgpt presets`."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from quietgpt.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def preset_names() -> list[str]:
    """Names of the presets shipped in the package (quietgpt/presets/*.toml)."""
    return sorted(p.name[:-5] for p in resources.files("quietgpt.presets").iterdir() if p.name.endswith(".toml"))


def _preset_file(name_or_path: str):
    """(text-readable path, label) for a shipped preset name or a user's TOML file path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist; pass a preset name or a TOML path")
        return path
    if name_or_path not in preset_names():
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(preset_names())} "
                          "or pass a .toml file")
    return resources.files("quietgpt.presets").joinpath(f"{name_or_path}.toml")


def preset_text(name_or_path: str) -> str:
    """The TOML text of a shipped preset (by name) or of a user's TOML file (by path)."""
    try:
        return _preset_file(name_or_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {name_or_path} ({e}); pass a readable UTF-8 TOML file") from None


def read_toml(name_or_path: str) -> dict:
    """A shipped preset by name, or a user's TOML file by path, as a dict."""
    text = preset_text(name_or_path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name_or_path} is not valid TOML ({e}); fix the file") from None


def study_preset_names() -> list[str]:
    """Names of the study presets shipped in the package (quietgpt/presets/studies/*.toml)."""
    return sorted(p.name[:-5] for p in resources.files("quietgpt.presets.studies").iterdir()
                  if p.name.endswith(".toml"))


def study_preset_text(name: str) -> str:
    """The TOML text of a shipped study preset."""
    return resources.files("quietgpt.presets.studies").joinpath(f"{name}.toml").read_text(encoding="utf-8")


def preset_description(text: str) -> str:
    """A preset's one-line description: its [study] description, else its first comment line."""
    try:
        study = tomllib.loads(text).get("study")
    except tomllib.TOMLDecodeError:
        study = None
    if isinstance(study, dict) and isinstance(study.get("description"), str):
        return study["description"]
    return next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")


def preset_wall_time(text: str) -> str:
    """A study preset's estimated wall time ([study] wall_time), or ""."""
    try:
        study = tomllib.loads(text).get("study")
    except tomllib.TOMLDecodeError:
        return ""
    return str(study.get("wall_time", "")) if isinstance(study, dict) else ""
