"""Benchmarks: onelane against a bare Celery baseline and the spin-lock approach, same run."""
