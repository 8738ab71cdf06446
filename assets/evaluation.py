"""Evaluation assets: the challenger judged against the champion, with the gates as checks.

The maths lives in ``keel.evaluation``. The gate results are emitted by the evaluation asset
itself as blocking checks, so a failed gate stops the registration step of the same run and
every result belongs to the evaluation that produced it, even when runs overlap.
"""

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from keel.gates import GATE_NAMES
from orchestration.resources import ArtefactStore, MlflowResource, ModelGovernance

if TYPE_CHECKING:
    from keel.evaluation import Candidate, Evaluation

GROUP = "evaluation"
CANDIDATE_KEYS = (dg.AssetKey("lightgbm_model"), dg.AssetKey("torch_model"))
EVALUATION_KEY = dg.AssetKey("challenger_evaluation")
DEFAULT_SPLIT_DAYS = 7

GATE_DESCRIPTIONS = {
    "minimum_quality": "ROC AUC on the held-out window reaches the policy's minimum.",
    "no_regression": "ROC AUC is no worse than the champion's beyond the tolerance "
    "(passes with a note for the first model, which has no champion).",
    "fairness": "Demographic parity and equalized odds differences stay within bounds for "
    "every protected attribute.",
    "latency_sla": "Single-row p99 latency, batch throughput and model size meet the SLA.",
}


class EvaluationConfig(dg.Config):
    """Which models to compare and how hard to time them."""

    challenger_uri: str = Field(
        default="",
        description="MLflow URI of the challenger; empty takes the better of lightgbm_model and "
        "torch_model by validation AUC.",
    )
    torch_model_uri: str = Field(
        default="",
        description="PyTorch model whose FP16/INT8 variants are measured; empty takes the "
        "challenger if it is PyTorch, else the latest torch_model.",
    )
    validation_days: int = Field(
        default=0, ge=0, description="Validation window; 0 reuses the challenger run's setting."
    )
    test_days: int = Field(
        default=0, ge=0, description="Held-out window; 0 reuses the challenger run's setting."
    )
    single_row_calls: int = Field(default=200, ge=10, description="Timed one-row predictions.")
    batch_rows: int = Field(default=10_000, ge=100, description="Rows in the throughput batch.")
    seed: int = Field(default=0, description="Seeds the bootstrap and the timed rows.")


def materialisation_metadata(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, key: dg.AssetKey
) -> dict[str, Any] | None:
    """Metadata of ``key``'s materialisation in this run, else of its latest one."""
    records = context.instance.get_records_for_run(
        context.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in reversed(records):
        materialisation = record.event_log_entry.asset_materialization
        if materialisation is not None and materialisation.asset_key == key:
            return {name: value.value for name, value in materialisation.metadata.items()}
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def _pick_challenger(context: dg.AssetExecutionContext, config: EvaluationConfig) -> dict:
    if config.challenger_uri:
        return {"uri": config.challenger_uri, "chosen_because": "named in the run config"}
    candidates = []
    for key in CANDIDATE_KEYS:
        metadata = materialisation_metadata(context, key)
        if metadata and metadata.get("model_uri"):
            candidates.append((float(metadata["validation_auc"]), key.to_user_string(), metadata))
    if not candidates:
        raise dg.Failure(
            "no candidate model: materialise lightgbm_model or torch_model first, or set "
            "challenger_uri in the run config"
        )
    auc, name, metadata = max(candidates, key=lambda candidate: candidate[0])
    others = ", ".join(f"{n} {a:.4f}" for a, n, _ in candidates if n != name)
    return {
        "uri": str(metadata["model_uri"]),
        "chosen_because": f"best validation AUC: {name} {auc:.4f}"
        + (f" over {others}" if others else ""),
    }


def _run_id_of(client: Any, uri: str) -> str:
    """The MLflow run behind a ``runs:/``, ``models:/m-...`` or registry URI."""
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    if uri.startswith("models:/m-"):
        return client.get_logged_model(uri.removeprefix("models:/")).source_run_id
    raise dg.Failure(f"cannot tell which training run produced {uri}; use a runs:/ URI")


def artefact_bytes(uri: str) -> int:
    """On-disk size of a logged model (what serving downloads and loads)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="keel-size-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
        return sum(path.stat().st_size for path in local.rglob("*") if path.is_file())


def _candidate(uri: str, details: dict[str, Any]) -> "Candidate":
    from keel.evaluation import Candidate
    from keel.training import load_risk_model

    return Candidate(load_risk_model(uri), uri, artefact_bytes(uri), details)


def _held_out_windows(path: str, validation_days: int, test_days: int):
    from keel.training.data import read_held_out_windows

    # Only the two windows are read, not the whole training set.
    return read_held_out_windows(path, validation_days, test_days)


def add_shadow_gate(
    instance: dg.DagsterInstance, client: Any, model_name: str, run_id: str, summary: dict
) -> str:
    """Add the shadow gate of the challenger's newest shadow report to ``summary``; says what.

    A shadow is a registered version, so the challenger run's versions are looked up.
    """
    from assets.serving import latest_shadow_comparison
    from keel.gates import with_shadow_gate

    found_versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    versions = sorted((str(v.version) for v in found_versions), key=int, reverse=True)
    found = latest_shadow_comparison(instance, versions) if versions else None
    if found is None:
        return "no shadow report of this challenger"
    comparison, day, version = found
    source = f"shadow report {day} of version {version}"
    gate = with_shadow_gate(summary, comparison, source)
    return gate["detail"] if gate else f"{source}: too few shadowed rows to judge"


def _metadata(
    evaluation: "Evaluation", report_path: str, evaluation_path: str
) -> tuple[dict[str, Any], dict[str, bytes]]:
    from keel.evaluation import markdown_image, markdown_tables

    summary = evaluation.summary
    challenger, comparison = summary["challenger"], summary["comparison"]
    images = evaluation.images()
    metadata: dict[str, Any] = {
        "all_gates_passed": dg.MetadataValue.bool(evaluation.all_gates_passed),
        "challenger_uri": dg.MetadataValue.text(challenger["uri"]),
        "challenger_family": dg.MetadataValue.text(challenger["family"]),
        "champion_uri": dg.MetadataValue.text(
            summary["champion"]["uri"] if summary["champion"] else "none (first model)"
        ),
        "roc_auc": dg.MetadataValue.float(challenger["quality"]["roc_auc"]),
        "pr_auc": dg.MetadataValue.float(challenger["quality"]["pr_auc"]),
        "threshold": dg.MetadataValue.float(challenger["threshold"]["value"]),
        "latency_p99_ms": dg.MetadataValue.float(challenger["serving"]["latency_p99_ms"]),
        "throughput_rows_per_s": dg.MetadataValue.float(
            challenger["serving"]["throughput_rows_per_s"]
        ),
        "held_out_rows": dg.MetadataValue.int(summary["window"]["rows"]),
        "report": dg.MetadataValue.path(report_path),
        "evaluation_path": dg.MetadataValue.path(evaluation_path),
        "run_id": dg.MetadataValue.text(challenger["details"]["run_id"]),
        "dataset_version": dg.MetadataValue.text(challenger["details"]["dataset_version"]),
    }
    if comparison:
        metadata["auc_difference"] = dg.MetadataValue.float(comparison["auc"]["difference"])
        metadata["auc_difference_ci_low"] = dg.MetadataValue.float(comparison["auc"]["low"])
        metadata["auc_difference_ci_high"] = dg.MetadataValue.float(comparison["auc"]["high"])
    for name, table in markdown_tables(summary).items():
        metadata[f"{name}_table"] = dg.MetadataValue.md(table)
    metadata["curves_plot"] = dg.MetadataValue.md(markdown_image(images["curves"], "ROC and PR"))
    metadata["reliability_plot"] = dg.MetadataValue.md(
        markdown_image(images["reliability"], "reliability")
    )
    metadata["fairness_plot"] = dg.MetadataValue.md(markdown_image(images["fairness"], "fairness"))
    return metadata, images


@dg.asset(
    deps=list(CANDIDATE_KEYS),
    group_name=GROUP,
    kinds={"python", "mlflow", "html"},
    check_specs=[
        dg.AssetCheckSpec(
            name, asset=EVALUATION_KEY, blocking=True, description=GATE_DESCRIPTIONS[name]
        )
        for name in GATE_NAMES
    ],
)
def challenger_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    mlflow: MlflowResource,
    artefacts: ArtefactStore,
    governance: ModelGovernance,
) -> dg.MaterializeResult:
    """Challenger versus champion on one held-out window: quality, fairness, cost, HTML report."""
    from mlflow import MlflowClient

    from keel.evaluation import ServingProbe, evaluate, html_report
    from keel.files import atomic_write
    from keel.serving.guardrails import score_histogram

    mlflow.configure()
    client = MlflowClient(mlflow.tracking_uri, mlflow.registry_uri)
    picked = _pick_challenger(context, config)
    run_id = _run_id_of(client, picked["uri"])
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    if "keel.training_set_path" not in tags:
        raise dg.Failure(f"run {run_id} has no keel.training_set_path tag: not a Keel training run")
    validation_days = config.validation_days or int(
        params.get("setting.validation_days", DEFAULT_SPLIT_DAYS)
    )
    test_days = config.test_days or int(params.get("setting.test_days", DEFAULT_SPLIT_DAYS))
    validation, test = _held_out_windows(tags["keel.training_set_path"], validation_days, test_days)
    details = {
        "run_id": run_id,
        "dataset_version": tags.get("keel.dataset_version", ""),
        "chosen_because": picked["chosen_because"],
        "validation_days": validation_days,
        "test_days": test_days,
    }
    challenger = _candidate(picked["uri"], details)

    registry = governance.registry(mlflow)
    try:
        champion_version = registry.champion()
    finally:
        registry.close()
    champion = None
    if champion_version is not None:
        # The version number, not the alias: the alias may move while this step runs.
        uri = f"models:/{registry.name}/{champion_version}"
        champion = _candidate(uri, {"version": champion_version})

    variants_of = None
    if config.torch_model_uri:
        variants_of = _candidate(config.torch_model_uri, {}).model
    elif challenger.model.family == "torch":
        variants_of = challenger.model
    else:
        torch_metadata = materialisation_metadata(context, dg.AssetKey("torch_model"))
        if torch_metadata and torch_metadata.get("model_uri"):
            variants_of = _candidate(str(torch_metadata["model_uri"]), {}).model

    probe = ServingProbe(single_row_calls=config.single_row_calls, batch_rows=config.batch_rows)
    evaluation = evaluate(
        challenger,
        champion,
        validation,
        test,
        governance.gate_policy(),
        probe=probe,
        variants_of=variants_of,
        seed=config.seed,
    )
    # Stored with the registered version: the canary's expected live score distribution.
    evaluation.summary["challenger"]["score_histogram"] = score_histogram(
        evaluation.challenger_scores
    )
    shadow = add_shadow_gate(context.instance, client, registry.name, run_id, evaluation.summary)
    report_target = artefacts.path("evaluation", context.run_id, "report.html")
    summary_target = artefacts.path("evaluation", context.run_id, "evaluation.json")
    summary = json.dumps(evaluation.summary, indent=2, default=str).encode()
    atomic_write(summary_target, summary)
    metadata, images = _metadata(evaluation, str(report_target), str(summary_target))
    # registered_model reads the gates from the file only while it still has these bytes.
    metadata["evaluation_sha256"] = dg.MetadataValue.text(hashlib.sha256(summary).hexdigest())
    metadata["shadow_gate"] = dg.MetadataValue.text(shadow)
    atomic_write(report_target, html_report(evaluation.summary, images))
    context.log.info(
        f"challenger {picked['uri']} ({picked['chosen_because']}) against "
        f"{champion.uri if champion else 'no champion'}: "
        + ", ".join(
            f"{g['name']} {'PASS' if g['passed'] else 'FAIL'}" for g in evaluation.summary["gates"]
        )
    )
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name=gate["name"],
                passed=bool(gate["passed"]),
                severity=dg.AssetCheckSeverity.ERROR,
                description=gate["detail"],
                metadata={
                    "detail": dg.MetadataValue.text(gate["detail"]),
                    "value": dg.MetadataValue.float(float(gate["value"]))
                    if gate["value"] is not None
                    else dg.MetadataValue.text("n/a"),
                    "limit": dg.MetadataValue.float(float(gate["limit"])),
                },
            )
            for gate in evaluation.summary["gates"]
            # The shadow gate is in the summary (and so blocks registered_model), not a check.
            if gate["name"] in GATE_NAMES
        ],
    )


EVALUATION_ASSETS = [challenger_evaluation]
