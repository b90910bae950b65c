"""How long one model version's ONNX Runtime calls take, by batch size, as it serves.

The batcher asks before each call whether it is small enough to run on the event loop:
a thread hop costs tens of microseconds of the loop's time and a wake-up (more under
grpc.aio), which is more than a small model's whole call (docs/service.md, "Dynamic
batching"; docs/benchmarks.md, "gRPC batching"). A call runs inline only when the calls
measured so far predict it takes at most ``inline_limit_s``; anything not yet measured,
or measured slower, runs in the batcher's thread, where the loop never waits for it. So
a slow model never runs on the loop, and a fast one that turns slow (a busy machine, a
larger batch) goes back to the thread after one call.
"""

from __future__ import annotations

# Weight of the newest call in each batch size's running estimate: recent enough to follow
# a machine that gets busier, smooth enough that one fast outlier does not pull a slow
# batch size onto the loop.
SMOOTHING = 0.2


class RunTimes:
    """Seconds per call by batch rows (a running mean of the calls measured), and the
    inline-or-thread choice they make."""

    def __init__(self, inline_limit_s: float) -> None:
        self.inline_limit_s = inline_limit_s
        self._seconds: dict[int, float] = {}  # rows -> smoothed seconds per call

    def observe(self, rows: int, seconds: float) -> None:
        """One call of ``rows`` samples took ``seconds`` (the call alone, no hand-off)."""
        known = self._seconds.get(rows)
        self._seconds[rows] = seconds if known is None else known + SMOOTHING * (seconds - known)

    def predicted(self, rows: int) -> float | None:
        """The expected seconds of a call of ``rows`` samples: the estimate of the smallest
        measured batch at least that large (a call never gets faster with more rows); None
        when no batch that large has been measured."""
        larger = [r for r in self._seconds if r >= rows]
        return self._seconds[min(larger)] if larger else None

    def inline(self, rows: int) -> bool:
        """Run a call of ``rows`` samples on the event loop: it is predicted to take at
        most ``inline_limit_s``."""
        expected = self.predicted(rows)
        return expected is not None and expected <= self.inline_limit_s
