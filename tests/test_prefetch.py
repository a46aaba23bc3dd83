"""prefetch.ordered: results in order, bytes in flight within the window,
errors where they belong, and no read left running once the iterator closes."""

from __future__ import annotations

import threading
import time

import pytest

from jaxckpt import prefetch


class Reads:
    """Jobs that record how many bytes are being read at once."""

    def __init__(self):
        self.lock, self.now, self.peak, self.running, self.done = threading.Lock(), 0, 0, 0, []

    def job(self, i: int, nbytes: int, fail: bool = False):
        def read():
            with self.lock:
                self.now += nbytes
                self.running += 1
                self.peak = max(self.peak, self.now)
            time.sleep(0.01)
            with self.lock:
                self.now -= nbytes
                self.running -= 1
                self.done.append(i)
            if fail:
                raise ValueError(f"read {i} failed")
            return i
        return nbytes, read


def test_results_come_in_order_with_bytes_in_flight_bounded():
    r = Reads()
    assert list(prefetch.ordered([r.job(i, 10) for i in range(40)], window=50)) == list(range(40))
    assert 20 <= r.peak <= 50  # reads overlapped, within the window
    r = Reads()
    assert list(prefetch.ordered([r.job(0, 500), r.job(1, 10)], window=50)) == [0, 1]  # one larger read still runs


def test_a_zero_window_reads_in_turn_on_the_callers_thread():
    r, threads = Reads(), []
    jobs = [(1, lambda i=i: threads.append(threading.current_thread()) or i) for i in range(5)]
    assert list(prefetch.ordered(jobs, window=0)) == list(range(5))
    assert set(threads) == {threading.current_thread()} and r.peak == 0


def test_an_error_is_raised_in_its_place_and_closing_waits_for_running_reads():
    r = Reads()
    it = prefetch.ordered([r.job(0, 10), r.job(1, 10, fail=True), r.job(2, 10)], window=100)
    assert next(it) == 0
    with pytest.raises(ValueError, match="read 1 failed"):
        next(it)
    r = Reads()
    it = prefetch.ordered([r.job(i, 10) for i in range(20)], window=40)
    assert next(it) == 0
    it.close()
    assert r.running == 0 and len(r.done) < 20  # nothing still reading; the reads not started never ran
