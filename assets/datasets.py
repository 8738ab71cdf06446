"""Each dataset folder's model: trained, gated with fairness, registered, scoring, monitored.

Built from ``datasets/<name>/dataset.yaml`` by factories, in the dataset's own group: the
model (every family of ``model.families`` on the dataset's newest training set, each its own
MLflow run, ``keel.datasets.families``), its blocking ``gates`` check (the dataset's gate
bounds over the defaults; passes when a family passed them all), and the champion (the best
ROC AUC among those) registered under the dataset's own name; then the rows scored by it and
their drift against the training set: per day for a daily dataset (whose raw table loads a
landing file a day), per load for a snapshot. The maths lives in ``keel.datasets``; these
wrappers read and write files.
"""

import io
import json

import dagster as dg

from assets.ingestion import validation_check
from keel.datasets.spec import DatasetSpec, discover
from keel.files import atomic_write
from orchestration.pools import WAREHOUSE_POOL
from orchestration.resources import (
    ArtefactStore,
    FeatureStoreResource,
    MlflowResource,
    ModelGovernance,
    SourcesResource,
    WarehouseResource,
)

# The Dagster UI's icon names of the families.
KINDS = {"lightgbm": "lightgbm", "torch": "pytorch"}


def _judgement_path(artefacts: ArtefactStore, spec: DatasetSpec):
    return artefacts.path("models", spec.name, "judgement.json")


def _log_family(
    spec: DatasetSpec, mlflow: MlflowResource, experiment: str, lineage, fitted, judgement, report
) -> str:
    """One family's MLflow run: lineage tags, metrics, its model and its fairness report."""
    import tempfile
    from pathlib import Path

    import mlflow as ml

    from keel.datasets.families import model_files
    from keel.tracking import MODEL_REQUIREMENTS, package_versions

    with (
        mlflow.write_lock(),
        tempfile.TemporaryDirectory() as scratch,
        ml.start_run(
            experiment_id=experiment,
            run_name=f"{spec.name}-{fitted.family}",
            tags=lineage.tags(fitted.family),
        ) as run,
    ):
        ml.log_metrics(judgement.metrics)
        ml.log_params({**fitted.details, **judgement.rows})
        if fitted.family == "lightgbm":
            ml.lightgbm.log_model(fitted.estimator, name="model")
        else:
            folder = Path(scratch, "risk_model")
            folder.mkdir()
            for name, data in model_files(fitted).items():
                folder.joinpath(name).write_bytes(data)
            versions = package_versions()
            ml.pyfunc.log_model(
                name="model",
                loader_module="keel.tracking",
                data_path=str(folder),
                pip_requirements=[
                    f"{name}=={versions[name]}"
                    for name in MODEL_REQUIREMENTS[fitted.family]
                    if name in versions
                ],
            )
        Path(scratch, "fairness.md").write_text(report + "\n")
        ml.log_artifact(str(Path(scratch, "fairness.md")))
    return run.info.run_id


def _trainer() -> str:
    from keel.access import AccessError
    from keel.access.store import acting_name

    try:
        return acting_name()
    except AccessError as error:
        raise dg.Failure(f"no identity to train as: {error}") from error


def dataset_model(spec: DatasetSpec) -> dg.AssetsDefinition:
    """Every family of the dataset, each its own MLflow run, judged alike; the champion chosen."""
    families = ", ".join(spec.families)

    @dg.asset(
        key=dg.AssetKey([spec.name, "model"]),
        group_name=spec.name,
        kinds={KINDS[family] for family in spec.families} | {"mlflow"},
        deps=[dg.AssetKey([spec.name, "training_set"])],
        description=(
            f"{families} on the newest {spec.name} training set, each judged on the same "
            "held-out rows (quality and fairness by protected attribute) and logged to MLflow; "
            "the champion is the best ROC AUC among those that pass."
        ),
    )
    def _model(artefacts: ArtefactStore, mlflow: MlflowResource) -> dg.MaterializeResult:
        import pandas as pd

        from keel.datasets.families import champion, fit_family, model_files
        from keel.datasets.modeling import fairness_markdown, families_markdown, judge, split
        from keel.reporting import markdown_table
        from keel.tracking import Lineage, code_version, dbt_lineage
        from orchestration.dbt import dbt_project

        pointer = json.loads(
            artefacts.path("training_sets", spec.feature_service, "latest.json").read_text()
        )
        training = pd.read_parquet(pointer["path"])
        parts = split(spec, training)
        lineage = Lineage(
            dataset_version=pointer["dataset_version"],
            training_set_path=pointer["path"],
            dagster_data_version=pointer["dataset_version"],
            feature_service=spec.feature_service,
            # The step's identity, as every trainer's (four-eyes compares it with approvers').
            trained_by=_trainer(),
            code=code_version(commit=mlflow.code_commit),
            dbt=dbt_lineage(dbt_project.manifest_path, (spec.features_model, spec.labels_model)),
        )
        experiment = mlflow.configure(spec.experiment)
        judgements, records = {}, {}
        for family in spec.families:
            fitted = fit_family(spec, family, parts)
            judgement = judge(spec, fitted, parts)
            report = fairness_markdown(judgement)
            run_id = _log_family(spec, mlflow, experiment, lineage, fitted, judgement, report)
            files = model_files(fitted)
            for name, data in files.items():
                atomic_write(artefacts.path("models", spec.name, run_id, name), data)
            judgements[family] = judgement
            records[family] = {
                "family": family,
                "run_id": run_id,
                "threshold": judgement.threshold["value"],
                "metrics": judgement.metrics,
                "gates": judgement.gates,
                "passed": judgement.passed,
                "details": fitted.details,
                "files": sorted(files),
            }
        chosen = champion(judgements)
        fairness = families_markdown(judgements, chosen)
        atomic_write(artefacts.path("models", spec.name, "fairness.md"), fairness + "\n")
        record = {
            "champion": chosen,
            "families": records,
            "training_set": pointer["path"],
            "rows": judgements[spec.families[0]].rows,
        }
        atomic_write(
            _judgement_path(artefacts, spec), json.dumps(record, indent=2, default=str) + "\n"
        )
        gates = markdown_table(
            ["family", "ROC AUC", "gate", "passed", "detail"],
            [
                [r["family"], f"{r['metrics']['roc_auc']:.3f}", g["name"], _yes(g), g["detail"]]
                for r in records.values()
                for g in r["gates"]
            ],
        )
        best = records[chosen] if chosen else max(records.values(), key=_auc)
        return dg.MaterializeResult(
            metadata={
                "champion": dg.MetadataValue.text(chosen or "none"),
                "roc_auc": dg.MetadataValue.float(best["metrics"]["roc_auc"]),
                **{
                    f"roc_auc_{family}": dg.MetadataValue.float(r["metrics"]["roc_auc"])
                    for family, r in records.items()
                },
                **{
                    f"gates_passed_{family}": dg.MetadataValue.bool(r["passed"])
                    for family, r in records.items()
                },
                "all_gates_passed": dg.MetadataValue.bool(chosen is not None),
                "gates": dg.MetadataValue.md(gates),
                "fairness": dg.MetadataValue.md(fairness),
                "rows": dg.MetadataValue.json(judgements[spec.families[0]].rows),
                "run_ids": dg.MetadataValue.json({f: r["run_id"] for f, r in records.items()}),
                "experiment": dg.MetadataValue.text(spec.experiment),
            }
        )

    return _model


def _yes(gate: dict) -> str:
    return "yes" if gate["passed"] else "**no**"


def _auc(record: dict) -> float:
    return record["metrics"]["roc_auc"]


def dataset_gates(spec: DatasetSpec, model: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """Blocks registration unless some family of the newest model passed every gate."""

    @dg.asset_check(
        asset=model,
        name="gates",
        blocking=True,
        description=(
            "Quality and fairness gates of the dataset's policy (dataset.yaml gates), per "
            "family: passes when at least one family passed them all (the champion)."
        ),
    )
    def _gates(artefacts: ArtefactStore) -> dg.AssetCheckResult:
        record = json.loads(_judgement_path(artefacts, spec).read_text())
        failed = {
            family: [g["name"] for g in r["gates"] if not g["passed"]]
            for family, r in record["families"].items()
        }
        verdicts = "; ".join(
            f"{family}: failed {', '.join(names)}" if names else f"{family}: every gate passed"
            for family, names in failed.items()
        )
        chosen = record["champion"]
        return dg.AssetCheckResult(
            passed=chosen is not None,
            description=f"champion {chosen}; {verdicts}" if chosen else f"no champion; {verdicts}",
            metadata={
                "champion": dg.MetadataValue.text(chosen or "none"),
                "gates": dg.MetadataValue.json(
                    {family: r["gates"] for family, r in record["families"].items()}
                ),
            },
        )

    return _gates


def registration(record: dict) -> dict:
    """What the registry records for the champion: its run, metrics, gates and challengers.

    Raises ``ValueError`` when no family passed every gate: a failed family is never
    registered.
    """
    chosen = record["champion"]
    if chosen is None:
        raise ValueError("no family passed every gate: nothing to register")
    champion = record["families"][chosen]
    tags = {"keel.champion_family": chosen}
    for family, other in record["families"].items():
        if family == chosen:
            continue
        tags[f"keel.challenger.{family}.gates_passed"] = "true" if other["passed"] else "false"
        tags.update(
            {
                f"keel.challenger.{family}.{k}": f"{float(v):.6g}"
                for k, v in other["metrics"].items()
            }
        )
    return {
        "run_id": champion["run_id"],
        "metrics": champion["metrics"],
        "gates": {g["name"]: g["passed"] for g in champion["gates"]},
        "extra_tags": tags,
    }


def dataset_registered_model(spec: DatasetSpec, model: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The champion registered under the dataset's own name, once its gates passed."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "registered_model"]),
        group_name=spec.name,
        kinds={"mlflow"},
        deps=[model],
        description=(
            f"The newest {spec.name} champion past its gates, as {spec.registered_model}, with "
            "its family and the challengers' metrics."
        ),
    )
    def _registered(
        artefacts: ArtefactStore, mlflow: MlflowResource, governance: ModelGovernance
    ) -> dg.MaterializeResult:
        from assets.registry import step_identity

        record = json.loads(_judgement_path(artefacts, spec).read_text())
        try:
            candidate = registration(record)
        except ValueError as error:
            raise dg.Failure(f"{spec.name}: {error}") from error
        chosen = record["champion"]
        with governance.registry(mlflow, model_name=spec.registered_model) as registry:
            version = registry.register(
                candidate["run_id"],
                metrics=candidate["metrics"],
                gates=candidate["gates"],
                actor=step_identity(),
                reason=f"{spec.name}: {chosen}, the best family past every gate of its policy",
                extra_tags=candidate["extra_tags"],
            )
        registered = {
            **record["families"][chosen],
            "training_set": record["training_set"],
            "version": str(version.version),
        }
        path = artefacts.path("models", spec.name, "registered.json")
        atomic_write(path, json.dumps(registered, indent=2, default=str) + "\n")
        return dg.MaterializeResult(
            metadata={
                "registered_model": dg.MetadataValue.text(spec.registered_model),
                "version": dg.MetadataValue.text(str(version.version)),
                "family": dg.MetadataValue.text(chosen),
                "created": dg.MetadataValue.bool(bool(version.created)),
                "run_id": dg.MetadataValue.text(candidate["run_id"]),
                "challengers": dg.MetadataValue.json(
                    {f: r["metrics"] for f, r in record["families"].items() if f != chosen}
                ),
            }
        )

    return _registered


def partitions(spec: DatasetSpec) -> dg.DailyPartitionsDefinition | None:
    """A daily dataset's days from its first; None for a snapshot dataset."""
    return (
        dg.DailyPartitionsDefinition(start_date=spec.first_day)
        if spec.partitions == "daily"
        else None
    )


def dataset_landing_raw(spec: DatasetSpec) -> dg.AssetsDefinition:
    """A daily dataset's raw table: each day's landing file as that day's partition."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "raw"]),
        group_name=spec.name,
        kinds={"python", "duckdb"},
        partitions_def=partitions(spec),
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=WAREHOUSE_POOL,
        code_version="1",
        description=f"{spec.description} A landing file a day ({spec.source.path}), as delivered.",
    )
    def _raw(
        context: dg.AssetExecutionContext, sources: SourcesResource, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        from keel.datasets.landing import LandingError, landing_files
        from keel.ingestion import dataset_table, load_partition

        try:
            files = landing_files(spec, sources.landing_dir, context.partition_keys)
        except LandingError as error:
            raise dg.Failure(str(error)) from error
        table = dataset_table(spec)
        with warehouse.connect() as connection:
            rows = {
                day: load_partition(connection, table, day, path, rename=spec.source.rename)
                for day, path in files.items()
            }
        return dg.MaterializeResult(
            metadata={
                "rows": dg.MetadataValue.int(sum(rows.values())),
                "partitions": dg.MetadataValue.int(len(rows)),
                "source": dg.MetadataValue.text(sources.landing_dir),
            }
        )

    return _raw


def _registered_model(artefacts: ArtefactStore, spec: DatasetSpec):
    from keel.datasets.families import model_from_files

    record = json.loads(artefacts.path("models", spec.name, "registered.json").read_text())
    folder = ("models", spec.name, record["run_id"])
    files = {name: artefacts.path(*folder, name).read_bytes() for name in record["files"]}
    return record, model_from_files(files)


def dataset_scores(spec: DatasetSpec, registered: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The registered model's scores: per day for a daily dataset, else per load."""
    daily = spec.partitions == "daily"

    @dg.asset(
        key=dg.AssetKey([spec.name, "scores"]),
        group_name=spec.name,
        kinds={"python", "parquet"},
        deps=[registered],
        partitions_def=partitions(spec),
        description=(
            f"Every {spec.entity}'s newest {spec.name} features "
            + ("of the day" if daily else "of the load")
            + " scored by the registered model, one file "
            + ("per day." if daily else "per load.")
        ),
    )
    def _scores(
        context: dg.AssetExecutionContext,
        artefacts: ArtefactStore,
        feature_store: FeatureStoreResource,
    ):
        import pandas as pd

        from keel.datasets.landing import day_rows
        from keel.datasets.modeling import newest_rows

        record, model = _registered_model(artefacts, spec)
        mart = f"{feature_store.marts.rstrip('/')}/{spec.features_mart}"
        features = pd.read_parquet(mart)
        if daily:
            load = context.partition_key
            rows = day_rows(spec, features, load)
            if rows.empty:
                raise dg.Failure(f"{spec.name}: no {spec.features_model} rows stamped {load}")
        else:
            rows = newest_rows(spec, features)
            load = pd.to_datetime(rows[spec.event_time]).max().strftime("%Y-%m-%d")
        rows["score"] = model.predict(rows)
        rows["flagged"] = rows["score"] >= record["threshold"]
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
                "family": dg.MetadataValue.text(record["family"]),
                "path": dg.MetadataValue.path(str(target)),
            }
        )

    return _scores


def dataset_drift(spec: DatasetSpec, scores: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """Feature drift of a scored day (or the newest load) against the training set."""
    daily = spec.partitions == "daily"

    @dg.asset(
        key=dg.AssetKey([spec.name, "drift"]),
        group_name=spec.name,
        kinds={"python"},
        deps=[scores],
        partitions_def=partitions(spec),
        description=(
            f"PSI per feature of the {'day' if daily else 'newest load'} of {spec.name} "
            "scores against the training set."
        ),
    )
    def _drift(context: dg.AssetExecutionContext, artefacts: ArtefactStore):
        import pandas as pd

        from keel.datasets.modeling import feature_drift
        from keel.reporting import markdown_table

        record = json.loads(artefacts.path("models", spec.name, "registered.json").read_text())
        if daily:
            load = artefacts.path("scores", spec.name, f"{context.partition_key}.parquet")
        else:
            load = sorted(artefacts.path("scores", spec.name).glob("*.parquet"))[-1]
        with load.open("rb") as handle:
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
                "load": dg.MetadataValue.text(load.stem),
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
# Daily datasets landing one file a day (a file source is loaded whole by assets.ingestion).
LANDING_DATASETS = [spec for spec in discover() if spec.source.kind == "landing"]
DATASET_LANDING_RAW = [dataset_landing_raw(spec) for spec in LANDING_DATASETS]
DATASET_LANDING_CHECKS = [
    validation_check(raw, spec.raw_table)
    for spec, raw in zip(LANDING_DATASETS, DATASET_LANDING_RAW, strict=True)
]
