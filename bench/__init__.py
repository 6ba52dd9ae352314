"""Benchmarks that print figures (never run by the test suite): `.venv/bin/python -m bench.<name>`."""
