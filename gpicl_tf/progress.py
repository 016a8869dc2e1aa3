"""Progress display: Keras' live bar on a terminal, plain lines in logs and pipes."""

from __future__ import annotations

import sys
import time


class PlainProgress:
    """Prints "label 500/4000 (12%) - 40s - loss: 0.1234" lines, at most every `every` s.

    The same `update(current, values)` call as keras.utils.Progbar, without
    cursor control or colour codes, so a log file or CI output stays readable.
    """

    def __init__(self, target: int, label: str = "step", every: float = 10.0, stream=None):
        self.target, self.label, self.every = target, label, every
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.last = -float("inf")
        self.current = 0

    def update(self, current: int, values=None) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and current < self.target:
            return
        self.last = now
        pct = 100 * current / max(self.target, 1)
        parts = [f"{self.label} {current}/{self.target} ({pct:.0f}%)",
                 f"{now - self.start:.0f}s"]
        parts += [f"{k}: {v:.4g}" for k, v in (values or [])]
        print(" - ".join(parts), file=self.stream, flush=True)

    def add(self, n: int = 1, values=None) -> None:
        self.current += n
        self.update(self.current, values)


def progress_bar(target: int, show: bool = True, label: str = "step", stateful=()):
    """A Keras Progbar on a terminal, PlainProgress otherwise, or None when hidden."""
    if not show:
        return None
    if sys.stdout.isatty():
        import keras

        return keras.utils.Progbar(target, stateful_metrics=list(stateful), unit_name=label)
    return PlainProgress(target, label)
