"""Progress display: a rich progress bar when rich is installed, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """Shows training progress; a context manager.

    ``show=False`` prints nothing; ``rich=None`` uses rich when it is importable.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        show: bool = True,
        rich: bool | None = None,
        file: TextIO | None = None,
    ):
        self.show = show
        self.file = file
        self._bar = None
        self._task = None
        if not show:
            return
        if rich is None or rich:
            try:
                from rich import progress as rp
                from rich.console import Console
            except ImportError:
                if rich:
                    raise
            else:
                console = Console(file=file) if file is not None else Console()
                self._bar = rp.Progress(
                    rp.TextColumn("[bold]{task.description}"),
                    rp.BarColumn(),
                    rp.MofNCompleteColumn(),
                    rp.TextColumn("steps"),
                    rp.TimeElapsedColumn(),
                    rp.TimeRemainingColumn(),
                    rp.TextColumn("{task.fields[status]}"),
                    console=console,
                    transient=False,
                )
                self._task = self._bar.add_task("train", total=total_steps, status="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, completed: int, status: str = "") -> None:
        """Set the number of completed steps (the plain display shows epochs only)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, status=status)

    def print(self, line: str) -> None:
        """A line above the bar (or a plain line)."""
        if not self.show:
            return
        if self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            print(line, file=self.file or sys.stdout, flush=True)
