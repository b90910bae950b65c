"""How long one model version's ONNX Runtime calls take, by batch size, as it serves.

The batcher asks before each call whether it is small enough to run on the event loop:
a thread hop costs tens of microseconds of the loop's time and a wake-up (more under
grpc.aio), which is more than a small model's whole call (docs/service.md, "Dynamic
batching"; docs/benchmarks.md, "gRPC batching"). A call runs inline only when the calls
measured so far predict it takes at most ``inline_limit_s``; anything not yet measured,
or measured slower, runs in the batcher's thread, where the loop never waits for it. So
a slow model never runs on the loop, and a fast one that turns slow (a busy machine, a
larger batch) goes back to the thread after one call.

The same measurements predict the run time of any batch size for the latency target
(:mod:`service.models.batcher`): a measured size by its own estimate, one between two
measured sizes on the line between them, one past the largest along the slope of the
least-squares line ``a·rows + b`` through every measured size (BentoML's batcher fits
the same line), and ``b``, a call's fixed cost, is what holding a batch for company
can save.
"""

from __future__ import annotations

# Weight of the newest call in each batch size's running estimate: recent enough to follow
# a machine that gets busier, smooth enough that one fast outlier does not pull a slow
# batch size onto the loop.
SMOOTHING = 0.2


class RunTimes:
    """Seconds per call by batch rows (a running mean of the calls measured), the
    inline-or-thread choice they make, and the run time of any batch size they predict."""

    def __init__(self, inline_limit_s: float) -> None:
        self.inline_limit_s = inline_limit_s
        self._seconds: dict[int, float] = {}  # rows -> smoothed seconds per call
        self._fit: tuple[float, float] | None = None  # (a, b) of a·rows + b, refit per size

    def observe(self, rows: int, seconds: float) -> None:
        """One call of ``rows`` samples took ``seconds`` (the call alone, no hand-off)."""
        known = self._seconds.get(rows)
        self._seconds[rows] = seconds if known is None else known + SMOOTHING * (seconds - known)
        self._fit = None  # refit on the next prediction that needs it

    def inline(self, rows: int) -> bool:
        """Run a call of ``rows`` samples on the event loop: the smallest measured batch
        at least that large (a call never gets faster with more rows) took at most
        ``inline_limit_s``."""
        larger = [r for r in self._seconds if r >= rows]
        return bool(larger) and self._seconds[min(larger)] <= self.inline_limit_s

    def predicted(self, rows: int) -> float | None:
        """The expected seconds of a call of ``rows`` samples; None before any call."""
        seconds = self._seconds
        known = seconds.get(rows)
        if known is not None or not seconds:
            return known
        above = [r for r in seconds if r > rows]
        below = [r for r in seconds if r < rows]
        if above and below:  # on the line between the nearest measured sizes around it
            low, high = max(below), min(above)
            share = (rows - low) / (high - low)
            return seconds[low] + share * (seconds[high] - seconds[low])
        if above:  # smaller than any measured: no faster than the smallest
            return seconds[min(above)]
        top = max(below)  # larger than any measured: along the fitted slope
        slope = self.line()[0] if len(seconds) > 1 else seconds[top] / top
        return seconds[top] + max(slope, 0.0) * (rows - top)

    def line(self) -> tuple[float, float]:
        """``(a, b)`` of the least-squares line ``a·rows + b`` through the measured sizes
        (at least two): the cost per sample and the fixed cost of a call."""
        if self._fit is None:
            xs, ys = list(self._seconds), list(self._seconds.values())
            mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
            spread = sum((x - mean_x) ** 2 for x in xs)
            a = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
            self._fit = (a, mean_y - a * mean_x)
        return self._fit

    def fixed_cost(self) -> float | None:
        """A call's fixed cost (``b``, at least 0); None until two sizes are measured."""
        if len(self._seconds) < 2:
            return None
        return max(self.line()[1], 0.0)

    def largest_within(self, seconds: float, limit: int) -> int | None:
        """The most rows, at most ``limit``, a call is predicted to run within ``seconds``:
        0 when not even one; None before any call is measured."""
        full = self.predicted(limit)
        if full is None or full <= seconds:
            return None if full is None else limit
        low, high = 0, limit  # low fits (no rows), high does not
        while high - low > 1:
            middle = (low + high) // 2
            if (self.predicted(middle) or 0.0) <= seconds:
                low = middle
            else:
                high = middle
        return low
