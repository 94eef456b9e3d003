"""A one-line progress bar on stderr (no dependency). Silent when stderr is not a terminal."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, total: int, enabled: Optional[bool] = None, stream: TextIO = None):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def show(self, label: str = "") -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = f" eta {elapsed / frac - elapsed:4.0f}s" if 0 < frac < 1 else ""
        head = f"{self.done:>{len(str(self.total))}}/{self.total} {elapsed:4.0f}s{eta} "
        bar_width = max(10, min(30, width // 4))
        filled = int(round(bar_width * frac))
        bar = "[" + "#" * filled + "." * (bar_width - filled) + "] "
        room = max(0, width - len(head) - len(bar) - 1)
        self.stream.write("\r" + bar + head + label[:room].ljust(room))
        self.stream.flush()

    def advance(self, label: str = "") -> None:
        self.done += 1
        self.show(label)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
            self.stream.flush()
