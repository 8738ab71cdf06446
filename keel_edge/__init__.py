"""keel-edge: score a Keel model bundle anywhere onnxruntime and NumPy run.

Needs nothing from Keel, pandas or torch::

    from keel_edge import load_bundle

    bundle = load_bundle("bundle/", variant="int8")   # verifies every file's sha256
    bundle.predict([{"spend_7d": 120.0, ...}])        # P(default) per row
"""

import time

# When the package started importing: the serverless handler's cold start counts from here.
IMPORT_STARTED = time.perf_counter()

from keel_edge.bundle import (  # noqa: E402
    MANIFEST_FILE,
    Bundle,
    BundleIntegrityError,
    load_bundle,
    manifest_sha256,
    read_manifest,
    verify_bundle,
)
from keel_edge.contract import Contract, ContractError, Ratio  # noqa: E402

__all__ = [
    "IMPORT_STARTED",
    "MANIFEST_FILE",
    "Bundle",
    "BundleIntegrityError",
    "Contract",
    "ContractError",
    "Ratio",
    "load_bundle",
    "manifest_sha256",
    "read_manifest",
    "verify_bundle",
]
