"""The baseline of ``bench/serve.py``: a bare FastAPI app over Redis and the same booster."""
