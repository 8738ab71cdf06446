"""The closed loop end to end: 60 monitored days with a covariate drift from day 45."""

import dagster as dg
import pandas as pd
import pytest

from orchestration.profiles import resources_for
from orchestration.scenario import Scenario, run_scenario

# About twenty minutes on two cores: sixty daily runs, two trainings.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_sixty_days_with_covariate_drift_from_day_45(keel_home, capsys):
    scenario = Scenario(accounts=1_500, history_days=45, days=60, drift_day=45)
    drift_start = scenario.monitored_days[45].isoformat()
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_scenario(scenario, instance, resources_for("local"))
        retraining_runs = instance.get_run_records(dg.RunsFilter(job_name="retrain"))

    false_alarms = result.false_alarms(drift_start)
    drifted_days = [day for day in result.drift_by_day if day >= drift_start]
    flagged = [day for day in drifted_days if result.drift_by_day[day]]
    with capsys.disabled():
        print(f"\nfalse alarms on the 45 days before the drift: {len(false_alarms)} {false_alarms}")
        print(f"drifted days flagged: {len(flagged)} of {len(drifted_days)}")
        print(f"retraining runs: {result.retraining_runs}")

    # At most 2 false alarms before the drift; the drift is flagged from its first days on.
    assert len(false_alarms) <= 2
    assert flagged and flagged[0] <= scenario.monitored_days[47].isoformat()

    # Exactly one retraining per drift episode, started by the drift sensor on a drifted day
    # (plus the first champion's training run).
    assert len(result.retraining_runs) == 1
    triggered = result.retraining_runs[0]
    assert triggered["run_key"].startswith("drift:")
    assert triggered["tags"]["keel/partition"] >= drift_start
    assert len(retraining_runs) == 2

    # The new champion was trained on a training set that includes drifted days.
    lineage = result.champion_lineage
    assert len(result.champions) == 2
    training_set = pd.read_parquet(lineage["training_set"]["path"], columns=["event_timestamp"])
    assert training_set["event_timestamp"].max() > pd.Timestamp(drift_start, tz="UTC")

    # The audit log tells the story: two registrations, two promotions.
    actions = [record["action"] for record in result.audit]
    assert actions.count("register") == 2 and actions.count("promote") == 2
