"""Observability: Prometheus metrics of training, the monitor, run reports."""
