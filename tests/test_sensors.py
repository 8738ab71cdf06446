import http.server
import json
import threading
from datetime import date, timedelta

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.monitoring import build_reference_profile, data_drift
from keel.retraining import HISTORY_DAYS, EpisodeState, observe_day
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


def day(n: int) -> str:
    return f"2026-03-{n:02d}"


def test_an_episode_retrains_once_after_it_lasted_long_enough():
    state, triggers = EpisodeState(), []
    verdicts = [False, True, True, True, True, False, True, False, True, True]
    for n, bad in enumerate(verdicts, start=1):
        state, episode = observe_day(state, day(n), bad, min_days=2)
        triggers.append(episode)
    # Days 2-5 are one episode (retrain on its second day), day 7 alone is a blip, 9-10 another.
    assert [e.partition for e in triggers if e] == [day(3), day(10)]
    assert [e.start for e in triggers if e] == [day(2), day(9)]
    assert EpisodeState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_one_drifted_day_reported_twice_is_not_two_consecutive_days():
    state, first = observe_day(EpisodeState(), day(5), True, min_days=2)
    state, again = observe_day(state, day(5), True, min_days=2)
    assert first is None and again is None
    # Its neighbour, reported later, completes the episode.
    state, episode = observe_day(state, day(6), True, min_days=2)
    assert episode is not None and (episode.start, episode.partition) == (day(5), day(6))


def test_episodes_follow_partition_order_not_arrival_order():
    state = EpisodeState()
    # Two drifted days a week apart are not an episode, whatever order they arrive in.
    state, first = observe_day(state, day(10), True, min_days=2)
    state, second = observe_day(state, day(3), True, min_days=2)
    assert first is None and second is None
    # A backfilled day between two drifted days joins them into one three-day episode.
    state, _ = observe_day(state, day(12), True, min_days=3)
    state, joined = observe_day(state, day(11), True, min_days=3)
    assert (joined.start, joined.partition) == (day(10), day(11))
    # A day of that episode re-reported as quiet splits it, but both halves stay covered.
    state, split = observe_day(state, day(11), False, min_days=1)
    state, later = observe_day(state, day(12), True, min_days=1)
    assert split is None and later is None
    # The history stays bounded however long the sensor runs.
    first = date(2026, 4, 1)
    for n in range(400):
        state, _ = observe_day(state, (first + timedelta(days=n)).isoformat(), bool(n % 2), 2)
    assert len(state.verdicts) == HISTORY_DAYS + 1
    assert len(json.dumps(state.to_dict())) < 20_000


def test_a_cursor_of_the_older_format_starts_afresh():
    old = {"bad_days": 3, "triggered": True, "last_partition": "2026-03-04"}
    assert EpisodeState.from_dict(old) == EpisodeState()


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


def test_no_second_retraining_while_one_queued_since_the_episode_is_in_flight(drift_payloads):
    instance = dg.DagsterInstance.ephemeral()
    assert not retraining_in_flight(instance)
    for n in (2, 3):
        _report(instance, day(n), True, drift_payloads)
    instance.create_run_for_job(retraining_stand_in, status=dg.DagsterRunStatus.STARTED)
    assert retraining_in_flight(instance)
    tick = _tick(instance, None)
    # The retraining queued after the episode began covers it: none is queued behind it.
    assert tick.run_requests == []
    assert json.loads(tick.cursor)["episode"]["pending"] is None
    assert isinstance(_tick(instance, tick.cursor), dg.SkipReason)


def test_a_retraining_queued_before_the_episode_does_not_cover_it(drift_payloads):
    instance = dg.DagsterInstance.ephemeral()
    earlier = instance.create_run_for_job(retraining_stand_in, status=dg.DagsterRunStatus.STARTED)
    for n in (2, 3):
        _report(instance, day(n), True, drift_payloads)

    waiting = _tick(instance, None)
    # Never two retrainings at once: this episode's waits for the earlier one to end.
    assert waiting.run_requests == []
    assert json.loads(waiting.cursor)["episode"]["pending"]["partition"] == day(3)
    assert _tick(instance, waiting.cursor).run_requests == []

    instance.report_run_failed(earlier)
    launched = _tick(instance, waiting.cursor)
    assert [r.run_key for r in launched.run_requests] == [f"drift:{day(3)}"]
    assert isinstance(_tick(instance, launched.cursor), dg.SkipReason)


def test_the_sensor_counts_a_day_materialised_twice_once(drift_payloads):
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(3):
        _report(instance, day(4), True, drift_payloads)
    tick = _tick(instance, None)
    assert tick.run_requests == []
    _report(instance, day(2), True, drift_payloads)  # not next to day 4
    assert _tick(instance, tick.cursor).run_requests == []


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
