"""Bundles where Keel serves: a model-shaped adapter, and a loader for registered versions.

``keel serve --bundle int8`` loads each registered version's bundle instead of its native
model, so an INT8 bundle can be canaried, shadowed and rolled back like any other version.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.edge.publish import TAG_MANIFEST_SHA256, TAG_URI

if TYPE_CHECKING:
    import pandas as pd

    from keel.registry import RegistryConfig
    from keel_edge import Bundle


class BundleUnavailableError(RuntimeError):
    """A registered version that has no published bundle of the asked variant."""


def frame_columns(frame: pd.DataFrame, names: tuple[str, ...], numeric: set[str]) -> dict:
    """Columns of ``frame`` as keel-edge takes them: float64 numbers, categories as objects."""
    columns: dict[str, Any] = {}
    for name in names:
        if name not in frame.columns:
            continue
        series = frame[name]
        if name in numeric:
            columns[name] = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            columns[name] = series.astype(object).where(series.notna(), None).to_numpy()
    return columns


class BundleRiskModel:
    """A bundle with the native models' interface: family, feature_names, predict_proba.

    `keel.serving.deployments.LoadedModel` wraps it like any other model.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.family = str(bundle.model["family"])
        self.variant = bundle.variant
        self._numeric = set(bundle.contract.numeric)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.bundle.feature_names

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(defaulted=1) for every row of ``frame``, shape (n,)."""
        return self.bundle.predict(frame_columns(frame, self.feature_names, self._numeric))

    # `keel.serving.deployments.LoadedModel`'s name for the same thing.
    predict = predict_proba


def load_version_bundle(
    registry_config: RegistryConfig, version: str, variant: str = "int8", threads: int = 1
) -> BundleRiskModel:
    """The published bundle of a registered version, verified against the registry's sha256.

    ``int8`` falls back to the bundle's FP32 graph where it has no INT8 one (tree models, or
    an INT8 variant dropped for leaving its bounds), so one setting serves every version.
    """
    import mlflow

    from keel_edge import Bundle

    client = mlflow.MlflowClient(
        tracking_uri=registry_config.tracking_uri, registry_uri=registry_config.registry_uri
    )
    tags = client.get_model_version(registry_config.model_name, version).tags
    if TAG_URI not in tags:
        raise BundleUnavailableError(
            f"version {version} has no published bundle: materialise model_bundle for it"
        )
    variants = tags.get("keel.bundle.variants", "").split(",")
    if variant == "int8" and variant not in variants and "fp32" in variants:
        variant = "fp32"
    if variant not in variants:
        raise BundleUnavailableError(
            f"version {version}'s bundle has no {variant!r} variant (it has {', '.join(variants)})"
        )
    with tempfile.TemporaryDirectory(prefix="keel-bundle-") as scratch:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=tags[TAG_URI], dst_path=scratch, tracking_uri=registry_config.tracking_uri
        )
        # Every file is read into memory here, so the folder may go afterwards.
        bundle = Bundle(
            Path(local), variant, threads, expected_manifest_sha256=tags[TAG_MANIFEST_SHA256]
        )
    return BundleRiskModel(bundle)


def bundle_loader(
    registry_config: RegistryConfig, variant: str = "int8"
) -> Callable[[str], BundleRiskModel]:
    """``version -> model`` for `keel.serving.deployments.Deployments(load_model=...)`."""
    return functools.partial(load_version_bundle, registry_config, variant=variant)
