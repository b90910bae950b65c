"""The folded-vs-unfolded latency lab: its measurement, report, route and ``/ui`` page."""
