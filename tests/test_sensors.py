import http.server
import json
import threading

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.monitoring import build_reference_profile, data_drift
from keel.retraining import EpisodeState, observe_day
from orchestration.jobs import retrain
from orchestration.resources import MonitoringResource
from orchestration.sensors import drift_sensor, retraining_in_flight, run_failure_alert

MONITORING = MonitoringResource(min_drifted_days=2, min_rows=100)


def _frame(rng: np.random.Generator, rows: int, shift: float = 0.0) -> pd.DataFrame:
    data = {name: rng.normal(10 + shift * 10, 2, rows) for name in schema.NUMERIC_FEATURES}
    data["product"] = rng.choice(list(schema.PRODUCTS), rows)
    data["main_channel_30d"] = rng.choice(list(schema.CHANNELS), rows)
    return pd.DataFrame(data)


@pytest.fixture(scope="module")
def drift_payloads():
    """A real drift result of a quiet day and of a shifted day (keel.monitoring)."""
    rng = np.random.default_rng(3)
    profile = build_reference_profile(
        _frame(rng, 2_000), champion_version="1", training_set_hash="abc"
    )
    quiet = data_drift(profile, _frame(rng, 2_000))
    shifted = data_drift(profile, _frame(rng, 2_000, shift=1.0))
    assert not quiet.dataset_drift and shifted.dataset_drift
    return {False: quiet.to_dict(), True: shifted.to_dict()}


def _report(instance, day: str, drifted: bool, payloads) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="drift_report",
            partition=day,
            metadata={"drift": dg.MetadataValue.json(payloads[drifted])},
        )
    )


def _tick(instance, cursor):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"monitoring": MONITORING}
    )
    return drift_sensor(context)


def test_an_episode_retrains_once_after_it_lasted_long_enough():
    state, triggers = EpisodeState(), []
    verdicts = [False, True, True, True, True, False, True, False, True, True]
    for day, bad in enumerate(verdicts):
        state, start = observe_day(state, f"d{day}", bad, min_days=2)
        triggers.append(start)
    # Days 1-4 are one episode (retrain on its second day), day 6 alone is a blip, 8-9 another.
    assert [f"d{i}" for i, t in enumerate(triggers) if t] == ["d2", "d9"]
    assert EpisodeState.from_dict(state.to_dict()) == state


def test_drift_sensor_keys_runs_by_partition_and_never_retrains_twice(drift_payloads):
    instance = dg.DagsterInstance.ephemeral()
    for day, drifted in [("2026-03-01", False), ("2026-03-02", True), ("2026-03-03", True)]:
        _report(instance, day, drifted, drift_payloads)

    first = _tick(instance, None)
    assert [r.run_key for r in first.run_requests] == ["drift:2026-03-03"]
    assert first.run_requests[0].job_name == retrain.name

    # The tick is evaluated again, as after a crash before its cursor was stored: the same run
    # key comes back, and Dagster launches a run key only once.
    again = _tick(instance, None)
    assert [r.run_key for r in again.run_requests] == ["drift:2026-03-03"]

    assert isinstance(_tick(instance, first.cursor), dg.SkipReason)

    # The episode goes on: no second retraining.
    _report(instance, "2026-03-04", True, drift_payloads)
    later = _tick(instance, first.cursor)
    assert later.run_requests == []

    # A quiet day ends it; the next lasting drift is a new episode.
    for day, drifted in [("2026-03-05", False), ("2026-03-06", True), ("2026-03-07", True)]:
        _report(instance, day, drifted, drift_payloads)
    new_episode = _tick(instance, later.cursor)
    assert [r.run_key for r in new_episode.run_requests] == ["drift:2026-03-07"]


@dg.op
def train_nothing():
    pass


@dg.job(name=retrain.name)
def retraining_stand_in():
    train_nothing()


def test_no_second_retraining_while_one_is_in_flight(drift_payloads):
    instance = dg.DagsterInstance.ephemeral()
    assert not retraining_in_flight(instance)
    instance.create_run_for_job(retraining_stand_in, status=dg.DagsterRunStatus.STARTED)
    assert retraining_in_flight(instance)
    for day in ("2026-03-02", "2026-03-03"):
        _report(instance, day, True, drift_payloads)
    tick = _tick(instance, None)
    # The retraining in flight covers this episode: none is queued behind it.
    assert tick.run_requests == []
    assert json.loads(tick.cursor)["episode"]["triggered"] is True


@dg.op
def broken_step():
    raise RuntimeError("the warehouse is on fire")


@dg.job
def broken_job():
    broken_step()


def _failure_context(instance, monitoring):
    result = broken_job.execute_in_process(instance=instance, raise_on_error=False)
    return dg.build_run_status_sensor_context(
        sensor_name=run_failure_alert.name,
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"monitoring": monitoring},
    ).for_run_failure()


def test_run_failures_are_posted_to_the_webhook():
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/alerts"
        instance = dg.DagsterInstance.ephemeral()
        run_failure_alert(_failure_context(instance, MonitoringResource(webhook_url=url)))
    finally:
        server.shutdown()
    assert len(received) == 1
    assert received[0]["job"] == "broken_job"
    assert "failed" in received[0]["text"]


def test_run_failures_without_a_webhook_are_logged(capfd):
    instance = dg.DagsterInstance.ephemeral()
    run_failure_alert(_failure_context(instance, MonitoringResource()))
    assert "no alert webhook configured" in capfd.readouterr().err
