"""The study's progress: runs done of total with an ETA, on the one progress printer (progress.py)."""

from __future__ import annotations

from ..progress import Progress
from .run import run_name


class StudyProgress(Progress):
    """A Progress over runs ("study", unit "run") that knows what a run's start and row look like."""

    def __init__(self, total: int, initial: int, enabled: bool):
        super().__init__(total, initial, enabled=enabled, desc="study", unit="run", prefix="quietgpt study: ",
                         position=0)
        if initial:
            self.line(f"{initial} of {total} runs already finished; skipping them")

    def start(self, name: str) -> None:
        self.postfix(f"{name} running")

    def done(self, row: dict) -> None:
        ok = row["status"] == "ok"
        name = run_name(row["variant"], row["seed"])
        self.postfix(f"{name} {'ok' if ok else 'FAILED'}")
        self.advance()
        status = "ok" if ok else f"FAILED ({row.get('error')})"
        self.line(f"[{self.n}/{self.total}] {name} {status} in {row.get('wall_s') or 0:.0f}s; eta {self.eta():.0f}s")
