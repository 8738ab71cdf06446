"""Dagster assets, one module per pipeline stage; the maths they call lives in ``keel``."""
