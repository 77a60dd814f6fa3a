"""Run one function on several threads that start together; collect what they raise."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_together(n: int, body: Callable[[int], None], timeout_s: float = 60.0
                 ) -> list[BaseException]:
    """Call ``body(i)`` for i in 0..n-1 on n threads released by one barrier; wait for all
    of them (at most ``timeout_s`` each) and return the exceptions they raised."""
    start, errors = threading.Barrier(n), []

    def worker(i: int) -> None:
        try:
            start.wait()
            body(i)
        except Exception as e:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return errors
