"""Run monitoring on the project's own instance file, with a run worker killed by SIGKILL.

The run is a real `dagster job execute` process on a real SQLite instance; the test runs the
monitoring daemon's iterations itself instead of waiting for the daemon's poll interval.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import pytest
import yaml

from keel.cli import prepare_dagster_home
from keel.settings import DAGSTER_CONFIG_DIR

KILLABLE = '''
import time
from pathlib import Path

import dagster as dg


@dg.asset(pool="warehouse")
def slow_write():
    """Holds the warehouse slot until killed."""
    Path(__file__).with_name("started").write_text("")
    time.sleep(600)


@dg.asset(pool="warehouse")
def quick_write():
    """Needs the warehouse slot for a moment."""


@dg.asset
def failing_step():
    """Fails on its own: a step failure, not a dead worker."""
    raise ValueError("gate failed")


retrain = dg.define_asset_job("retrain", selection=[slow_write], tags={"gpu": "true"})
after = dg.define_asset_job("after", selection=[quick_write])
failing = dg.define_asset_job("failing", selection=[failing_step])
defs = dg.Definitions(
    assets=[slow_write, quick_write, failing_step], jobs=[retrain, after, failing]
)
'''


class _DaemonContext:
    """What the monitoring daemon hands its iterations: the instance (resuming runs is off)."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance

    def create_request_context(self):
        return None


def _dagster_job(module: Path, job: str, env: dict) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.Popen(
        [str(dagster), "job", "execute", "-f", str(module), "-j", job],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _webhook() -> tuple[HTTPServer, list[dict]]:
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def _drifted_days(instance: dg.DagsterInstance, days: list[str]) -> None:
    """Drift reports of days whose features all shifted (a real keel.monitoring result)."""
    import numpy as np
    import pandas as pd

    from keel import schema
    from keel.monitoring import build_reference_profile, data_drift

    rng = np.random.default_rng(5)

    def frame(shift: float) -> pd.DataFrame:
        data = {name: rng.normal(10 + 10 * shift, 2, 1_000) for name in schema.NUMERIC_FEATURES}
        data["product"] = rng.choice(list(schema.PRODUCTS), 1_000)
        data["main_channel_30d"] = rng.choice(list(schema.CHANNELS), 1_000)
        return pd.DataFrame(data)

    profile = build_reference_profile(frame(0.0), champion_version="1", training_set_hash="a")
    drift = data_drift(profile, frame(1.0))
    assert drift.dataset_drift
    for day in days:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key="drift_report",
                partition=day,
                metadata={"drift": dg.MetadataValue.json(drift.to_dict())},
            )
        )


def test_every_instance_file_turns_on_run_monitoring():
    for path in sorted(DAGSTER_CONFIG_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        monitoring = config["run_monitoring"]
        assert monitoring["enabled"] is True, path.name
        assert monitoring["free_slots_after_run_end_seconds"] > 0, path.name
        assert config["run_retries"]["retry_on_asset_or_op_failure"] is False, path.name


@pytest.mark.slow
def test_a_killed_retrain_run_is_failed_freed_retried_alerted_and_unblocks_retraining(
    keel_home, tmp_path, monkeypatch
):
    from dagster._daemon import (
        execute_concurrency_slots_iteration,
        execute_run_monitoring_iteration,
    )

    from orchestration.resources import MonitoringResource
    from orchestration.sensors import drift_sensor, retraining_in_flight, run_failure_alert

    monitoring = MonitoringResource(min_drifted_days=2, min_rows=100)

    def drift_tick(cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"monitoring": monitoring}
        )
        return drift_sensor(context)

    home = prepare_dagster_home(keel_home, "local")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    module = tmp_path / "killable.py"
    module.write_text(KILLABLE)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    worker = _dagster_job(module, "retrain", env)
    try:
        _wait_for(lambda: (tmp_path / "started").exists(), 240, "the warehouse step to start")
        with dg.DagsterInstance.get() as instance:
            (record,) = instance.get_run_records(dg.RunsFilter(job_name="retrain"))
            run_id = record.dagster_run.run_id
            (step_start,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
            step_pid = step_start.dagster_event.pid
            assert instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots
            worker.send_signal(signal.SIGKILL)
            time.sleep(1)
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
            assert retraining_in_flight(instance)
            # A drift episode now waits for the retraining that looks in flight.
            _drifted_days(instance, ["2026-03-01", "2026-03-02"])
            waiting = drift_tick(None)
            assert not waiting.run_requests

            daemon = _DaemonContext(instance)
            logger = logging.getLogger("run_monitoring")
            list(execute_run_monitoring_iteration(daemon, logger))
            run = instance.get_run_by_id(run_id)
            assert run.status == dg.DagsterRunStatus.FAILURE
            # A dead worker is not a failed step: the run will be retried, and a sensor-driven
            # retraining is no longer blocked by a run that looks in flight.
            assert run.tags["dagster/will_retry"] == "true"
            assert not retraining_in_flight(instance)
            retraining = drift_tick(waiting.cursor)
            assert [r.job_name for r in retraining.run_requests] == ["retrain"]
            from orchestration.run_launcher import process_alive

            assert not process_alive(step_pid, step_start.timestamp)

            seconds = instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
            time.sleep(seconds + 1)
            list(execute_concurrency_slots_iteration(daemon, logger))
            assert not instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots

            server, received = _webhook()
            try:
                (failure,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
                context = dg.build_run_status_sensor_context(
                    sensor_name=run_failure_alert.name,
                    dagster_event=failure.dagster_event,
                    dagster_instance=instance,
                    dagster_run=run,
                ).for_run_failure()
                webhook = f"http://127.0.0.1:{server.server_port}/alert"
                run_failure_alert(context, monitoring=MonitoringResource(webhook_url=webhook))
            finally:
                server.shutdown()
            assert received[0]["run_id"] == run_id and received[0]["job"] == "retrain"
            assert "is gone (killed or crashed)" in received[0]["error"]

        # The next run that needs the warehouse gets the slot.
        after = _dagster_job(module, "after", env)
        assert after.wait(timeout=240) == 0
        # A run failed by a step is not retried.
        failing = _dagster_job(module, "failing", env)
        assert failing.wait(timeout=240) != 0
        with dg.DagsterInstance.get() as instance:
            (record,) = instance.get_run_records(dg.RunsFilter(job_name="failing"))
            assert record.dagster_run.tags["dagster/will_retry"] == "false"
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
