"""Keel: a production machine-learning loop built from Dagster software-defined assets."""

__version__ = "0.1.0"
