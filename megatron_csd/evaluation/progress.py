"""A minimal progress bar on stderr (no tqdm dependency); silent unless enabled.

    bar = ProgressBar(total=40, label="dolly", enabled=ctx.rank == 0)
    bar.update()      # one step done
    bar.close()

Redraws at most every 0.2 s (and at the end) with ``\\r`` on a terminal; when stderr is not a
terminal (logs, CI) it prints one line per 10% instead, so logs stay short.
"""
from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, *, label: str = "", enabled: bool = True, stream=None, width: int = 30):
        self.total = max(int(total), 0)
        self.label = label
        self.enabled = enabled and self.total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _line(self) -> str:
        fraction = self.done / self.total
        filled = int(round(self.width * fraction))
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left")

    def update(self, steps: int = 1) -> None:
        if not self.enabled:
            return
        self.done = min(self.done + steps, self.total)
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= 0.2 or self.done == self.total:
                self.stream.write("\r" + self._line())
                self.stream.flush()
                self._last_draw = now
        else:
            decile = self.done * 10 // self.total
            if decile != self._last_decile:
                self.stream.write(self._line() + "\n")
                self.stream.flush()
                self._last_decile = decile

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
