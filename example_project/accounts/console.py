"""A plain-text progress bar: redrawn in place on a terminal, a few lines anywhere else."""

from __future__ import annotations

import time
from typing import Callable, Protocol


class Stream(Protocol):
    """What the bar writes to: a file, or a management command's ``self.stdout``."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> None: ...

    def isatty(self) -> bool: ...


class ProgressBar:
    """``label  [#######-------]  120/600 events  2.4 s`` for one run of the demo.

    On a terminal each update redraws the line with a carriage return. Elsewhere (a pipe, a log,
    CI) the bar prints one line each time another ``1/steps`` of the total is done.
    """

    def __init__(self, stream: Stream, label: str, total: int, *, width: int = 30,
                 label_width: int = 15, steps: int = 4, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.label = label.ljust(label_width)
        self.total = max(total, 1)
        self.width = width
        self.steps = steps
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = self.clock()
        self.printed_step = 0
        self.last_length = 0
        self.done = 0
        self.elapsed = 0.0

    def status(self, text: str) -> None:
        """Show ``text`` in place of the bar (terminal only), e.g. while the workers start."""
        if self.tty:
            self._draw(f"{self.label}{text}")

    def restart_clock(self) -> None:
        """Count the elapsed time from now (when the first event is published)."""
        self.started = self.clock()
        self.elapsed = 0.0

    def update(self, done: int) -> None:
        """``done`` of the total are finished."""
        self.done = min(max(done, 0), self.total)
        self.elapsed = self.clock() - self.started
        if self.tty:
            self._draw(self.line())
            return
        step = self.done * self.steps // self.total
        if step > self.printed_step:
            self.printed_step = step
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (on a terminal, the last state stays on screen)."""
        if self.tty:
            self._draw(self.line())
            self.stream.write("\n")
            self.stream.flush()
        elif self.printed_step < self.steps and self.done:
            # A run that stopped early still leaves its last state in the output.
            self.printed_step = self.steps
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """The bar as text."""
        filled = self.done * self.width // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        digits = len(str(self.total))
        return f"{self.label}[{bar}] {self.done:>{digits}}/{self.total} events {self.elapsed:5.1f} s"

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.last_length))
        self.stream.flush()
        self.last_length = len(text)
