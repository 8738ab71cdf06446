"""Load a bundle, verify every file against the manifest's sha256, and score rows.

A bundle is a folder::

    manifest.json      format, model name/version/family, lineage, variants, sha256 of files
    contract.json      the feature contract (`keel_edge.contract`)
    model.onnx         the FP32 graph: encoded features in, one logit per row out
    model.int8.onnx    the INT8 graph (PyTorch models only)

Each file is hashed and parsed from the same bytes, so it cannot change in between; a file the
manifest does not list is never read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from keel_edge.contract import Contract, sigmoid

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = 1
BUNDLE_KIND = "keel-edge-bundle"


class BundleIntegrityError(RuntimeError):
    """A bundle whose files are missing or differ from the sha256 its manifest records."""


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def manifest_sha256(folder: str | Path) -> str:
    """sha256 of a bundle's manifest.json: one hash that pins every file of the bundle."""
    return sha256_hex((Path(folder) / MANIFEST_FILE).read_bytes())


def read_manifest(folder: str | Path, expected_sha256: str = "") -> dict[str, Any]:
    """The manifest of a bundle folder; with ``expected_sha256``, only if its bytes match."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise BundleIntegrityError(f"{folder} holds no {MANIFEST_FILE}: not a Keel bundle")
    data = path.read_bytes()
    if expected_sha256 and sha256_hex(data) != expected_sha256:
        raise BundleIntegrityError(
            f"{path} has sha256 {sha256_hex(data)}, expected {expected_sha256}"
        )
    manifest = json.loads(data)
    if manifest.get("kind") != BUNDLE_KIND or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleIntegrityError(
            f"{path}: unsupported bundle kind {manifest.get('kind')!r} or format "
            f"{manifest.get('format')!r} (this runtime reads {BUNDLE_KIND} {BUNDLE_FORMAT})"
        )
    return manifest


def verified_bytes(folder: str | Path, manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of one bundle file, refused unless listed in the manifest with their sha256."""
    entry = manifest.get("files", {}).get(name)
    if entry is None:
        raise BundleIntegrityError(f"{name} is not listed in the bundle's manifest")
    path = Path(folder) / name
    if not path.is_file():
        raise BundleIntegrityError(f"{path} is missing")
    data = path.read_bytes()
    actual = sha256_hex(data)
    if actual != entry["sha256"]:
        raise BundleIntegrityError(
            f"{path} has sha256 {actual}, but the manifest records {entry['sha256']}: "
            "refusing an altered bundle"
        )
    return data


def verify_bundle(folder: str | Path, expected_manifest_sha256: str = "") -> dict[str, Any]:
    """Check every file the manifest lists; returns the manifest."""
    manifest = read_manifest(folder, expected_manifest_sha256)
    for name in manifest.get("files", {}):
        verified_bytes(folder, manifest, name)
    for variant, name in manifest.get("variants", {}).items():
        if name not in manifest.get("files", {}):
            raise BundleIntegrityError(f"variant {variant!r} file {name} is not in the manifest")
    return manifest


class Bundle:
    """One variant of a bundle, ready to score: ``predict(rows)`` returns P(defaulted=1).

    Args:
        folder: The bundle folder.
        variant: ``fp32`` or ``int8``; empty takes the manifest's default.
        threads: onnxruntime intra-op threads (0: its default, every core).
        expected_manifest_sha256: The manifest's sha256 as the registry records it, if known.
    """

    def __init__(
        self,
        folder: str | Path,
        variant: str = "",
        threads: int = 1,
        expected_manifest_sha256: str = "",
    ) -> None:
        import onnxruntime

        self.folder = Path(folder)
        self.manifest = verify_bundle(self.folder, expected_manifest_sha256)
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant", "fp32")
        if self.variant not in variants:
            raise BundleIntegrityError(
                f"the bundle has no {self.variant!r} variant (it has {', '.join(variants)})"
            )
        contract_bytes = verified_bytes(self.folder, self.manifest, self.manifest["contract"])
        self.contract = Contract.from_dict(json.loads(contract_bytes))
        graph = verified_bytes(self.folder, self.manifest, variants[self.variant])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )
        inputs = self.session.get_inputs()
        names = tuple(node.name for node in inputs)
        # The contract encodes numbers in float64; graphs that take float32 get them cast.
        self._float32 = {node.name for node in inputs if node.type == "tensor(float)"}
        if names != self.contract.graph_inputs:
            raise BundleIntegrityError(
                f"the graph takes {names}, the contract feeds {self.contract.graph_inputs}"
            )
        self.size_bytes = sum(entry["bytes"] for entry in self.manifest["files"].values())

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.contract.feature_names

    @property
    def request_features(self) -> tuple[str, ...]:
        return self.contract.request_features

    @property
    def model(self) -> dict[str, Any]:
        """Name, version and family of the registered model the bundle was built from."""
        return self.manifest["model"]

    def logits(self, rows: Any) -> np.ndarray:
        """The graph's raw scores for rows (a list of dicts or a mapping of columns)."""
        if isinstance(rows, list) and not rows:
            return np.empty(0, dtype=np.float64)
        feeds = self.contract.graph_feeds(rows)
        for name in self._float32 & feeds.keys():
            feeds[name] = feeds[name].astype(np.float32)
        if not len(next(iter(feeds.values()))):
            return np.empty(0, dtype=np.float64)
        (output,) = self.session.run(None, feeds)
        return np.asarray(output, dtype=np.float64).reshape(-1)

    def predict(self, rows: Any) -> np.ndarray:
        """P(defaulted=1) for every row, shape (n,)."""
        return sigmoid(self.logits(rows) - self.contract.logit_offset)


def load_bundle(
    folder: str | Path, variant: str = "", threads: int = 1, expected_manifest_sha256: str = ""
) -> Bundle:
    """`Bundle` of ``folder``: verified, with one onnxruntime session for ``variant``."""
    return Bundle(folder, variant, threads, expected_manifest_sha256)
