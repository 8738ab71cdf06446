"""Cost measurement for every Dagster step, with no asset module involved.

`StepCostHandler` is a logging handler that the Dagster instance attaches to every run's log
(``python_logs.dagster_handler_config`` in the instance's ``dagster.yaml``): it sees each
step's STEP_START, materialisations and STEP_SUCCESS or STEP_FAILURE in the process that runs
the step, measures the step between them (`keel.cost.measure`), prices it with the active
profile's table and appends a row to the cost file. `cost_observations` then reports each
costed materialisation as an asset observation carrying the figures, so they show in the
asset's metadata (and its plots) in the Dagster UI, and tags each registered model version
with the cost of the runs that trained it (``keel.cost``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from keel.cost import measure
from keel.cost.prices import cost, price_table, resume_savings
from keel.cost.store import CostStore

# The instance setting that attaches the handler (tests pass it to dg.instance_for_test).
HANDLER_CONFIG = {
    "python_logs": {
        "dagster_handler_config": {
            "handlers": {
                "keel_cost": {"class": "keel.cost.dagster.StepCostHandler", "level": "DEBUG"}
            }
        }
    }
}


class _Step:
    def __init__(self) -> None:
        self.begin = measure.start()
        self.started_at = datetime.now(UTC)
        self.assets: list[str] = []
        self.partition: str | None = None
        self.training: dict[str, Any] = {}


# ``run_ids`` (family -> MLflow run) is what a step training several families records.
_TRAINING_KEYS = ("run_id", "run_ids", "resumed_from_epoch", "epochs_run", "mean_epoch_seconds")
_ENDS = {"STEP_SUCCESS": "success", "STEP_FAILURE": "failure"}
# Steps under way in this process; module-wide, as Dagster may build a handler per log manager.
_STEPS: dict[tuple[str, str], _Step] = {}


class StepCostHandler(logging.Handler):
    """Measures each step between its start and end events and records its cost."""

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None)
        event = meta.get("dagster_event") if meta else None
        if event is None or not meta.get("step_key"):
            return
        try:
            self._on_event(meta, event)
        except Exception:  # a cost that cannot be recorded must never fail the step
            self.handleError(record)

    def _on_event(self, meta: dict[str, Any], event: Any) -> None:
        key = (meta["run_id"], meta["step_key"])
        kind = event.event_type_value
        if kind == "STEP_START":
            _STEPS[key] = _Step()
        elif kind == "ASSET_MATERIALIZATION" and key in _STEPS:
            step = _STEPS[key]
            materialization = event.event_specific_data.materialization
            step.assets.append(materialization.asset_key.to_user_string())
            step.partition = materialization.partition or step.partition
            for name, value in materialization.metadata.items():
                if name in _TRAINING_KEYS:
                    step.training[name] = getattr(value, "value", value)
        elif kind in _ENDS and key in _STEPS:
            step = _STEPS.pop(key)
            self._record(meta, step, _ENDS[kind])

    def _record(self, meta: dict[str, Any], step: _Step, status: str) -> None:
        from keel.settings import active_profile

        usage = measure.stop(step.begin)
        profile = active_profile()
        prices = price_table(profile)
        money = cost(usage, prices)
        training = step.training
        saved = resume_savings(
            money["total"],
            usage.wall_s,
            int(training.get("resumed_from_epoch") or 0),
            int(training.get("epochs_run") or 0),
            float(training.get("mean_epoch_seconds") or 0.0),
        )
        tags = meta.get("job_tags") or {}
        CostStore().record(
            {
                "run_id": meta["run_id"],
                "root_run_id": tags.get("dagster/root_run_id") or meta["run_id"],
                "job_name": meta.get("job_name") or "",
                "step_key": meta["step_key"],
                "status": status,
                "partition": step.partition or tags.get("dagster/partition"),
                "assets": step.assets,
                "started_at": step.started_at.isoformat(),
                "ended_at": (step.started_at + timedelta(seconds=usage.wall_s)).isoformat(),
                **{k: v for k, v in usage.to_json().items() if k != "wall_s"},
                "wall_s": usage.wall_s,
                "profile": profile,
                "prices": prices.to_json(),
                **{f"cost_{part}": money[part] for part in ("cpu", "memory", "gpu", "written")},
                "cost": money["total"],
                "currency": prices.currency,
                "mlflow_run_id": mlflow_runs(training),
                "saved": saved,
            }
        )


def mlflow_runs(training: dict[str, Any]) -> str | None:
    """The MLflow runs a step logged (``run_id``, and the values of ``run_ids``), comma-joined."""
    runs = [str(training["run_id"])] if training.get("run_id") else []
    named = training.get("run_ids")
    if isinstance(named, dict):
        runs += [str(run) for run in named.values() if run and str(run) not in runs]
    return ",".join(runs) or None


def observation(row: dict[str, Any], asset: str) -> dg.AssetObservation:
    """The asset observation of one costed step (its share when the step made several)."""
    share = 1.0 / max(1, len(row["assets"]))
    return dg.AssetObservation(
        asset_key=dg.AssetKey.from_user_string(asset),
        partition=row["partition"],
        metadata={
            "cost": dg.MetadataValue.float(row["cost"] * share),
            "cost_currency": dg.MetadataValue.text(row["currency"]),
            "cost_saved_by_resume": dg.MetadataValue.float(row["saved"] * share),
            "cpu_seconds": dg.MetadataValue.float(row["cpu_s"] * share),
            "gpu_seconds": dg.MetadataValue.float(row["gpu_s"] * share),
            "peak_memory_mb": dg.MetadataValue.float(row["peak_memory_bytes"] / 2**20),
            "bytes_written": dg.MetadataValue.int(int(row["bytes_written"] * share)),
            "wall_seconds": dg.MetadataValue.float(row["wall_s"]),
            "cost_run_id": dg.MetadataValue.text(row["run_id"]),
            "cost_shared_by_assets": dg.MetadataValue.int(len(row["assets"])),
        },
    )


VERSION_TAGS = ("keel.cost", "keel.cost_currency", "keel.cost_cpu_seconds", "keel.cost_gpu_seconds")


def tag_model_versions(
    store: CostStore, roots: set[str], tracking_uri: str, registry_uri: str, lock_file: str = ""
) -> dict[str, float]:
    """Put the lineage cost on the registered versions trained by runs under ``roots``.

    Returns "<model> v<version>" -> cost for every version tagged.
    """
    from keel.cost.store import run_ids_of

    rows = store.rows()
    run_ids = {run for r in rows if r["root_run_id"] in roots for run in run_ids_of(r)}
    if not run_ids:
        return {}
    from contextlib import nullcontext

    from filelock import FileLock
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    tagged = {}
    # The registry's own lock: its writers and these tags never meet on a SQLite store.
    with FileLock(lock_file) if lock_file else nullcontext():
        for run_id in sorted(run_ids):
            total = store.by_model({run_id: [run_id]})[run_id]
            currency = next(r["currency"] for r in rows if run_id in run_ids_of(r))
            values = (f"{total.cost:.6g}", currency, f"{total.cpu_s:.1f}", f"{total.gpu_s:.1f}")
            for version in client.search_model_versions(f"run_id = '{run_id}'"):
                for key, value in zip(VERSION_TAGS, values, strict=True):
                    client.set_model_version_tag(version.name, version.version, key, value)
                tagged[f"{version.name} v{version.version}"] = total.cost
    return tagged


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def cost_observations(
    context: dg.SensorEvaluationContext, mlflow: dg.ResourceParam[Any]
) -> dg.SensorResult:
    """Costs into asset metadata (observations) and onto the model versions runs trained."""
    after = int(context.cursor or 0)
    store = CostStore()
    rows = store.rows(after_id=after)[:500]
    events = [
        observation(row, asset)
        for row in rows
        if row["status"] == "success"
        for asset in row["assets"]
    ]
    roots = {row["root_run_id"] for row in rows}
    tagged = tag_model_versions(
        store, roots, mlflow.tracking_uri, mlflow.registry_uri, mlflow.lock_file
    )
    if tagged:
        context.log.info(f"model version costs: {tagged}")
    cursor = str(rows[-1]["id"]) if rows else context.cursor
    return dg.SensorResult(asset_events=events, cursor=cursor)
