"""The pre-registration record of a study's primary hypotheses: their hash, the TOML file that holds them, and,
when that file is tracked in git, the commit that last changed it (so the report can say the hypotheses were
fixed before any run started) and whether the file had uncommitted changes when the study first started.

Recorded once, in study.json, when a study with primary hypotheses first starts; a later start with other
hypotheses in that folder is refused (study/__init__.py), even with --force: a hypothesis changed after the data
came in is not a pre-registered one.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def git_record(path: str | Path) -> dict | None:
    """{commit, committed_at (unix), clean (the file has no uncommitted changes)} of the last commit that
    changed `path`, or None when git is missing, the file is not in a repository or was never committed."""
    p = Path(path).resolve()
    if not p.is_file():
        return None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(p.parent), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    log = git("log", "-1", "--format=%H %ct", "--", p.name)
    if not log:
        return None
    commit, when = log.split()
    status = git("status", "--porcelain", "--", p.name)
    return {"commit": commit, "committed_at": int(when), "clean": status == ""}


def record(hypotheses_hash: str, source: str | None) -> dict:
    """What study.json keeps: the hash, the file and its git record (None outside git), when it was taken."""
    return {"hypotheses_hash": hypotheses_hash, "file": source, "git": git_record(source) if source else None,
            "recorded_at": time.time()}


def describe(prereg: dict | None, first_run_started: float | None) -> str:
    """One sentence for the report: where the hypotheses were fixed and whether any run started before."""
    if not prereg:
        return "No pre-registration record (a study made before quietgpt kept one)."
    g = prereg.get("git")
    when = (lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)))
    if not g:
        return (f"The hypotheses (sha256 {prereg['hypotheses_hash'][:12]}) come from {prereg.get('file')}, which is "
                "not tracked in git: nothing shows they were fixed before the runs.")
    text = (f"The hypotheses (sha256 {prereg['hypotheses_hash'][:12]}) were fixed in commit {g['commit'][:12]} "
            f"({when(g['committed_at'])}) of {Path(prereg.get('file') or '?').name}")
    text += "" if g.get("clean") else ", but the file had uncommitted changes when the study started"
    if first_run_started is None:
        return text + "."
    before = first_run_started < g["committed_at"]
    return text + (f"; the first run started {when(first_run_started)}, "
                   + ("BEFORE that commit: the hypotheses are not pre-registered." if before else "after it."))
