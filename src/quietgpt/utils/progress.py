"""One progress printer for training (iterations) and the study (runs): a tqdm bar on a terminal, plain
lines in a log, nothing when switched off. Everything goes to stderr: stdout stays for results."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Progress through `total` units of work, `initial` of them done before this session started.

    Progress(total, initial=0, *, enabled=True, desc="", unit="it", prefix="", position=None)
        total, initial  units in all, and units already done (a resumed run, a study's finished runs)
        enabled         False: print nothing at all (other DDP ranks, `progress=False`)
        desc, unit      the bar's label and unit ("train"/"it", "study"/"run")
        prefix          put before every printed line, e.g. "quietgpt study: "
        position        the bar's row (tqdm's `position`; 0 keeps a study's bar above its runs' bars)

    Attributes: `tty` is True when a bar is drawn (enabled and stderr is a terminal): a caller that also
    prints plain lines checks it to avoid telling the same thing twice; `n` is the units done, `total`.

    Methods:
        advance(k=1)             k more units done (moves the bar)
        postfix(text="", **kw)   the bar's suffix: a string, or name=value fields (refresh=False to wait
                                 for the next redraw); no-op without a bar
        line(text)               a plain progress line, printed only when enabled and no bar is drawn
                                 (the bar shows the same), e.g. "iter 9/400: loss 3.2, eta 40s"
        note(text)               a message printed whenever enabled: above the bar, or as a plain line
        eta()                    seconds left at this session's rate so far (units done since the start
                                 over the time since construction); NaN before the first unit
        close()                  take the bar down (also on `with Progress(...)` exit)

    Training: Progress(max_iters, start, enabled=..., desc="train", unit="it"); per step advance(); at log
    steps postfix(loss=.., tok_s=.., lr=.., refresh=False) and line(f"iter {it}/{total}: loss .., eta ..s").
    A study of runs would read:

        bar = Progress(len(pairs), len(done), enabled=progress, desc="study", unit="run", position=0,
                       prefix="quietgpt study: ")
        bar.line(f"{len(done)} of {len(pairs)} runs already finished; skipping them")  # if any
        bar.postfix(f"{name} running")                       # a run starts
        bar.postfix(f"{name} ok"); bar.advance()             # ... and ends
        bar.line(f"[{bar.n}/{bar.total}] {name} ok in {wall:.0f}s; eta {bar.eta():.0f}s")
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "", unit: str = "it",
                 prefix: str = "", position: int | None = None):
        self.total, self.n, self.enabled, self.prefix = total, initial, enabled, prefix
        self.tty = enabled and sys.stderr.isatty()
        self._t0, self._n0, self._bar = time.perf_counter(), initial, None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, position=position,
                             dynamic_ncols=True, file=sys.stderr)

    def advance(self, k: int = 1) -> None:
        """Count k more units done."""
        self.n += k
        if self._bar is not None:
            self._bar.update(k)

    def postfix(self, text: str = "", *, refresh: bool = True, **fields: str) -> None:
        """Set the bar's suffix to `text`, or to `fields` as name=value pairs; nothing without a bar."""
        if self._bar is None:
            return
        if fields:
            self._bar.set_postfix(refresh=refresh, **fields)
        else:
            self._bar.set_postfix_str(text, refresh=refresh)

    def line(self, text: str) -> None:
        """Print `text` as a progress line when enabled and no bar is drawn."""
        if self.enabled and not self.tty:
            print(f"{self.prefix}{text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """Print `text` when enabled: above the bar (which stays at the bottom), or as a plain line."""
        if self._bar is not None:
            self._bar.write(f"{self.prefix}{text}", file=sys.stderr)
        elif self.enabled:
            print(f"{self.prefix}{text}", file=sys.stderr, flush=True)

    def eta(self) -> float:
        """Seconds until `total` at the rate of this session so far; NaN while nothing was done yet."""
        rate = (self.n - self._n0) / max(time.perf_counter() - self._t0, 1e-9)
        return (self.total - self.n) / rate if rate > 0 else float("nan")

    def close(self) -> None:
        """Take the bar down; notes still print afterwards."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
