"""Synthetic tasks where thinking must help: generated, deterministic, no downloads."""
