"""The study's progress line: runs done of total with an ETA."""

from __future__ import annotations

import sys
import time

from .run import run_name


class StudyProgress:
    """Runs done of total with an ETA; a tqdm bar on a terminal, else plain lines."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.n, self.enabled = total, initial, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0, self.n0, self.bar = time.perf_counter(), initial, None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="study", unit="run", position=0,
                            dynamic_ncols=True, file=sys.stderr)
        elif enabled and initial:
            self._line(f"{initial} of {total} runs already finished; skipping them")

    def _line(self, text: str) -> None:
        print(f"quietgpt study: {text}", file=sys.stderr, flush=True)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} running")

    def done(self, row: dict) -> None:
        self.n += 1
        status = "ok" if row["status"] == "ok" else f"FAILED ({row.get('error')})"
        name = run_name(row["variant"], row["seed"])
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} {'ok' if row['status'] == 'ok' else 'FAILED'}")
            self.bar.update(1)
        elif self.enabled:
            rate = (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.n) / rate
            self._line(f"[{self.n}/{self.total}] {name} {status} in {row.get('wall_s') or 0:.0f}s; eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
