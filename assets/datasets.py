"""Each dataset folder's model: trained, gated with fairness, registered, scoring, monitored.

Built from ``datasets/<name>/dataset.yaml`` by factories, in the dataset's own group: the
model (LightGBM on the dataset's newest training set, ``keel.datasets.modeling``), its blocking
``gates`` check (the dataset's gate bounds over the defaults), and the registered model of the
dataset's own name; then each load's newest rows scored by it, and their drift against the
training set. The maths lives in ``keel.datasets``; these wrappers read and write files.
"""

import io
import json

import dagster as dg

from keel.datasets.spec import DatasetSpec, discover
from keel.files import atomic_write
from orchestration.resources import (
    ArtefactStore,
    FeatureStoreResource,
    MlflowResource,
    ModelGovernance,
)


def _judgement_path(artefacts: ArtefactStore, spec: DatasetSpec):
    return artefacts.path("models", spec.name, "judgement.json")


def dataset_model(spec: DatasetSpec) -> dg.AssetsDefinition:
    """The dataset's model, logged to its MLflow experiment with its gates and fairness."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "model"]),
        group_name=spec.name,
        kinds={"lightgbm", "mlflow"},
        deps=[dg.AssetKey([spec.name, "training_set"])],
        description=(
            f"LightGBM on the newest {spec.name} training set, judged on held-out rows: quality "
            "and fairness by protected attribute, logged to MLflow."
        ),
    )
    def _model(artefacts: ArtefactStore, mlflow: MlflowResource) -> dg.MaterializeResult:
        import tempfile
        from pathlib import Path

        import mlflow as ml
        import pandas as pd

        from keel.datasets.modeling import fairness_markdown, fit, judge, split
        from keel.reporting import markdown_table
        from keel.tracking import Lineage, code_version, dbt_lineage
        from orchestration.dbt import dbt_project

        pointer = json.loads(
            artefacts.path("training_sets", spec.feature_service, "latest.json").read_text()
        )
        training = pd.read_parquet(pointer["path"])
        parts = split(spec, training)
        model = fit(spec, parts)
        judgement = judge(spec, model, parts)
        fairness = fairness_markdown(judgement)
        lineage = Lineage(
            dataset_version=pointer["dataset_version"],
            training_set_path=pointer["path"],
            dagster_data_version=pointer["dataset_version"],
            feature_service=spec.feature_service,
            trained_by="dagster",
            code=code_version(commit=mlflow.code_commit),
            dbt=dbt_lineage(dbt_project.manifest_path, (spec.features_model, spec.labels_model)),
        )
        experiment = mlflow.configure(spec.experiment)
        with ml.start_run(experiment_id=experiment, tags=lineage.tags("lightgbm")) as run:
            ml.log_metrics(judgement.metrics)
            ml.log_params({"rounds": model.booster.best_iteration, **judgement.rows})
            ml.lightgbm.log_model(model.booster, name="model")
            with tempfile.TemporaryDirectory() as scratch:
                report = Path(scratch) / "fairness.md"
                report.write_text(fairness + "\n")
                ml.log_artifact(str(report))
        booster = artefacts.path("models", spec.name, run.info.run_id, "model.txt")
        atomic_write(booster, model.booster.model_to_string())
        record = {
            "run_id": run.info.run_id,
            "model_path": str(booster),
            "threshold": judgement.threshold["value"],
            "training_set": pointer["path"],
            "metrics": judgement.metrics,
            "gates": judgement.gates,
            "passed": judgement.passed,
            "rows": judgement.rows,
        }
        atomic_write(
            _judgement_path(artefacts, spec), json.dumps(record, indent=2, default=str) + "\n"
        )
        gates = markdown_table(
            ["gate", "passed", "detail"],
            [[g["name"], "yes" if g["passed"] else "**no**", g["detail"]] for g in judgement.gates],
        )
        return dg.MaterializeResult(
            metadata={
                "roc_auc": dg.MetadataValue.float(judgement.metrics["roc_auc"]),
                "all_gates_passed": dg.MetadataValue.bool(judgement.passed),
                "gates": dg.MetadataValue.md(gates),
                "fairness": dg.MetadataValue.md(fairness),
                "threshold": dg.MetadataValue.text(judgement.threshold["how"]),
                "rows": dg.MetadataValue.json(judgement.rows),
                "run_id": dg.MetadataValue.text(run.info.run_id),
                "experiment": dg.MetadataValue.text(spec.experiment),
            }
        )

    return _model


def dataset_gates(spec: DatasetSpec, model: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """Blocks registration unless every gate of the newest model passed."""

    @dg.asset_check(
        asset=model,
        name="gates",
        blocking=True,
        description="Quality and fairness gates of the dataset's policy (dataset.yaml gates).",
    )
    def _gates(artefacts: ArtefactStore) -> dg.AssetCheckResult:
        record = json.loads(_judgement_path(artefacts, spec).read_text())
        failed = [g["name"] for g in record["gates"] if not g["passed"]]
        return dg.AssetCheckResult(
            passed=not failed,
            description="failed: " + ", ".join(failed) if failed else "every gate passed",
            metadata={"gates": dg.MetadataValue.json(record["gates"])},
        )

    return _gates


def dataset_registered_model(spec: DatasetSpec, model: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The model registered under the dataset's own name, once its gates passed."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "registered_model"]),
        group_name=spec.name,
        kinds={"mlflow"},
        deps=[model],
        description=f"The newest {spec.name} model past its gates, as {spec.registered_model}.",
    )
    def _registered(
        artefacts: ArtefactStore, mlflow: MlflowResource, governance: ModelGovernance
    ) -> dg.MaterializeResult:
        record = json.loads(_judgement_path(artefacts, spec).read_text())
        registry = governance.registry(mlflow, model_name=spec.registered_model)
        version = registry.register(
            record["run_id"],
            metrics=record["metrics"],
            gates={g["name"]: g["passed"] for g in record["gates"]},
            actor="dagster",
            reason=f"{spec.name}: every gate of its policy passed",
        )
        registered = {**record, "version": str(version.version)}
        path = artefacts.path("models", spec.name, "registered.json")
        atomic_write(path, json.dumps(registered, indent=2, default=str) + "\n")
        return dg.MaterializeResult(
            metadata={
                "registered_model": dg.MetadataValue.text(spec.registered_model),
                "version": dg.MetadataValue.text(str(version.version)),
                "created": dg.MetadataValue.bool(bool(version.created)),
                "run_id": dg.MetadataValue.text(record["run_id"]),
            }
        )

    return _registered


def dataset_scores(spec: DatasetSpec, registered: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """Each entity's newest features scored by the registered model, once per load."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "scores"]),
        group_name=spec.name,
        kinds={"lightgbm", "parquet"},
        deps=[registered],
        description=(
            f"Every {spec.entity}'s newest {spec.name} features scored by the registered "
            "model, one file per load."
        ),
    )
    def _scores(artefacts: ArtefactStore, feature_store: FeatureStoreResource):
        import lightgbm as lgb
        import pandas as pd

        from keel.datasets.modeling import DatasetModel, newest_rows

        record = json.loads(artefacts.path("models", spec.name, "registered.json").read_text())
        model = DatasetModel(
            lgb.Booster(
                model_str=artefacts.path(
                    "models", spec.name, record["run_id"], "model.txt"
                ).read_text()
            ),
            spec.features,
            dict(spec.categorical_features),
        )
        mart = f"{feature_store.marts.rstrip('/')}/{spec.features_mart}"
        rows = newest_rows(spec, pd.read_parquet(mart))
        rows["score"] = model.predict(rows)
        rows["flagged"] = rows["score"] >= record["threshold"]
        load = pd.to_datetime(rows[spec.event_time]).max().strftime("%Y-%m-%d")
        target = artefacts.path("scores", spec.name, f"{load}.parquet")
        buffer = io.BytesIO()
        rows.to_parquet(buffer, index=False)
        atomic_write(target, buffer.getvalue())
        return dg.MaterializeResult(
            metadata={
                "rows": dg.MetadataValue.int(len(rows)),
                "load": dg.MetadataValue.text(load),
                "mean_score": dg.MetadataValue.float(float(rows["score"].mean())),
                "flagged_share": dg.MetadataValue.float(float(rows["flagged"].mean())),
                "version": dg.MetadataValue.text(record["version"]),
                "path": dg.MetadataValue.path(str(target)),
            }
        )

    return _scores


def dataset_drift(spec: DatasetSpec, scores: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """Feature drift of the newest scored load against the training set (PSI per feature)."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "drift"]),
        group_name=spec.name,
        kinds={"python"},
        deps=[scores],
        description=f"PSI per feature of the newest scored {spec.name} load against training.",
    )
    def _drift(artefacts: ArtefactStore):
        import pandas as pd

        from keel.datasets.modeling import feature_drift
        from keel.reporting import markdown_table

        record = json.loads(artefacts.path("models", spec.name, "registered.json").read_text())
        loads = sorted(artefacts.path("scores", spec.name).glob("*.parquet"))
        with loads[-1].open("rb") as handle:
            current = pd.read_parquet(handle)
        reference = pd.read_parquet(record["training_set"])
        rows = feature_drift(spec, reference, current)
        table = markdown_table(
            ["feature", "PSI", "drifted"],
            [[r["feature"], f"{r['psi']:.3f}", "**yes**" if r["drifted"] else "no"] for r in rows],
        )
        return dg.MaterializeResult(
            metadata={
                "drifted_features": dg.MetadataValue.int(sum(r["drifted"] for r in rows)),
                "drift_share": dg.MetadataValue.float(sum(r["drifted"] for r in rows) / len(rows)),
                "max_psi": dg.MetadataValue.float(max(r["psi"] for r in rows)),
                "features": dg.MetadataValue.md(table),
                "load": dg.MetadataValue.text(loads[-1].stem),
            }
        )

    return _drift


DATASET_MODELS = [dataset_model(spec) for spec in discover()]
DATASET_MODEL_GATES = [
    dataset_gates(spec, model) for spec, model in zip(discover(), DATASET_MODELS, strict=True)
]
DATASET_REGISTERED_MODELS = [
    dataset_registered_model(spec, model)
    for spec, model in zip(discover(), DATASET_MODELS, strict=True)
]
DATASET_SCORES = [
    dataset_scores(spec, registered)
    for spec, registered in zip(discover(), DATASET_REGISTERED_MODELS, strict=True)
]
DATASET_DRIFT = [
    dataset_drift(spec, scores) for spec, scores in zip(discover(), DATASET_SCORES, strict=True)
]
