"""The team profile on this machine's services: Dagster on Postgres, steps on Celery workers."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import uuid
from datetime import date
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from click.testing import CliRunner

from keel import cli as keel_cli
from keel.lake import CATALOG_ENV, DATA_PATH_ENV
from keel.team import services
from orchestration.executors import executor_for, queue_name, step_queue

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
DAY = date(2026, 2, 1).isoformat()


@pytest.fixture
def team_env(keel_home, monkeypatch):
    """A team profile with its own databases and its own queues on the shared broker."""
    unique = uuid.uuid4().hex[:10]
    database = f"keel_dagster_test_{unique}"
    url = f"{PG_SERVER}/{database}"
    monkeypatch.setenv("KEEL_PROFILE", "team")
    monkeypatch.setenv(services.PG_URL_ENV, url)
    monkeypatch.setenv(services.MLFLOW_PG_URL_ENV, f"{PG_SERVER}/keel_mlflow_test_{unique}")
    monkeypatch.setenv("KEEL_CELERY_QUEUE_PREFIX", f"keel-test-{unique}-")
    audit = f"keel_audit_test_{unique}"
    monkeypatch.setenv(services.AUDIT_URI_ENV, f"postgresql://{audit}@127.0.0.1:5432/{audit}")
    feast = f"keel_feast_test_{unique}"
    monkeypatch.setenv(
        services.FEAST_REGISTRY_ENV, f"postgresql+psycopg://postgres@127.0.0.1:5432/{feast}"
    )
    # The lake's catalog of this test alone; its Parquet under the test's KEEL_HOME (lake/).
    lake = f"keel_lake_test_{unique}"
    monkeypatch.setenv(CATALOG_ENV, f"{PG_SERVER}/{lake}")
    monkeypatch.delenv(DATA_PATH_ENV, raising=False)
    yield keel_home, url
    services.stop_all(keel_home)
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as connection:
        for name in (database, f"keel_mlflow_test_{unique}", audit, feast, lake):
            connection.execute(f'drop database if exists "{name}" with (force)')
        connection.execute(f'drop role if exists "{audit}"')


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _logs_a_run_and_a_model_version_through_the_server(url: str, paths) -> None:
    """Tracking and registry by URL land in the server's Postgres store."""
    import mlflow
    from mlflow import MlflowClient

    from orchestration.resources import MlflowResource

    store = MlflowResource(
        tracking_uri=url, registry_uri=url, artifact_location=str(paths.mlflow / "artifacts")
    )
    experiment = store.configure("team-test")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metric("auc", 0.75)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    client.create_registered_model("team-test-model")
    client.create_model_version(
        "team-test-model", f"runs:/{run.info.run_id}/model", run.info.run_id
    )
    with psycopg.connect(os.environ[services.MLFLOW_PG_URL_ENV]) as connection:
        metrics = connection.execute("select key, value from metrics").fetchall()
        versions = connection.execute("select name, version from model_versions").fetchall()
    assert metrics == [("auc", 0.75)]
    assert versions == [("team-test-model", 1)]


@pytest.fixture
def team_lake(team_env):
    """The team profile's warehouse, a lake whose catalog database exists before any worker."""
    import psycopg2.extensions

    from keel.postgres import ensure_database
    from orchestration.profiles import resources_for

    ensure_database(psycopg2.extensions.parse_dsn(os.environ[CATALOG_ENV]))
    warehouse = resources_for("team")["warehouse"]
    assert warehouse.is_lake and warehouse.catalog == os.environ[CATALOG_ENV]
    return warehouse


@pytest.fixture
def team_instance(team_env):
    paths, url = team_env
    services.ensure_database(url)
    keel_cli.prepare_dagster_home(paths, "team")
    with dg.DagsterInstance.get() as instance:
        yield instance


def test_torch_step_goes_to_the_gpu_queue_and_every_other_step_to_default(keel_home, monkeypatch):
    from assets import training
    from orchestration.profiles import resources_for

    monkeypatch.setenv("KEEL_CELERY_QUEUE_PREFIX", "")
    defs = dg.Definitions(
        assets=dg.load_assets_from_modules([training]),
        resources=resources_for("team"),
        executor=executor_for("team"),
    )
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "keel_celery"
    queues = {name: step_queue(dict(node.tags)) for name, node in job.graph.node_dict.items()}
    assert queues.pop("torch_model") == "gpu"
    assert queues and set(queues.values()) == {"default"}
    assert executor_for("local") is None


def test_team_instance_keeps_runs_in_its_postgres_database(team_instance, team_env):
    _, url = team_env
    config = yaml.safe_load((team_env[0].dagster_home / "dagster.yaml").read_text())
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    run = team_instance.create_run_for_job(dg.GraphDefinition("probe").to_job())
    with psycopg.connect(url) as connection:
        stored = connection.execute("select run_id from runs").fetchall()
    assert stored == [(run.run_id,)]
    # A second `keel team up` finds the database and leaves it.
    assert services.ensure_database(url) is False


def test_team_status_names_the_package_of_an_unreachable_service(team_env, monkeypatch):
    monkeypatch.setenv("KEEL_CELERY_BROKER", "pyamqp://guest:guest@127.0.0.1:1//")
    result = CliRunner().invoke(keel_cli.cli, ["team", "status"])
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "reachable" in lines["postgres"] and "NOT" not in lines["postgres"]
    assert "NOT reachable (Debian package rabbitmq-server)" in lines["rabbitmq"]


def _worker_steps(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[str]]:
    """Each step of the run and the Celery workers that took it, from the run's engine events."""
    taken: dict[str, list[str]] = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        worker = event.engine_event_data.metadata.get("Celery worker")
        if worker is not None:
            taken.setdefault(event.step_key, []).append(worker.value)
    return taken


def _started_steps(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    """How many times each step of the run began its body (STEP_START), on whichever worker."""
    started: dict[str, int] = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START):
        step = record.dagster_event.step_key
        started[step] = started.get(step, 0) + 1
    return started


def _start_workers(paths, count: int) -> list[dict]:
    entries = [services.start_worker(paths, "default", f"w{n}-{os.getpid()}") for n in range(count)]
    for entry in entries:
        services.wait_until_ready(entry)
    return entries


@pytest.mark.slow
@pytest.mark.team
def test_steps_of_one_run_execute_in_both_celery_workers(team_instance, team_env, team_lake):
    from tests.team_support import ingest_job

    paths, _ = team_env
    workers = _start_workers(paths, 2)
    result = dg.execute_job(
        dg.reconstructable(ingest_job),
        instance=team_instance,
        tags={"dagster/partition": DAY},
    )
    assert result.success
    taken = _worker_steps(team_instance, result.run_id)
    assert len(taken) == 4, taken
    names = {f"{entry['name']}@" for entry in workers}
    used = {worker.split("@")[0] + "@" for runs in taken.values() for worker in runs}
    assert used == names, taken
    # Both tables of the lake hold the day once, loaded by whichever worker took the step.
    assert _day_rows(team_lake) == _expected_rows(result)
    assert _day_commits(team_lake) == {
        table: [(rows, 0)] for table, (rows, _) in _expected_rows(result).items()
    }


RAW_TABLES = ("account_activity", "default_labels")


def _day_rows(warehouse) -> dict[str, tuple[int, int]]:
    """Rows and distinct keys of the day in each raw table of the lake, as a reader sees it."""
    from keel.ingestion import ACCOUNT_ACTIVITY, DEFAULT_LABELS

    with warehouse.connect(read_only=True) as connection:
        return {
            table.name: connection.execute(
                f"select count(*), count(distinct ({', '.join(table.key)})) "
                f"from {table.qualified} where _partition = ?",
                [DAY],
            ).fetchone()
            for table in (ACCOUNT_ACTIVITY, DEFAULT_LABELS)
        }


def _day_commits(warehouse) -> dict[str, list[tuple[int, int]]]:
    """Each commit of the lake that changed the day in each raw table: rows inserted, deleted.

    Read from the catalog's change feed over the lake's whole history, so a half day that was
    ever committed, even one replaced since, shows here.
    """
    with warehouse.connect(read_only=True) as connection:
        (last,) = connection.execute(
            "select max(snapshot_id) from ducklake_snapshots('lake')"
        ).fetchone()
        return {
            name: connection.execute(
                "select count(*) filter (change_type = 'insert'), "
                "count(*) filter (change_type = 'delete') "
                "from ducklake_table_changes('lake', 'raw', ?, 0, ?) "
                "where _partition = ? group by snapshot_id order by snapshot_id",
                [name, last, DAY],
            ).fetchall()
            for name in RAW_TABLES
        }


def _generated_rows() -> dict[str, tuple[int, int]]:
    """The generator's own rows of the day: the extract's on-time activity, the arriving labels.

    Computed afresh in this process from the world's recorded settings, not read back from
    anything a worker wrote.
    """
    from keel.generator import activity_table, labels_table, split_late_rows
    from tests.team_support import sources

    config = sources().generator_config()
    day = date.fromisoformat(DAY)
    on_time, _ = split_late_rows(config, day, activity_table(config, day))
    labels = labels_table(config, day).num_rows
    return {"account_activity": (on_time.num_rows,) * 2, "default_labels": (labels,) * 2}


def _expected_rows(result) -> dict[str, tuple[int, int]]:
    """What each step reported loading: every row once, no duplicate keys."""
    expected = {}
    for asset in ("raw_account_activity", "raw_default_labels"):
        materialization = result.asset_materializations_for_node(asset)[-1]
        rows = materialization.metadata["rows"].value
        expected[asset.removeprefix("raw_")] = (rows, rows)
    return expected


@pytest.mark.slow
@pytest.mark.team
def test_a_worker_killed_mid_step_hands_the_step_to_the_other_and_the_run_completes(
    team_instance, team_env, team_lake, monkeypatch
):
    from tests.team_support import ACCOUNTS_ENV, load_job

    paths, _ = team_env
    # The two loads alone (the validation steps would only lengthen the run after the kill), on
    # a world big enough that each day's table is written as Parquet files, not inlined.
    monkeypatch.setenv(ACCOUNTS_ENV, "2000")
    workers = {entry["name"]: entry["pid"] for entry in _start_workers(paths, 2)}
    outcome = {}

    def launch() -> None:
        outcome["result"] = dg.execute_job(
            dg.reconstructable(load_job), instance=team_instance, tags={"dagster/partition": DAY}
        )

    runner = threading.Thread(target=launch)
    runner.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        for run in team_instance.get_runs(limit=1):
            # A step whose body has begun (generating the day, opening the lake, writing it).
            started = _started_steps(team_instance, run.run_id)
            for step, taken in _worker_steps(team_instance, run.run_id).items():
                if step in started:
                    killed = (step, taken[0].split("@")[0])
                    os.kill(workers[killed[1]], signal.SIGKILL)
                    break
        time.sleep(0.05)
    runner.join(timeout=600)
    assert killed is not None, "no step reached a worker"
    result = outcome["result"]
    assert result.success
    taken = _worker_steps(team_instance, result.run_id)
    # The killed worker's step was taken again by the other worker, which ran it to the end.
    step, victim = killed
    assert len(taken[step]) == 2, taken
    assert taken[step][1].split("@")[0] != victim
    assert _started_steps(team_instance, result.run_id)[step] == 2
    # The day once in each raw table of the lake: every generated row, no duplicate key.
    generated = _generated_rows()
    assert _day_rows(team_lake) == _expected_rows(result) == generated
    # Each commit that touched the day in the lake's history wrote it whole (replacing the
    # whole day, if any): no reader of any snapshot saw the day half loaded or twice.
    for table, commits in _day_commits(team_lake).items():
        rows = generated[table][0]
        assert commits[0] == (rows, 0) and set(commits[1:]) <= {(rows, rows)}, commits


@pytest.mark.slow
@pytest.mark.team
def test_team_up_starts_workers_that_status_reports_and_down_stops(team_env):
    paths, url = team_env
    runner = CliRunner()
    port = _free_port()
    up = runner.invoke(
        keel_cli.cli,
        ["team", "up", "--workers", "1", "--gpu-workers", "1", "--mlflow-port", str(port)],
    )
    assert up.exit_code == 0, up.output
    assert f"dagster storage  {url} (created)" in up.output
    assert f"registry audit   {services.audit_uri()} (role keel_audit_test_" in up.output
    started = services.recorded(paths)
    assert sorted(entry.get("queue", "") for entry in started) == ["", "default", "gpu"]
    # Each worker consumes its own queue of the broker.
    for entry in [entry for entry in started if "queue" in entry]:
        log = Path(entry["log"]).read_text()
        assert queue_name(entry["queue"]) in log, log
    assert sorted(entry["name"] for entry in services.recorded(paths))[0] == "keel-default-1"
    _logs_a_run_and_a_model_version_through_the_server(f"http://127.0.0.1:{port}", paths)
    status = runner.invoke(keel_cli.cli, ["team", "status"])
    assert status.exit_code == 0, status.output
    assert status.output.count(" running") == 3
    down = runner.invoke(keel_cli.cli, ["team", "down"])
    assert down.exit_code == 0, down.output
    assert not any(services.alive(entry["pid"]) for entry in started)
    assert services.recorded(paths) == []


@pytest.mark.parametrize(
    ("profile", "executor"), [("team", "keel_celery"), ("production", "keel_k8s")]
)
def test_the_whole_graph_loads_with_the_profiles_step_executor(
    keel_home, venv_bin, profile, executor
):
    import subprocess

    code = (
        "import dagster as dg\n"
        "from orchestration.definitions import defs\n"
        "dg.Definitions.validate_loadable(defs)\n"
        "print(defs.resolve_job_def('retrain').executor_def.name)\n"
    )
    result = subprocess.run(
        [str(venv_bin / "python"), "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "KEEL_PROFILE": profile},
        cwd=keel_cli.PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [executor]


def test_team_profile_tracks_to_the_mlflow_server_the_environment_names(keel_home, monkeypatch):
    from orchestration.profiles import resources_for

    @dg.asset
    def tracking(mlflow: dg.ResourceParam[dg.ConfigurableResource]) -> str:
        return mlflow.tracking_uri

    monkeypatch.setenv(services.MLFLOW_URL_ENV, "http://mlflow.team.example:5000")
    resources = {"mlflow": resources_for("team")["mlflow"]}
    result = dg.materialize([tracking], resources=resources)
    assert result.output_for_node("tracking") == "http://mlflow.team.example:5000"
    monkeypatch.delenv(services.MLFLOW_URL_ENV)
    with pytest.raises(dg.DagsterInvalidConfigError, match=services.MLFLOW_URL_ENV):
        dg.materialize([tracking], resources=resources)


@pytest.mark.slow
@pytest.mark.team
def test_the_step_with_the_torch_tags_runs_on_the_gpu_worker(team_instance, team_env):
    from tests.team_support import gpu_job

    paths, _ = team_env
    default = services.start_worker(paths, "default", f"cpu-{os.getpid()}")
    gpu = services.start_worker(paths, "gpu", f"gpu-{os.getpid()}")
    for entry in (default, gpu):
        services.wait_until_ready(entry)
    result = dg.execute_job(
        dg.reconstructable(gpu_job), instance=team_instance, tags={"dagster/partition": DAY}
    )
    assert result.success
    # The step's output, stored by the gpu worker in the shared DAGSTER_HOME: the device it saw.
    stored = paths.dagster_home / "storage" / "gpu_step"
    assert pickle.loads(stored.read_bytes()) in {"cpu", "cuda"}
    taken = _worker_steps(team_instance, result.run_id)
    assert [w.split("@")[0] for w in taken["gpu_step"]] == [gpu["name"]]
    assert [w.split("@")[0] for w in taken["raw_account_activity"]] == [default["name"]]
