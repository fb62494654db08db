"""Progress lines for long work: paced, and worded the same by training, evaluation and batch scoring."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Progress:
    """Paces progress lines inside long work: ``due`` says when one is due, at most one every
    ``every_s`` seconds and the first ``every_s`` after the start (work shorter than that says
    nothing; 0 = every call).

    Example:
        >>> p = Progress(60.0, iter([0.0, 30.0, 61.0, 62.0]).__next__)
        >>> [p.due() for _ in range(3)]
        [None, 61.0, None]
    """

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()

    def due(self) -> float | None:
        """Seconds since the start if a line is due now (the next is then ``every_s`` away), else None."""
        now = self.clock()
        if now - self.last < self.every_s:
            return None
        self.last = now
        return max(now - self.start, 1e-9)

    def users(self, batches: Iterable[dict[str, Any]], emit: Callable[[str], None], what: str = "",
              scale: int = 1, key: str = "targets") -> Iterator[dict[str, Any]]:
        """``batches`` of one row per user (``key`` counts them), passed through; when due, ``emit``
        gets a line on the users done so far, after ``what``: (times ``scale``: one worker's count
        times the workers, for the whole)."""
        done, prefix = 0, f"{what}: " if what else ""
        for batch in batches:
            yield batch
            done += len(batch[key]) * scale
            if (seconds := self.due()) is not None:
                emit(prefix + users_line(done, seconds))


def users_line(done: int, seconds: float, verb: str = "ranked") -> str:
    """The users-done progress line of validation, `ray-rec evaluate` and `ray-rec batch-score`."""
    return f"{done:,} users {verb} in {seconds:,.0f} s ({done / seconds:,.0f}/s)"


