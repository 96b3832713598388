"""User-facing errors.

Anything a user can fix (bad config value, missing file, unknown variant) raises a subclass of
`QuietError` with a one-line message that names the problem and the fix. The CLI turns these into
exit code 2 without a traceback; everything else is a bug (exit code 1).
"""

from __future__ import annotations


class QuietError(Exception):
    """A problem with the user's input; the message is one line and says how to fix it."""


class ConfigError(QuietError, ValueError):
    """An invalid configuration value (also a ValueError, so plain Python callers can catch that)."""
