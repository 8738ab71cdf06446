"""Start, stop and check the team profile's services on this machine.

Postgres and RabbitMQ are system services (Debian packages); Keel creates its database in
Postgres and starts its own Celery workers, whose pids it keeps in ``KEEL_HOME/team``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from keel.settings import DAGSTER_CONFIG_DIR, PROJECT_ROOT, KeelPaths, SettingsError

PG_URL_ENV = "KEEL_DAGSTER_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/keel_dagster"
MLFLOW_PG_URL_ENV = "KEEL_MLFLOW_PG_URL"
MLFLOW_URL_ENV = "KEEL_MLFLOW_TRACKING_URI"
DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"
DEFAULT_MLFLOW_PG_URL = "postgresql://postgres@127.0.0.1:5432/keel_mlflow"


@dataclass(frozen=True)
class Service:
    """A system service the team profile needs, where it listens and what installs it."""

    name: str
    url: str
    package: str

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 0

    def reachable(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection(self.address, timeout=timeout):
                return True
        except OSError:
            return False


def dagster_pg_url() -> str:
    """Dagster's run, event and schedule database: ``KEEL_DAGSTER_PG_URL`` or this machine's."""
    return os.environ.get(PG_URL_ENV, "").strip() or DEFAULT_PG_URL


def mlflow_pg_url() -> str:
    """The MLflow server's backend store: ``KEEL_MLFLOW_PG_URL`` or this machine's Postgres."""
    return os.environ.get(MLFLOW_PG_URL_ENV, "").strip() or DEFAULT_MLFLOW_PG_URL


def write_instance_file(paths: KeelPaths) -> Path:
    """Write the team instance file into the data folder's DAGSTER_HOME."""
    target = paths.ensure().dagster_home / "dagster.yaml"
    source = DAGSTER_CONFIG_DIR / "team.yaml"
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)
    return paths.dagster_home


def team_environment(paths: KeelPaths) -> dict[str, str]:
    """The environment of a worker: this one, on the team instance unless it names another."""
    defaults = {
        "DAGSTER_HOME": str(paths.dagster_home),
        PG_URL_ENV: dagster_pg_url(),
        MLFLOW_URL_ENV: DEFAULT_MLFLOW_URL,
    }
    return {
        **defaults,
        **os.environ,
        "KEEL_PROFILE": "team",
        "KEEL_HOME": str(paths.home),
        "PYTHONPATH": str(PROJECT_ROOT),
    }


def system_services() -> list[Service]:
    """Postgres (Dagster's storage) and the Celery broker, as this environment names them."""
    from orchestration.executors import broker_url

    broker = broker_url().replace("pyamqp://", "amqp://")
    return [
        Service("postgres", dagster_pg_url(), "postgresql"),
        Service("rabbitmq", broker, "rabbitmq-server"),
    ]


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` unless it exists; True if it was created."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        raise SettingsError(f"{url} names no database")
    maintenance = parts._replace(path="/postgres").geturl()
    with psycopg.connect(maintenance, autocommit=True) as connection:
        exists = connection.execute("select 1 from pg_database where datname = %s", [name])
        if exists.fetchone():
            return False
        connection.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return True


def state_dir(paths: KeelPaths) -> Path:
    """Where the started workers' pids and logs are kept."""
    folder = paths.home / "team"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _state_file(paths: KeelPaths) -> Path:
    return state_dir(paths) / "processes.json"


def recorded(paths: KeelPaths) -> list[dict]:
    """The processes ``keel team up`` started and has not stopped."""
    path = _state_file(paths)
    return json.loads(path.read_text()) if path.exists() else []


def _record(paths: KeelPaths, processes: list[dict]) -> None:
    path = _state_file(paths)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(processes, indent=2))
    tmp.replace(path)


def worker_command(queue: str, name: str) -> list[str]:
    """The Celery worker for one of Keel's queues: one step at a time, in its own process."""
    from orchestration.executors import queue_name

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "keel.team.celery_app",
        "worker",
        "-Q",
        queue_name(queue),
        # The step runs in the worker's process: killing the worker kills its step, and the
        # broker hands the unacknowledged step to another worker.
        "--pool",
        "solo",
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"{name}@{socket.gethostname()}",
        "--loglevel",
        "INFO",
    ]


def start_worker(paths: KeelPaths, queue: str, name: str) -> dict:
    """Start a worker in the background, its output in ``KEEL_HOME/team/NAME.log``."""
    log = state_dir(paths) / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            worker_command(queue, name),
            cwd=PROJECT_ROOT,
            env=team_environment(paths),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entry = {"name": name, "queue": queue, "pid": process.pid, "log": str(log)}
    _record(paths, [*recorded(paths), entry])
    return entry


def start_mlflow(paths: KeelPaths, host: str, port: int) -> dict:
    """Start an MLflow tracking server on Postgres, artefacts in the shared data folder."""
    ensure_database(mlflow_pg_url())
    log = state_dir(paths) / "mlflow.log"
    artefacts = paths.mlflow / "artifacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        mlflow_pg_url(),
        # Clients write artefacts straight to the shared folder, which every worker mounts.
        "--default-artifact-root",
        str(artefacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**team_environment(paths), "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entry = {"name": "mlflow", "url": f"http://{host}:{port}", "pid": process.pid, "log": str(log)}
    _record(paths, [*recorded(paths), entry])
    return entry


def wait_until_serving(entry: dict, timeout: float = 180.0) -> None:
    """Block until the MLflow server answers its health check, or raise with its log's end."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(entry["pid"]):
        try:
            with urllib.request.urlopen(f"{entry['url']}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    log = Path(entry["log"])
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"MLflow server at {entry['url']} did not come up:\n{tail}")


def wait_until_ready(entry: dict, timeout: float = 60.0) -> None:
    """Block until the worker's log says it is ready, or raise with the log's end."""
    deadline = time.monotonic() + timeout
    log = Path(entry["log"])
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if " ready." in text:
            return
        if not alive(entry["pid"]):
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"worker {entry['name']} did not become ready:\n{tail}")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a child that exited is reaped, not counted)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def stop_all(paths: KeelPaths, timeout: float = 15.0) -> list[dict]:
    """Stop every recorded worker: SIGTERM (Celery finishes its step), then SIGKILL."""
    stopped = []
    for entry in recorded(paths):
        pid = entry["pid"]
        if alive(pid):
            # Each service leads its own process group (its server's workers included).
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if alive(pid):
                _signal_group(pid, signal.SIGKILL)
        stopped.append(entry)
    _record(paths, [])
    return stopped
