"""Observability: Prometheus metrics, logs, and Triton's statistics extension."""
