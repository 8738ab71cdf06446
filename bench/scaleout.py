"""Scale-out benchmark: a backfill of the daily pipeline on the team profile, 1 and 2 workers.

The backfill is the daily pipeline's warehouse part (ingest and validate both raw tables, the
dbt daily models) for ``KEEL_BENCH_DAYS`` partitions (default 30), one run per partition as
Dagster's backfills launch them. Three sides, each in a data folder, instance and databases of
its own, each after an untimed reference-data run:

- ``seconds_1``: the team profile with one Celery worker: all runs submitted to the queued run
  coordinator at once, ``dagster-daemon`` launching them, every step a Celery task;
- ``seconds_2``: the same with two workers;
- ``local_seconds``: the local profile, the runs one after another in this process.

``speedup`` is ``seconds_1 / seconds_2``; on a machine with two cores expect well under 2x.
The three sides must leave the same rows per partition in the raw tables and the daily
features mart: the run exits non-zero when they do not. Needs Postgres and RabbitMQ on this
machine (``keel team status``); scale with KEEL_BENCH_DAYS and KEEL_BENCH_ACCOUNTS.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

from bench.common import require_same_answers, write_result
from keel.team.play import environment

DAYS = int(os.environ.get("KEEL_BENCH_DAYS", "30"))
ACCOUNTS = int(os.environ.get("KEEL_BENCH_ACCOUNTS", "1000"))
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
JOB = "history"


def _scenario():
    from orchestration.scenario import Scenario

    return Scenario(accounts=ACCOUNTS, history_days=DAYS, days=0, drift_day=None)


def _partitions() -> list[str]:
    from keel.schema import FIRST_DAY

    first = date.fromisoformat(FIRST_DAY)
    return [(first + timedelta(days=i)).isoformat() for i in range(DAYS)]


def _rows(warehouse) -> dict[str, dict[str, int]]:
    """Rows per partition of each raw table and of the daily features mart."""
    from keel import schema
    from keel.ingestion import ACCOUNT_ACTIVITY, DEFAULT_LABELS

    with warehouse.connect(read_only=True) as connection:
        (mart_schema,) = connection.execute(
            "select table_schema from information_schema.tables where table_name = ?",
            [schema.FEATURES_MODEL],
        ).fetchone()
        queries = {
            table.qualified: f"select _partition, count(*) from {table.qualified} group by 1"
            for table in (ACCOUNT_ACTIVITY, DEFAULT_LABELS)
        }
        queries[schema.FEATURES_MODEL] = (
            f"select {schema.FEATURES_DAY}, count(*) "
            f"from {mart_schema}.{schema.FEATURES_MODEL} group by 1"
        )
        return {
            table: {str(day)[:10]: count for day, count in connection.execute(query).fetchall()}
            for table, query in queries.items()
        }


def run_local(root: Path) -> tuple[float, dict]:
    import dagster as dg

    from orchestration.profiles import resources_for
    from orchestration.scenario import scenario_definitions

    home = root / "local"
    with environment({"KEEL_PROFILE": "local", "KEEL_HOME": str(home)}):
        defs = scenario_definitions(_scenario(), resources_for("local"), sensors=False)
        with dg.DagsterInstance.ephemeral() as instance:
            defs.resolve_job_def("reference_data").execute_in_process(instance=instance)
            job = defs.resolve_job_def(JOB)
            start = time.perf_counter()
            for partition in _partitions():
                result = job.execute_in_process(instance=instance, partition_key=partition)
                if not result.success:
                    raise RuntimeError(f"local run of {partition} failed")
            seconds = time.perf_counter() - start
        return seconds, _rows(defs.resources["warehouse"])


def run_team(root: Path, workers: int) -> tuple[float, dict]:
    """The backfill through the queue with ``workers`` Celery workers; wall seconds and rows."""
    import signal

    import dagster as dg
    import psycopg

    from keel import cli as keel_cli
    from keel.access.store import KeyStore, default_store_path
    from keel.settings import KeelPaths
    from keel.team import scenario as team_scenario
    from keel.team import services
    from orchestration.profiles import resources_for

    unique = f"{workers}w_{uuid.uuid4().hex[:8]}"
    databases = {name: f"keel_bench_{name}_{unique}" for name in ("dagster", "lake", "feast")}
    role = f"keel_bench_audit_{unique}"
    paths = KeelPaths(root / f"team-{workers}").ensure()
    env = {
        "KEEL_PROFILE": "team",
        "KEEL_HOME": str(paths.home),
        "DAGSTER_HOME": str(paths.dagster_home),
        services.PG_URL_ENV: f"{PG_SERVER}/{databases['dagster']}",
        services.AUDIT_URI_ENV: f"postgresql://{role}@127.0.0.1:5432/{role}",
        services.FEAST_REGISTRY_ENV: f"postgresql+psycopg://postgres@127.0.0.1:5432/{databases['feast']}",
        services.MLFLOW_URL_ENV: "http://127.0.0.1:1",  # no step of the backfill tracks
        "KEEL_LAKE_CATALOG": f"{PG_SERVER}/{databases['lake']}",
        "KEEL_CELERY_QUEUE_PREFIX": f"keel-bench-{unique}-",
        team_scenario.SCENARIO_ENV: team_scenario.scenario_to_env(_scenario()),
    }
    daemon = None
    with environment(env):
        try:
            for name in databases.values():
                services.ensure_database(f"{PG_SERVER}/{name}")
            services.ensure_audit_store()
            os.environ[services.AUDIT_KEY_ENV] = services.audit_key(paths)
            os.environ["KEEL_API_KEY"] = KeyStore(default_store_path()).add("bench", ["admin"])
            started = [
                services.start_worker(paths, "default,gpu", f"bench-{n}-{os.getpid()}")
                for n in range(1, workers + 1)
            ]
            for entry in started:
                services.wait_until_ready(entry, timeout=180)
            keel_cli.prepare_dagster_home(paths, "team")
            daemon = team_scenario.start_daemon(paths, services.team_environment(paths))
            with (
                dg.DagsterInstance.get() as instance,
                team_scenario.QueuedRuns(instance, timeout_s=3600) as queue,
            ):
                reference = queue.run("reference_data", {}, {})
                if not reference.success:
                    raise RuntimeError(f"reference data failed: {reference.failures[-3:]}")
                start = time.perf_counter()
                run_ids = [
                    queue.submit(JOB, {}, {"dagster/partition": partition})
                    for partition in _partitions()
                ]
                failed = [run_id for run_id in run_ids if not queue.wait(run_id).success]
                seconds = time.perf_counter() - start
            if failed:
                raise RuntimeError(f"{len(failed)} team runs failed, e.g. {failed[0]}")
            return seconds, _rows(resources_for("team")["warehouse"])
        finally:
            if daemon is not None:
                os.killpg(daemon.pid, signal.SIGTERM)
                daemon.wait(timeout=60)
            services.stop_all(paths)
            with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as connection:
                for name in [*databases.values(), role]:
                    connection.execute(f'drop database if exists "{name}" with (force)')
                connection.execute(f'drop role if exists "{role}"')


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-scaleout-") as folder:
        root = Path(folder)
        seconds_1, rows_1 = run_team(root, 1)
        seconds_2, rows_2 = run_team(root, 2)
        local_seconds, rows_local = run_local(root)
    figures = {
        "seconds_1": round(seconds_1, 2),
        "seconds_2": round(seconds_2, 2),
        "speedup": round(seconds_1 / seconds_2, 3),
        "local_seconds": round(local_seconds, 2),
        "rows": {table: sum(counts.values()) for table, counts in rows_local.items()},
        "params": {
            "partitions": DAYS,
            "accounts": ACCOUNTS,
            "job": f"{JOB} (ingest and validate both raw tables, dbt daily models)",
            "team": "one run per partition through the queue, dagster-daemon, Celery workers",
            "local": "one run per partition in process, one after another",
            "cpus": os.cpu_count(),
        },
    }
    write_result("scaleout", figures)
    require_same_answers(
        "scaleout",
        {"rows_1_vs_local": rows_1 == rows_local, "rows_2_vs_local": rows_2 == rows_local},
    )
