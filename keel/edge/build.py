"""Build a bundle folder: ONNX graphs, the feature contract and a manifest with every sha256.

The folder is written under a temporary name next to the target and renamed into place, so a
reader sees either no bundle or a whole one. `keel_edge` reads what this writes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel_edge.bundle import BUNDLE_FORMAT, BUNDLE_KIND, MANIFEST_FILE, sha256_hex

if TYPE_CHECKING:
    import pandas as pd

    from keel.training import RiskModel

CONTRACT_FILE = "contract.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# The packages a bundle needs where it runs: the serverless image pins the same versions.
RUNTIME_PACKAGES = ("onnxruntime", "numpy")


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def runtime_versions() -> dict[str, str]:
    """Installed versions of what the bundle needs at run time."""
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in RUNTIME_PACKAGES}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> str:
    """Hash every file the manifest names, write it, and return the manifest's own sha256."""
    names = [manifest["contract"], *manifest["variants"].values()]
    manifest["files"] = {
        name: {
            "sha256": sha256_hex((folder / name).read_bytes()),
            "bytes": (folder / name).stat().st_size,
        }
        for name in sorted(names)
    }
    data = _json_bytes(manifest)
    (folder / MANIFEST_FILE).write_bytes(data)
    return sha256_hex(data)


def build_bundle(
    model: RiskModel,
    folder: str | Path,
    *,
    model_info: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
    int8: bool = True,
    calibration: pd.DataFrame | None = None,
) -> Path:
    """Export ``model`` into a bundle folder (replacing one that is there).

    Args:
        model: A native Keel model (``keel.training.RiskModel``).
        folder: Where the bundle goes.
        model_info: Registered model name, version, MLflow run and URI.
        lineage: What the registry records the version was built from.
        int8: Also write the INT8 variant (PyTorch models only; trees have none).
        calibration: Rows that calibrate INT8 activation ranges (the validation window: the
            held-out window stays for the parity check); required for the INT8 variant.
    """
    from keel.edge.export import calibration_batches, feature_contract, int8_onnx, onnx_graph

    with_int8 = int8 and model.family == "torch"
    if with_int8 and (calibration is None or calibration.empty):
        raise ValueError("the INT8 variant needs calibration rows (the validation window)")

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        contract = feature_contract(model)
        (staging / CONTRACT_FILE).write_bytes(_json_bytes(contract.to_dict()))
        fp32 = onnx_graph(model)
        (staging / VARIANT_FILES["fp32"]).write_bytes(fp32)
        variants = {"fp32": VARIANT_FILES["fp32"]}
        if with_int8:
            batches = calibration_batches(model, calibration)
            (staging / VARIANT_FILES["int8"]).write_bytes(int8_onnx(fp32, batches))
            variants["int8"] = VARIANT_FILES["int8"]
        manifest = {
            "kind": BUNDLE_KIND,
            "format": BUNDLE_FORMAT,
            "model": {"family": model.family, **dict(model_info)},
            "lineage": dict(lineage or {}),
            "contract": CONTRACT_FILE,
            "variants": variants,
            "default_variant": "fp32",
            "runtime": runtime_versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_manifest(staging, manifest)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def drop_variant(folder: str | Path, variant: str) -> str:
    """Remove one variant from a bundle and re-sign its manifest; returns the new sha256."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    name = manifest["variants"].pop(variant)
    (folder / name).unlink()
    return write_manifest(folder, manifest)


def record_parity(folder: str | Path, parity: Mapping[str, Any]) -> str:
    """Store the parity report in the manifest; returns the manifest's new sha256."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["parity"] = dict(parity)
    return write_manifest(folder, manifest)


def bundle_bytes(folder: str | Path) -> dict[str, int]:
    """Size of each variant as shipped: its graph plus the contract and manifest."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    shared = (folder / MANIFEST_FILE).stat().st_size + manifest["files"][CONTRACT_FILE]["bytes"]
    return {
        variant: shared + manifest["files"][name]["bytes"]
        for variant, name in manifest["variants"].items()
    }
