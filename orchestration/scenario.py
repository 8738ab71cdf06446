"""The closed loop, played day by day on generated data: `make demo` and the end-to-end test.

A scenario first builds a history (one backfill run), trains and promotes a first champion,
then runs the daily pipeline one day at a time, as the daily schedule would, and after each
day ticks the drift and performance sensors exactly as the daemon does: a retraining they ask
for runs at once, under its run key, before the next day starts. Everything is recorded in
the Dagster instance, MLflow and the registry's audit log, so the UIs show what happened.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Protocol

import dagster as dg

from assets.partitions import FIRST_DAY
from assets.transformation import daily_dbt_models
from keel.settings import active_profile
from orchestration.executors import executor_for
from orchestration.jobs import (
    DAILY_RAW,
    WITHOUT_UNIT_TESTS,
    daily_pipeline,
    reference_data,
    retrain,
)
from orchestration.resources import DriftScenarioConfig, MonitoringResource, SourcesResource
from orchestration.sensors import drift_sensor, performance_sensor

# Light training settings: the loop, not the last decimal of AUC, is what a scenario shows.
QUICK_TRAINING = {
    "lightgbm_model": {"config": {"trials": 4}},
    "torch_model": {"config": {"trials": 2, "max_epochs": 15, "tuning_epochs": 3}},
}

history = dg.define_asset_job(
    "history",
    selection=DAILY_RAW | dg.AssetSelection.assets(daily_dbt_models) - WITHOUT_UNIT_TESTS,
)
# Scenario runs log warnings and errors only; the Dagster UI has every event.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass(frozen=True)
class Scenario:
    """A generated world with a drift switched on part-way through (covariate by default)."""

    # One label per account per month: 5,000 accounts give ~170 labels a day, enough for the
    # evaluation gates and the fairness report to judge.
    accounts: int = 5_000
    history_days: int = 45
    days: int = 14
    drift_day: int | None = 7  # index into the monitored days; None: no drift
    drift_kind: str = "covariate"  # a keel.generator drift kind
    drift_strength: float = 0.6
    # The performance sensor's policy: retrain when the AUC on a day's arriving labels stays
    # below min_auc; days with fewer labelled predictions than min_labels are too noisy to judge.
    min_auc: float = 0.6
    min_labels: int = 500
    # Short, so that a retraining soon after the drift starts already sees drifted labels.
    label_delay_days: int = 1
    seed: int = 7

    @property
    def first_day(self) -> date:
        return date.fromisoformat(FIRST_DAY)

    @property
    def monitored_days(self) -> list[date]:
        start = self.first_day + timedelta(days=self.history_days)
        return [start + timedelta(days=i) for i in range(self.days)]

    def sources(self, base: SourcesResource) -> SourcesResource:
        drifts = []
        if self.drift_day is not None:
            start = self.monitored_days[self.drift_day]
            drifts = [
                DriftScenarioConfig(
                    kind=self.drift_kind, start=start.isoformat(), strength=self.drift_strength
                )
            ]
        return SourcesResource(
            **{
                **base.model_dump(),
                "accounts": self.accounts,
                "seed": self.seed,
                "label_delay_days": self.label_delay_days,
                "late_share": 0.0,
                "scenarios": drifts,
            }
        )

    def monitoring(self, base: MonitoringResource) -> MonitoringResource:
        """The monitoring policy of ``base`` with this scenario's performance policy."""
        return MonitoringResource(
            **{**base.model_dump(), "min_auc": self.min_auc, "min_rows": self.min_labels}
        )


# Concept drift that decays the champion: 15,000 accounts give ~500 labels a day, enough for a
# day's AUC to judge; the champion's AUC falls from about 0.8 to about 0.6 once the concept turns.
DECAY = Scenario(
    accounts=15_000,
    history_days=45,
    days=12,
    drift_day=4,
    drift_kind="concept",
    drift_strength=1.0,
    min_auc=0.75,
)


@dataclass
class ScenarioResult:
    """What happened, day by day, and where to look."""

    drift_by_day: dict[str, bool] = field(default_factory=dict)
    drifted_features: dict[str, list[str]] = field(default_factory=dict)
    auc_by_day: dict[str, float | None] = field(default_factory=dict)
    retraining_runs: list[dict[str, Any]] = field(default_factory=list)
    champions: list[str] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    champion_lineage: dict[str, Any] = field(default_factory=dict)

    def false_alarms(self, drift_start: str | None) -> list[str]:
        """Days flagged as drifted before the drift started."""
        return [
            day
            for day, drifted in self.drift_by_day.items()
            if drifted and (drift_start is None or day < drift_start)
        ]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, default=str)

    def summary(self, drift_start: str) -> list[str]:
        """The closing lines of `keel demo` and `keel scenario`: flags, retrainings, champions."""
        drifted = [day for day, flagged in self.drift_by_day.items() if flagged]
        lines = [
            f"drift flagged on {len(drifted)} days: {', '.join(drifted) or 'none'}",
            f"false alarms before {drift_start}: {len(self.false_alarms(drift_start))}",
        ]
        for run in self.retraining_runs:
            verdict = (
                "registered" if run["success"] else f"rejected by {', '.join(run['failed_gates'])}"
            )
            lines.append(f"retraining run {run['run_id']} ({run['run_key']}): {verdict}")
        lines.append(f"champion versions over time: {' -> '.join(self.champions)}")
        return lines


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: its id, success, its failures and its failed blocking checks."""

    run_id: str
    success: bool
    failures: list[str]
    failed_checks: list[str]


class RunQueue(Protocol):
    """Where runs go instead of this process: the team profile's queue (keel.team.scenario)."""

    def run(self, job_name: str, run_config: dict, tags: dict[str, str]) -> RunOutcome: ...


def _execute(
    defs: dg.Definitions,
    job: str,
    instance,
    run_config: dict | None = None,
    must_succeed: bool = True,
    queue: RunQueue | None = None,
    tags: dict[str, str] | None = None,
    partition_key: str | None = None,
) -> RunOutcome:
    """Run ``job`` in this process, or through ``queue`` when one is given; wait for its end."""
    run_config = {**QUIET, **(run_config or {})}
    if queue is None:
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config=run_config,
            tags=tags,
            partition_key=partition_key,
        )
        outcome = RunOutcome(
            run_id=result.run_id,
            success=result.success,
            failures=[e.message or "" for e in result.all_events if e.is_failure],
            failed_checks=sorted(
                e.check_name for e in result.get_asset_check_evaluations() if not e.passed
            ),
        )
    else:
        partition = {"dagster/partition": partition_key} if partition_key else {}
        outcome = queue.run(job, run_config, {**(tags or {}), **partition})
    if must_succeed and not outcome.success:
        raise RuntimeError(f"job {job} failed: {outcome.failures[-3:]}")
    return outcome


def failed_gates(outcome: RunOutcome) -> list[str]:
    """The blocking checks that failed in a run (a retraining whose challenger was rejected)."""
    return list(outcome.failed_checks)


def scenario_definitions(
    scenario: Scenario, resources: dict[str, Any], sensors: bool = True
) -> dg.Definitions:
    """The scenario's jobs (and sensors) on ``resources`` with the scenario's world and policy."""
    from orchestration.definitions import defs as project

    resources = {
        **resources,
        "sources": scenario.sources(resources["sources"]),
        "monitoring": scenario.monitoring(resources["monitoring"]),
    }
    return dg.Definitions(
        assets=project.assets,
        asset_checks=project.asset_checks,
        jobs=[daily_pipeline, reference_data, retrain, history],
        sensors=[drift_sensor, performance_sensor] if sensors else [],
        resources=resources,
        executor=executor_for(active_profile()),
    )


def _latest_metadata(instance, key: str, partition: str) -> dict[str, Any]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1
    ).records
    return records[0].asset_materialization.metadata if records else {}


def run_scenario(
    scenario: Scenario,
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    echo: Callable[[str], None] = print,
    queue: RunQueue | None = None,
) -> ScenarioResult:
    """Play ``scenario`` against ``instance`` with a profile's ``resources``.

    Runs execute in this process, or go through ``queue`` (the team profile's run queue, whose
    code location builds the same ``scenario_definitions``).
    """
    defs = scenario_definitions(scenario, resources)
    resources = defs.resources
    result = ScenarioResult()
    first, days = scenario.first_day, scenario.monitored_days
    last_history = days[0] - timedelta(days=1)

    echo(f"1/4 reference data and {scenario.history_days} days of history ({first}..)")
    _execute(defs, "reference_data", instance, queue=queue)
    _execute(
        defs,
        "history",
        instance,
        queue=queue,
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last_history.isoformat(),
        },
    )
    echo("2/4 training, evaluating and registering the first champion")
    first_training = _execute(
        defs,
        "retrain",
        instance,
        run_config={"ops": QUICK_TRAINING},
        must_succeed=False,
        queue=queue,
    )
    # EnvVar settings (the team profile's) resolved, as a run's resources are.
    governance = resources["governance"].process_config_and_initialize()
    registry = governance.registry(resources["mlflow"].process_config_and_initialize())
    if registry.champion() is None:
        raise RuntimeError(
            f"the first training produced no champion (failed gates: "
            f"{failed_gates(first_training)}; failures: {first_training.failures[-3:]})"
        )
    if not first_training.success:
        # A scenario played again on the same data folder keeps the champion it already has
        # when the new candidate does not beat it.
        echo(f"    kept champion v{registry.champion()}: {failed_gates(first_training)} failed")

    echo(f"3/4 {len(days)} daily runs, sensors ticking after each")
    cursors: dict[str, str | None] = {"drift_sensor": None, "performance_sensor": None}
    for day in days:
        key = day.isoformat()
        _execute(defs, "daily_pipeline", instance, queue=queue, partition_key=key)
        drift = _latest_metadata(instance, "drift_report", key)
        result.drift_by_day[key] = bool(drift["dataset_drift"].value)
        result.drifted_features[key] = list(drift["drifted_features"].value)
        performance = _latest_metadata(instance, "performance_report", key)
        auc = performance.get("auc")
        result.auc_by_day[key] = None if auc is None or auc.value != auc.value else auc.value
        echo(
            f"    {key}: drift={'yes' if result.drift_by_day[key] else 'no '} "
            f"({len(result.drifted_features[key])} features) "
            f"auc={'-' if result.auc_by_day[key] is None else f'{result.auc_by_day[key]:.3f}'}"
        )
        for sensor in (drift_sensor, performance_sensor):
            context = dg.build_sensor_context(
                instance=instance,
                cursor=cursors[sensor.name],
                definitions=defs,
                resources={"monitoring": resources["monitoring"]},
            )
            tick = sensor(context)
            if isinstance(tick, dg.SkipReason):
                continue
            cursors[sensor.name] = tick.cursor
            for request in tick.run_requests or []:
                _run_requested(defs, instance, request, sensor.name, result, echo, queue)
    echo("4/4 summary")
    result.champions = [
        r.to_version for r in registry.audit_records() if r.action in ("promote", "rollback")
    ]
    result.audit = [r.__dict__ for r in registry.audit_records()]
    result.champion_lineage = registry.lineage("champion")
    return result


def _run_requested(defs, instance, request, sensor_name, result, echo, queue=None) -> None:
    """Launch a sensor's run request as the daemon would: once per run key."""
    existing = instance.get_run_records(
        dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1
    )
    if existing:
        return
    echo(f"    {sensor_name} requests a retraining ({request.run_key})")
    run = _execute(
        defs,
        request.job_name,
        instance,
        run_config={"ops": QUICK_TRAINING},
        must_succeed=False,
        queue=queue,
        tags={
            **request.tags,
            "dagster/run_key": request.run_key,
            "dagster/sensor_name": sensor_name,
        },
    )
    gates = failed_gates(run)
    outcome = "registered" if run.success else f"rejected by {', '.join(gates) or 'a failed step'}"
    echo(f"    retraining run {run.run_id[:8]}: {outcome}")
    result.retraining_runs.append(
        {
            "run_id": run.run_id,
            "run_key": request.run_key,
            "tags": dict(request.tags),
            "success": run.success,
            "failed_gates": gates,
        }
    )
