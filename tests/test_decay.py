"""The decay scenario: concept drift takes the champion's AUC below the policy, and the
performance sensor asks for exactly one retraining.

Fast: instead of training, the champion is the risk formula of the concept before the drift,
applied to each account's utilisation and missed payments (what the models learn from); the
retraining it asks for swaps in the formula of the new concept. Each day's labels come from
the generator with the scenario's settings, are scored, measured by ``keel.monitoring`` and
reported as that day's ``performance_report``; the sensor ticks after each day as in the
scenario.
"""

from datetime import timedelta

import dagster as dg
import numpy as np

from keel import generator
from keel.monitoring import performance
from orchestration.resources import MonitoringResource
from orchestration.scenario import DECAY
from orchestration.sensors import performance_sensor


def concept_scores(config, accounts, observed, utilisation_weight, misses_weight):
    """P(default) from utilisation and recent missed payments, with the given weights."""
    utilisation = generator._utilisation(config, accounts, observed)
    misses = sum(
        generator._missed_payments(config, accounts, observed - timedelta(days=lag)).astype(float)
        for lag in (0, 30, 60)
        if observed - timedelta(days=lag) >= config.start
    )
    logit = -3.4 + utilisation_weight * (utilisation - 0.5) + misses_weight * misses
    return 1 / (1 + np.exp(-logit))


def test_decay_scenario_makes_the_performance_sensor_retrain_exactly_once(small_sources):
    config = DECAY.sources(small_sources).generator_config()
    accounts = generator.build_accounts(config)
    monitoring = DECAY.monitoring(MonitoringResource())
    drift_start = DECAY.monitored_days[DECAY.drift_day]
    weights = (2.2, 1.1)  # the concept before the drift
    instance = dg.DagsterInstance.ephemeral()
    cursor, requests, auc_by_day = None, [], {}
    for day in DECAY.monitored_days:
        labels = generator.labels_table(config, day, accounts).to_pandas()
        observed = day - timedelta(days=config.label_delay_days)
        scores = concept_scores(config, accounts, observed, *weights)
        rows = np.searchsorted(accounts.account_id, labels["account_id"].to_numpy())
        result = performance(scores[rows], labels["defaulted"].to_numpy())
        auc_by_day[day] = result.auc
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key="performance_report",
                partition=day.isoformat(),
                metadata={"performance": dg.MetadataValue.json(result.to_dict())},
            )
        )
        tick = performance_sensor(
            dg.build_sensor_context(
                instance=instance, cursor=cursor, resources={"monitoring": monitoring}
            )
        )
        if isinstance(tick, dg.SkipReason):
            continue
        cursor = tick.cursor
        for request in tick.run_requests:
            requests.append(request)
            weights = (2.2 - 4.4, 1.1 - 0.8)  # the retrained champion learnt the new concept

    before = [auc for day, auc in auc_by_day.items() if day < drift_start]
    assert min(before) > monitoring.min_auc, auc_by_day
    assert len(labels) >= monitoring.min_rows  # every day is judged
    assert [r.tags["keel/trigger"] for r in requests] == ["performance"], auc_by_day
    (request,) = requests
    triggered = request.tags["keel/partition"]
    assert drift_start.isoformat() < triggered <= (drift_start + timedelta(days=3)).isoformat()
