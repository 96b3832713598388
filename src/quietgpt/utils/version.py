"""The package version, in a leaf module so that any layer may record it (pyproject.toml holds the same)."""

__version__ = "0.1.0"
