"""Backoff between the tries of work that keeps failing (Redis down, a Ray actor restarting). Callers keep their
own loop, because what happens between two tries differs: count the error, take in more work, give up at a
deadline, stop when asked; the threads that only repeat one step until stopped, whatever it raises (matcher,
notifier, indexer), share `repeat_until_stopped`. (redis-py's own `Retry` retries inside one command, unseen by the
caller, so it cannot count each failure or watch a deadline, and it knows nothing of Ray.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

FIRST_S = 0.05  # the first wait: a blip costs little; the doubling spares a server that stays down


class Backoff:
    """The waits after consecutive failures: `first_s`, then each twice the one before, at most `max_s`;
    `reset()` after a success starts over at `first_s`."""

    def __init__(self, max_s: float, first_s: float = FIRST_S):
        self.first_s = min(first_s, max_s)
        self.max_s = max_s
        self.next_s = self.first_s

    def wait(self, stop: threading.Event | None = None) -> None:
        """Sleep the next wait, or until `stop` is set."""
        delay, self.next_s = self.next_s, min(2 * self.next_s, self.max_s)
        if stop is None:
            time.sleep(delay)
        else:
            stop.wait(delay)

    def reset(self) -> None:
        self.next_s = self.first_s


def repeat_until_stopped(
    step: Callable[[], object], stop: threading.Event, max_s: float, failed: Callable[[Exception], None]
) -> None:
    """Call `step` until `stop` is set. After it raises, `failed(err)` (count it, undo what the step left half
    done), then a Backoff(max_s) wait, cut short by `stop`; a step that succeeds starts the backoff over."""
    backoff = Backoff(max_s)
    while not stop.is_set():
        try:
            step()
            backoff.reset()
        except Exception as err:
            failed(err)
            backoff.wait(stop)
