"""Training assets: tuned LightGBM and PyTorch default-risk models, each one MLflow run.

The maths lives in ``keel.training``; these wrappers find the training set, pass config and
resources through, log the final fit with its lineage and report what a person checks first.
A preempted step is retried by Dagster and resumes: the Optuna study and the network's
checkpoint are keyed by the dataset version and the config, so the retry finds them.
"""

import json
import shutil
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from keel.schema import FEATURE_SERVICE
from orchestration.resources import ComputeResource, MlflowResource

if TYPE_CHECKING:
    from keel.training import TrainingOptions, TrainingOutcome

TRAINING_SET = dg.AssetKey("training_set")
GROUP = "training"

# A killed step (spot preemption, OOM kill) is retried after about 10, 20, then 40 seconds and
# resumes from its checkpoint and Optuna study.
PREEMPTION_RETRY = dg.RetryPolicy(
    max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
# The `gpu` tag marks the step (a job that carries it as a run tag is what the instance's `gpu`
# run limit counts); the k8s tag asks for a GPU when the step runs as a Kubernetes job
# (production profile) and is ignored elsewhere.
GPU_POOL = "gpu"
GPU_OP_TAGS = {
    "gpu": "true",
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"nvidia.com/gpu": "1"},
                "limits": {"nvidia.com/gpu": "1"},
            }
        }
    },
}


class TrainingConfig(dg.Config):
    """Settings shared by both model families."""

    trials: int = Field(default=20, ge=0, description="Optuna trials per study (0: defaults).")
    time_budget_s: float = Field(
        default=900.0, gt=0, description="Tuning time limit per run (when not reproducible)."
    )
    reproducible: bool = Field(
        default=True,
        description="The trial count alone ends tuning, so a retried run ends as one run would.",
    )
    seed: int = Field(default=7, description="Seed for sampling, weights and batch order.")
    validation_days: int = Field(default=7, ge=1, description="Validation window length.")
    test_days: int = Field(default=7, ge=1, description="Test window (latest days) length.")
    trained_by: str = Field(default="", description="Who trains; empty means the OS user.")
    training_set_path: str = Field(
        default="", description="Parquet path; empty reads the latest `training_set` event."
    )
    dataset_version: str = Field(
        default="", description="Content hash of training_set_path; set both or neither."
    )
    feature_service: str = Field(
        default=FEATURE_SERVICE, description="Used when the training set does not name one."
    )


class LightGBMConfig(TrainingConfig):
    """LightGBM fit limits."""

    max_rounds: int = Field(default=2000, ge=1, description="Upper bound on boosting rounds.")
    early_stopping_rounds: int = Field(default=50, ge=1, description="Rounds without gain.")


class TorchConfig(TrainingConfig):
    """Network fit limits."""

    max_epochs: int = Field(default=30, ge=1, description="Upper bound on final-fit epochs.")
    patience: int = Field(default=5, ge=1, description="Epochs without gain before stopping.")
    tuning_epochs: int = Field(default=8, ge=1, description="Epochs per Optuna trial.")


def _training_source(context: dg.AssetExecutionContext, config: TrainingConfig) -> dict[str, str]:
    """Path, dataset version, Dagster data version and feature service of the training set."""
    if bool(config.training_set_path) != bool(config.dataset_version):
        raise dg.Failure(
            "set both training_set_path and dataset_version in config, or neither",
            allow_retries=False,
        )
    if config.training_set_path:
        return {
            "path": config.training_set_path,
            "dataset_version": config.dataset_version,
            "dagster_data_version": "none: training set passed through config",
            "feature_service": config.feature_service,
        }
    event = context.instance.get_latest_materialization_event(TRAINING_SET)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            "the `training_set` asset has no materialisation yet: materialise it first, or pass "
            "training_set_path and dataset_version in config",
            allow_retries=False,
        )
    materialisation = event.asset_materialization
    metadata = {key: value.value for key, value in materialisation.metadata.items()}
    missing = [key for key in ("path", "dataset_version") if not metadata.get(key)]
    if missing:
        raise dg.Failure(
            f"the latest `training_set` materialisation (run {event.run_id}) lacks metadata "
            f"{', '.join(missing)}",
            allow_retries=False,
        )
    return {
        "path": str(metadata["path"]),
        "dataset_version": str(metadata["dataset_version"]),
        "dagster_data_version": materialisation.tags.get("dagster/data_version", "")
        if materialisation.tags
        else "",
        "feature_service": str(metadata.get("feature_service") or config.feature_service),
    }


def _options(config: TrainingConfig, compute: ComputeResource) -> "TrainingOptions":
    from keel.training import TrainingOptions

    limits: dict[str, Any] = {
        name: getattr(config, name)
        for name in (
            "max_rounds",
            "early_stopping_rounds",
            "max_epochs",
            "patience",
            "tuning_epochs",
        )
        if hasattr(config, name)
    }
    return TrainingOptions(
        trials=config.trials,
        time_budget_s=config.time_budget_s,
        reproducible=config.reproducible,
        seed=config.seed,
        validation_days=config.validation_days,
        test_days=config.test_days,
        num_threads=compute.num_threads,
        **limits,
    )


def _train_and_log(
    family: str,
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from keel.tabular_net import CheckpointMismatchError, DeviceError
    from keel.tracking import LineageError, collect_lineage, log_training_run
    from keel.training import TrainingDataError, load_training_set, train_family

    source = _training_source(context, config)
    options = _options(config, compute)
    try:
        lineage = collect_lineage(
            dataset_version=source["dataset_version"],
            training_set_path=source["path"],
            dagster_data_version=source["dagster_data_version"],
            feature_service=source["feature_service"],
            trained_by=config.trained_by,
            code_commit=mlflow.code_commit,
        )
        device = compute.torch_device() if family == "torch" else "cpu"
        outcome = train_family(
            family,
            load_training_set(source["path"]),
            dataset_version=source["dataset_version"],
            options=options,
            study_storage=compute.optuna_storage(),
            checkpoint_root=compute.checkpoint_root(),
            device=device,
            log=context.log.info,
        )
    except (TrainingDataError, LineageError, DeviceError, CheckpointMismatchError) as error:
        # Bad inputs fail the same way on every try: retrying only delays the message.
        raise dg.Failure(str(error), allow_retries=False) from error
    experiment_id = mlflow.configure()
    with mlflow.write_lock():
        logged = log_training_run(
            outcome, lineage, experiment_id=experiment_id, settings=options.for_family(family)
        )
    # Logged for good: a later retry must start a fresh fit, not resume this one.
    if outcome.checkpoint_dir is not None:
        shutil.rmtree(outcome.checkpoint_dir, ignore_errors=True)
    context.log.info(f"{family}: logged run {logged.run_id} ({logged.model_uri})")
    return dg.MaterializeResult(
        metadata=_metadata(outcome, logged, source["dataset_version"]),
    )


def _metadata(outcome: "TrainingOutcome", logged: Any, dataset_version: str) -> dict[str, Any]:
    metrics = outcome.metrics
    metadata: dict[str, Any] = {
        "validation_auc": dg.MetadataValue.float(metrics["validation_auc"]),
        "test_auc": dg.MetadataValue.float(metrics["test_auc"]),
        "test_log_loss": dg.MetadataValue.float(metrics["test_log_loss"]),
        "run_id": dg.MetadataValue.text(logged.run_id),
        "model_uri": dg.MetadataValue.text(logged.model_uri),
        "logged_model_uri": dg.MetadataValue.text(logged.logged_model_uri),
        "dataset_version": dg.MetadataValue.text(dataset_version),
        "best_params": dg.MetadataValue.json(json.loads(json.dumps(outcome.best_params))),
        "best_trial": dg.MetadataValue.int(
            -1 if outcome.tuning.best_trial is None else outcome.tuning.best_trial
        ),
        "finished_trials": dg.MetadataValue.int(outcome.tuning.finished_trials),
        "train_rows": dg.MetadataValue.int(outcome.rows["train"]),
        "validation_rows": dg.MetadataValue.int(outcome.rows["validation"]),
        "test_rows": dg.MetadataValue.int(outcome.rows["test"]),
        "training_seconds": dg.MetadataValue.float(outcome.seconds),
    }
    for key, value in outcome.details.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            continue
        if isinstance(value, str):
            metadata[key] = dg.MetadataValue.text(value)
        elif isinstance(value, int):
            metadata[key] = dg.MetadataValue.int(value)
        else:
            metadata[key] = dg.MetadataValue.float(value)
    return metadata


@dg.asset(
    deps=[TRAINING_SET],
    group_name=GROUP,
    kinds={"lightgbm", "optuna", "mlflow"},
    retry_policy=PREEMPTION_RETRY,
)
def lightgbm_model(
    context: dg.AssetExecutionContext,
    config: LightGBMConfig,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """LightGBM default-risk model tuned with Optuna on the time-split training set, in MLflow."""
    return _train_and_log("lightgbm", context, config, mlflow, compute)


@dg.asset(
    deps=[TRAINING_SET],
    group_name=GROUP,
    kinds={"pytorch", "optuna", "mlflow"},
    retry_policy=PREEMPTION_RETRY,
    op_tags=GPU_OP_TAGS,
    # Steps in a pool share its slots across runs: one GPU step at a time locally.
    pool=GPU_POOL,
)
def torch_model(
    context: dg.AssetExecutionContext,
    config: TorchConfig,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """PyTorch tabular-network default-risk model, tuned, checkpointed each epoch, in MLflow."""
    return _train_and_log("torch", context, config, mlflow, compute)
