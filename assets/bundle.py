"""The edge bundle of the registered version: ONNX (FP32, INT8), feature contract, manifest.

The maths lives in ``keel.edge``. The parity check runs inside the asset and is emitted as
its blocking check: a bundle whose scores stray from the native model's on the held-out window
is kept for inspection but never attached to the registry version.
"""

from typing import Any

import dagster as dg
from pydantic import Field

from assets.evaluation import DEFAULT_SPLIT_DAYS, ModelGovernance, materialisation_metadata
from assets.registry import GROUP, REGISTERED_MODEL_KEY, step_identity
from orchestration.resources import ArtefactStore, MlflowResource

BUNDLE_KEY = dg.AssetKey("model_bundle")
PARITY_CHECK = "bundle_parity"
# What the manifest keeps of the registry's lineage (aliases and stage change over time).
LINEAGE_KEYS = (
    "model_uri",
    "source",
    "mlflow_run_id",
    "training_set",
    "feature_service",
    "dbt_models",
    "dbt_manifest_hash",
    "code_commit",
    "code_dirty",
    "dagster_data_version",
    "trained_by",
)
_DEFAULT_FP32_TOLERANCE = 1e-5
_DEFAULT_INT8_MAX_ABS_DIFF = 0.02
_DEFAULT_INT8_MAX_AUC_DROP = 0.005


class BundleConfig(dg.Config):
    """Which version to bundle and how close the bundle must stay to it."""

    version: str = Field(
        default="", description="Version or alias; empty takes the one registered_model made."
    )
    int8: bool = Field(default=True, description="Add the INT8 variant (PyTorch models).")
    fp32_tolerance: float = Field(default=_DEFAULT_FP32_TOLERANCE, gt=0)
    int8_max_abs_diff: float = Field(default=_DEFAULT_INT8_MAX_ABS_DIFF, gt=0)
    int8_max_auc_drop: float = Field(default=_DEFAULT_INT8_MAX_AUC_DROP, ge=0)
    timed_rows: int = Field(default=200, ge=10, description="Timed single-row predictions.")


def _version(context: dg.AssetExecutionContext, config: BundleConfig) -> str:
    if config.version:
        return config.version
    metadata = materialisation_metadata(context, REGISTERED_MODEL_KEY)
    if metadata is None:
        raise dg.Failure("registered_model has never been materialised: nothing to bundle")
    return str(metadata["version"])


def _bundle_folder(artefacts: ArtefactStore, version: str):
    """Where the bundle is built: the artefact store when local, else a scratch folder."""
    import tempfile
    from pathlib import Path

    target = artefacts.path("bundles", f"v{version}")
    if target.protocol in ("", "file", "local"):
        return Path(target.path)
    # Remote stores receive the bundle through MLflow; build it on the local disk.
    return Path(tempfile.mkdtemp(prefix="keel-bundle-")) / f"v{version}"


def _windows(lineage: dict[str, Any], params: dict[str, str]):
    """The validation window (INT8 calibration) and the held-out window with its labels."""
    from keel.schema import LABEL
    from keel.training.data import read_held_out_windows

    path = lineage["training_set"]["path"]
    if not lineage["training_set"]["exists"]:
        raise dg.Failure(f"the training set {path} of this version is gone: no held-out window")
    # Only the two windows are read, as the evaluation reads them.
    validation, test = read_held_out_windows(
        path,
        int(params.get("setting.validation_days", DEFAULT_SPLIT_DAYS)),
        int(params.get("setting.test_days", DEFAULT_SPLIT_DAYS)),
    )
    return validation, test, test[LABEL].to_numpy()


def _metadata(report: dict[str, Any], sizes: dict[str, int], timings: dict[str, Any]) -> dict:
    metadata: dict[str, Any] = {
        "parity_passed": dg.MetadataValue.bool(report["passed"]),
        "held_out_rows": dg.MetadataValue.int(report["rows"]),
        "variants": dg.MetadataValue.text(", ".join(report["variants"])),
    }
    for variant, result in report["variants"].items():
        for key in ("max_abs_diff", "auc_change"):
            if key in result:
                metadata[f"{variant}_{key}"] = dg.MetadataValue.float(float(result[key]))
    for variant, size in sizes.items():
        metadata[f"{variant}_bytes"] = dg.MetadataValue.int(size)
    for name, value in timings.items():
        metadata[name] = dg.MetadataValue.float(float(value))
    return metadata


@dg.asset(
    deps=[REGISTERED_MODEL_KEY],
    group_name=GROUP,
    kinds={"onnx", "mlflow"},
    check_specs=[
        dg.AssetCheckSpec(
            PARITY_CHECK,
            asset=BUNDLE_KEY,
            blocking=True,
            description="FP32 bundle scores equal the native model's within 1e-5 on the "
            "held-out window; INT8 stays within its score and AUC bounds.",
        )
    ],
)
def model_bundle(
    context: dg.AssetExecutionContext,
    config: BundleConfig,
    mlflow: MlflowResource,
    governance: ModelGovernance,
    artefacts: ArtefactStore,
) -> dg.MaterializeResult:
    """A portable ONNX bundle of the registered version, attached to it once parity holds."""
    from mlflow import MlflowClient

    from keel.edge.build import build_bundle, bundle_bytes, drop_variant, record_parity
    from keel.edge.parity import ParityPolicy, check_parity, describe
    from keel.edge.publish import publish_bundle
    from keel.edge.timing import bundle_timings
    from keel.training import load_risk_model

    mlflow.configure()
    registry = governance.registry(mlflow)
    try:
        version = registry.resolve(_version(context, config))
        lineage = registry.lineage(version)
        params = MlflowClient(mlflow.tracking_uri).get_run(lineage["mlflow_run_id"]).data.params
        native = load_risk_model(f"models:/{registry.name}/{version}")
        validation, frame, labels = _windows(lineage, params)
        folder = build_bundle(
            native,
            _bundle_folder(artefacts, version),
            model_info={
                "name": registry.name,
                "version": version,
                "run_id": lineage["mlflow_run_id"],
                "model_uri": lineage["model_uri"],
            },
            lineage={key: lineage[key] for key in LINEAGE_KEYS},
            int8=config.int8,
            calibration=validation,
        )
        policy = ParityPolicy(
            config.fp32_tolerance, config.int8_max_abs_diff, config.int8_max_auc_drop
        )
        report = check_parity(folder, native, frame, labels, policy)
        int8 = report["variants"].get("int8")
        if int8 and not int8["passed"] and report["variants"]["fp32"]["passed"]:
            # INT8 ships only where it keeps to its bounds; FP32 alone is still a bundle.
            context.log.warning(f"INT8 variant dropped: {int8.get('failure')}")
            drop_variant(folder, "int8")
            report = {**check_parity(folder, native, frame, labels, policy), "int8_dropped": int8}
        record_parity(folder, report)
        sizes = bundle_bytes(folder)
        timings = bundle_timings(folder, frame, config.timed_rows) if report["passed"] else {}
        published = False
        if report["passed"]:
            publish_bundle(registry, version, folder, report, sizes, step_identity())
            published = True
    finally:
        registry.close()
    summary = describe(report)
    context.log.info(f"version {version} bundle: {summary}; published: {published}")
    metadata = _metadata(report, sizes, timings)
    metadata.update(
        version=dg.MetadataValue.int(int(version)),
        family=dg.MetadataValue.text(native.family),
        published=dg.MetadataValue.bool(published),
        path=dg.MetadataValue.path(str(folder)),
    )
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name=PARITY_CHECK,
                passed=bool(report["passed"]),
                severity=dg.AssetCheckSeverity.ERROR,
                description=summary,
                metadata={
                    "rows": dg.MetadataValue.int(report["rows"]),
                    "fp32_tolerance": dg.MetadataValue.float(policy.fp32_tolerance),
                    "int8_max_abs_diff": dg.MetadataValue.float(policy.int8_max_abs_diff),
                    "int8_max_auc_drop": dg.MetadataValue.float(policy.int8_max_auc_drop),
                },
            )
        ],
    )


BUNDLE_ASSETS = [model_bundle]
