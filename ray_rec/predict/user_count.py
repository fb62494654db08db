"""Progress of Ray Data batch inference, counted where the users are scored.

Ray Data hands a ``map_batches`` stage's output on in blocks, often only when a task has finished
its whole input block, so counting users as results reach the driver shows nothing for most of
the run and then everything at once (`ray-rec evaluate` over 214,617 items: one line, "4,096
users ranked in 131 s (31/s)", a second before the end). The scoring actors count instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from ray_rec.progress import Progress, users_line


class UserCount:
    """Users scored so far, as a 0-CPU actor: the scoring actors add to it, the driver reads it."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def get(self) -> int:
        return self.n


@contextmanager
def reported_user_count(progress_s: float, say: Callable[[str], None], verb: str) -> Iterator[Any]:
    """A `UserCount` actor for the scoring actors to ``add`` to (not awaited: a count, not a
    result); while the block runs, a thread ``say``s the users counted so far every ``progress_s``
    seconds ("N users <verb> in T s (R/s)")."""
    actor: Any = ray.remote(num_cpus=0)(UserCount)  # ray's stubs type ray.remote(...)(cls) loosely
    counter = actor.remote()
    pace, done = Progress(progress_s), threading.Event()

    def report() -> None:
        while not done.wait(min(1.0, max(pace.every_s, 0.1))):
            if (seconds := pace.due()) is not None:
                say(users_line(int(ray.get(counter.get.remote())), seconds, verb))

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield counter
    finally:
        done.set()
        reporter.join()  # the counter goes with its last handle, after the counts sent to it
