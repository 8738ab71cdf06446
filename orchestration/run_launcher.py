"""The local profile's run launcher: Dagster's default one, able to tell a dead run worker.

Dagster's ``DefaultRunLauncher`` cannot check a run's worker, so run monitoring never notices
a run whose process was killed (kill -9, out of memory, a closed laptop): the run stays STARTED
and holds its pool slots and the ``gpu`` run limit for good. This launcher finds the worker by
the pid of the run's RUN_START event, on this machine as the local profile runs everything
here, and reports it dead once the process is gone. Run monitoring then fails the run, the
instance frees its concurrency slots, run retries relaunch it, and the failure sensor alerts.
"""

from __future__ import annotations

from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus

# A process started after the event that named its pid is another process with a reused pid.
PID_CLOCK_SLACK_S = 1.0
STEP_ENDS = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}


def process_alive(pid: int, started_by: float) -> bool:
    """Whether ``pid`` is a live process that already existed at ``started_by`` (a timestamp)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return (
            process.status() != psutil.STATUS_ZOMBIE
            and process.create_time() <= started_by + PID_CLOCK_SLACK_S
        )
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        # Another user's process: it exists, and a run is never failed on a guess.
        return True


def stop_process(pid: int, started_by: float) -> bool:
    """Kill ``pid`` if it is still the process that existed at ``started_by``."""
    import psutil

    if not process_alive(pid, started_by):
        return False
    try:
        psutil.Process(pid).kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return True


class LocalRunLauncher(DefaultRunLauncher):
    """Launches runs as ``DefaultRunLauncher`` does; run monitoring can check their workers.

    A run is launched only when this process's identity (``keel.access``) holds the role its
    job needs; the run is tagged with that identity.
    """

    def launch_run(self, context: LaunchRunContext) -> None:
        from keel.access import authenticate
        from keel.access.jobs import authorize_run

        run = context.dagster_run
        tags = authorize_run(run.job_name, run.run_config, authenticate())
        self._instance.add_run_tags(run.run_id, tags)
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        starts = self._instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
        if not starts or starts[-1].dagster_event.pid is None:
            # Nothing names the worker: better a run left alone than a healthy one failed.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker recorded")
        start = starts[-1]
        pid = start.dagster_event.pid
        if process_alive(pid, start.timestamp):
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker {pid} is alive")
        stopped = self._stop_orphaned_steps(run, pid)
        orphans = f"; stopped its orphaned step processes {stopped}" if stopped else ""
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"run worker process {pid} is gone (killed or crashed){orphans}"
        )

    def _stop_orphaned_steps(self, run: DagsterRun, worker_pid: int) -> list[int]:
        """Kill step processes the dead worker left running: they may still hold the warehouse."""
        events = self._instance.all_logs(
            run.run_id, of_type={DagsterEventType.STEP_START, *STEP_ENDS}
        )
        running = {}
        for event in events:
            step = event.dagster_event.step_key
            if event.dagster_event.event_type == DagsterEventType.STEP_START:
                running[step] = event
            else:
                running.pop(step, None)
        stopped = []
        for event in running.values():
            pid = event.dagster_event.pid
            if pid and pid != worker_pid and stop_process(pid, event.timestamp):
                stopped.append(pid)
        return stopped
