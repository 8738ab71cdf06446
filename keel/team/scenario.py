"""The closed-loop scenario on the team profile: every run through the queue to Celery workers.

The scenario's jobs form a code location of their own (``keel.team.scenario_location``), built
from the scenario that ``KEEL_TEAM_SCENARIO`` names, so that the daemon, the run workers and
the Celery workers all rebuild the same jobs with the same generated world. Each run is
created from that code location, submitted to the instance's queued run coordinator, taken
off the queue by ``dagster-daemon``, launched by the run launcher, and its steps become Celery
tasks on RabbitMQ; the scenario waits for the run to end and reads its outcome from the event
log. The sensors tick in the scenario itself after each day, as in the local scenario.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg

from keel.settings import PROJECT_ROOT, KeelPaths

SCENARIO_ENV = "KEEL_TEAM_SCENARIO"
LOCATION_MODULE = "keel.team.scenario_location"
LOCATION_NAME = "keel_scenario"
FINISHED = {
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
}


def scenario_to_env(scenario) -> str:
    """The scenario as the JSON that ``KEEL_TEAM_SCENARIO`` carries to every process."""
    return json.dumps(dataclasses.asdict(scenario), sort_keys=True)


def scenario_from_env():  # -> orchestration.scenario.Scenario
    """The scenario ``KEEL_TEAM_SCENARIO`` names; an error names the variable when unset."""
    from orchestration.scenario import Scenario

    raw = os.environ.get(SCENARIO_ENV, "").strip()
    if not raw:
        raise RuntimeError(f"{SCENARIO_ENV} is not set: the scenario's code location needs it")
    return Scenario(**json.loads(raw))


def location_definitions() -> dg.Definitions:
    """The scenario's jobs on the team profile's resources, without sensors.

    The sensors tick in the scenario's own process after each day; in the code location the
    daemon would tick them on its own clock as well.
    """
    from orchestration.profiles import resources_for
    from orchestration.scenario import scenario_definitions

    return scenario_definitions(scenario_from_env(), resources_for("team"), sensors=False)


def write_workspace(paths: KeelPaths) -> Path:
    """The daemon's workspace file: the scenario's code location, under the name runs carry."""
    import yaml

    from keel.team.services import state_dir

    target = state_dir(paths) / "scenario-workspace.yaml"
    location = {
        "module_name": LOCATION_MODULE,
        "location_name": LOCATION_NAME,
        "working_directory": str(PROJECT_ROOT),
    }
    target.write_text(yaml.safe_dump({"load_from": [{"python_module": location}]}))
    return target


def daemon_command(workspace: Path) -> list[str]:
    """``dagster-daemon run`` on the scenario's code location."""
    daemon = Path(sys.executable).with_name("dagster-daemon")
    return [str(daemon), "run", "-w", str(workspace)]


def start_daemon(paths: KeelPaths, env: dict[str, str]) -> subprocess.Popen:
    """Start the daemon that takes the scenario's runs off the queue; its log in the data folder."""
    from keel.team.services import state_dir

    log = (state_dir(paths) / "scenario-daemon.log").open("ab")
    return subprocess.Popen(
        daemon_command(write_workspace(paths)),
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _is_failure(event) -> bool:
    return event is not None and event.is_failure


def _failure_text(event) -> str:
    """A failure event's message, with the step's error when it has one."""
    error = getattr(event.event_specific_data, "error", None)
    detail = f": {error.message.strip()}" if error is not None else ""
    return f"{event.message or ''}{detail}"


def outcome_from_log(instance: dg.DagsterInstance, run_id: str):  # -> RunOutcome
    """A finished run's outcome as its event log records it."""
    from orchestration.scenario import RunOutcome

    run = instance.get_run_by_id(run_id)
    records = instance.all_logs(run_id)
    failures = [_failure_text(r.dagster_event) for r in records if _is_failure(r.dagster_event)]
    checks = sorted(
        r.dagster_event.event_specific_data.check_name
        for r in records
        if r.dagster_event is not None
        and r.dagster_event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        and not r.dagster_event.event_specific_data.passed
    )
    return RunOutcome(run_id, run.status == dg.DagsterRunStatus.SUCCESS, failures, checks)


class QueuedRuns:
    """Submits runs of the scenario's code location to the instance's run queue and waits.

    Use as a context manager: it holds one workspace (a code server) for every submission.
    """

    def __init__(self, instance: dg.DagsterInstance, timeout_s: float = 1800.0):
        self.instance = instance
        self.timeout_s = timeout_s
        self._workspace = None

    def __enter__(self) -> QueuedRuns:
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import ModuleTarget

        target = ModuleTarget(
            module_name=LOCATION_MODULE,
            attribute=None,
            working_directory=str(PROJECT_ROOT),
            location_name=LOCATION_NAME,
        )
        self._workspace = WorkspaceProcessContext(self.instance, target)
        self._workspace.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._workspace.__exit__(*exc)

    def submit(self, job_name: str, run_config: dict[str, Any], tags: dict[str, str]) -> str:
        """Create a run of ``job_name`` from the code location and put it on the queue."""
        from dagster._core.definitions.selector import JobSubsetSelector

        request = self._workspace.create_request_context()
        location = request.get_code_location(LOCATION_NAME)
        (repository,) = location.get_repositories().values()
        selector = JobSubsetSelector(
            location_name=LOCATION_NAME,
            repository_name=repository.name,
            job_name=job_name,
            op_selection=None,
        )
        remote_job = location.get_job(selector)
        plan = location.get_execution_plan(
            remote_job, run_config, step_keys_to_execute=None, known_state=None
        ).execution_plan_snapshot
        run = self.instance.create_run(
            job_name=job_name,
            run_id=None,
            run_config=run_config,
            resolved_op_selection=None,
            step_keys_to_execute=plan.step_keys_to_execute,
            op_selection=None,
            status=None,
            root_run_id=None,
            parent_run_id=None,
            tags={**remote_job.tags, **tags},
            job_snapshot=remote_job.job_snapshot,
            execution_plan_snapshot=plan,
            parent_job_snapshot=remote_job.parent_job_snapshot,
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
            asset_selection=None,
            asset_check_selection=None,
            asset_graph=repository.asset_graph,
        )
        self.instance.submit_run(run.run_id, request)
        return run.run_id

    def wait(self, run_id: str):  # -> orchestration.scenario.RunOutcome
        """Block until the run ends (or time runs out) and return its outcome."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            run = self.instance.get_run_by_id(run_id)
            if run.status in FINISHED:
                return outcome_from_log(self.instance, run_id)
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} did not finish within {self.timeout_s:g} s")

    def run(self, job_name: str, run_config: dict[str, Any], tags: dict[str, str]):
        return self.wait(self.submit(job_name, run_config, tags))
