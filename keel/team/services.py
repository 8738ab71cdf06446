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

from keel.access.store import KEY_ENV
from keel.settings import DAGSTER_CONFIG_DIR, PROJECT_ROOT, KeelPaths, SettingsError

PG_URL_ENV = "KEEL_DAGSTER_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/keel_dagster"
MLFLOW_PG_URL_ENV = "KEEL_MLFLOW_PG_URL"
MLFLOW_URL_ENV = "KEEL_MLFLOW_TRACKING_URI"
DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"
DEFAULT_MLFLOW_PG_URL = "postgresql://postgres@127.0.0.1:5432/keel_mlflow"
# The registry's audit log: its own database, written by a role that may only INSERT and SELECT.
AUDIT_URI_ENV = "KEEL_REGISTRY_AUDIT_URI"
DEFAULT_AUDIT_URI = "postgresql://keel_audit_writer@127.0.0.1:5432/keel_audit"
AUDIT_KEY_ENV = "KEEL_REGISTRY_AUDIT_KEY"
# Feast: SQL registry on Postgres, Redis online store (feature_repo/feature_store.team.yaml).
FEAST_REGISTRY_ENV = "KEEL_FEAST_REGISTRY_URL"
DEFAULT_FEAST_REGISTRY = "postgresql+psycopg://postgres@127.0.0.1:5432/keel_feast"
FEAST_REDIS_ENV = "KEEL_FEAST_REDIS"
DEFAULT_FEAST_REDIS = "127.0.0.1:6379"


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


def audit_uri() -> str:
    """The audit log's SQLAlchemy URL, whose user is the insert-and-select writer role."""
    return os.environ.get(AUDIT_URI_ENV, "").strip() or DEFAULT_AUDIT_URI


def feast_registry_url() -> str:
    """Feast's SQL registry: ``KEEL_FEAST_REGISTRY_URL`` or this machine's Postgres."""
    return os.environ.get(FEAST_REGISTRY_ENV, "").strip() or DEFAULT_FEAST_REGISTRY


def audit_key(paths: KeelPaths) -> str:
    """The audit key: ``KEEL_REGISTRY_AUDIT_KEY``, else a 0600 key file in the data folder.

    Every machine mounts the same data folder, so every worker chains the log with one key.
    """
    from keel.registry_audit import KEY_FILE_NAME, load_key

    secret = os.environ.get(AUDIT_KEY_ENV, "").strip()
    return load_key(secret, "" if secret else state_dir(paths) / KEY_FILE_NAME).decode()


def _admin_url(url: str, database: str) -> str:
    """``url``'s server and ``database`` as Dagster's storage user (who creates databases)."""
    from sqlalchemy.engine import make_url

    admin = make_url(dagster_pg_url())
    target = make_url(url)
    return target.set(
        drivername="postgresql",
        username=admin.username,
        password=admin.password,
        database=database,
    ).render_as_string(hide_password=False)


def ensure_audit_store() -> str:
    """Create the audit database, its writer role and tables; grant INSERT and SELECT only.

    The tables belong to the administrating user; the role in ``KEEL_REGISTRY_AUDIT_URI`` may
    append records and read them, never change or delete one. Returns the role's name.
    """
    import psycopg
    import sqlalchemy
    from psycopg import sql
    from sqlalchemy.engine import make_url

    from keel.registry_audit import grant_writer

    target = make_url(audit_uri())
    role, database = target.username, target.database
    if not role or not database:
        raise SettingsError(f"{AUDIT_URI_ENV} must name a user and a database: {target}")
    ensure_database(_admin_url(audit_uri(), database))
    with psycopg.connect(_admin_url(audit_uri(), "postgres"), autocommit=True) as connection:
        if not connection.execute("select 1 from pg_roles where rolname = %s", [role]).fetchone():
            statement = sql.SQL("create role {} login").format(sql.Identifier(role))
            if target.password:
                statement += sql.SQL(" password {}").format(sql.Literal(target.password))
            connection.execute(statement)
    engine = sqlalchemy.create_engine(_admin_url(audit_uri(), database))
    try:
        grant_writer(engine, role)
    finally:
        engine.dispose()
    return role


def write_instance_file(paths: KeelPaths) -> Path:
    """Write the team instance file into the data folder's DAGSTER_HOME."""
    target = paths.ensure().dagster_home / "dagster.yaml"
    source = DAGSTER_CONFIG_DIR / "team.yaml"
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)
    return paths.dagster_home


def team_environment(paths: KeelPaths, service: str | None = None) -> dict[str, str]:
    """The environment of a service: this one, on the team instance unless it names another.

    ``service`` (`keel.team.keys`) acts with its own key once `keys.provision` has issued it,
    never with the key of the person who started it.
    """
    from keel.team.keys import service_key

    defaults = {"DAGSTER_HOME": str(paths.dagster_home), **environment_defaults(paths)}
    key = service_key(paths, service) if service else ""
    return {
        **defaults,
        **os.environ,
        "KEEL_PROFILE": "team",
        "KEEL_HOME": str(paths.home),
        "PYTHONPATH": str(PROJECT_ROOT),
        **({KEY_ENV: key} if key else {}),
    }


def environment_defaults(paths: KeelPaths) -> dict[str, str]:
    """What the team profile reads from the environment, as this machine's services have it."""
    return {
        PG_URL_ENV: dagster_pg_url(),
        MLFLOW_URL_ENV: DEFAULT_MLFLOW_URL,
        AUDIT_URI_ENV: audit_uri(),
        AUDIT_KEY_ENV: audit_key(paths),
        FEAST_REGISTRY_ENV: feast_registry_url(),
        FEAST_REDIS_ENV: DEFAULT_FEAST_REDIS,
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
    import psycopg2.extensions

    from keel import postgres

    params = psycopg2.extensions.parse_dsn(url)
    if not params.get("dbname"):
        raise SettingsError(f"{url} names no database")
    return postgres.ensure_database(params)


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
        # "default,gpu": one worker that takes both queues' steps.
        ",".join(queue_name(q) for q in queue.split(",")),
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
    from keel.team.keys import WORKERS

    log = state_dir(paths) / f"{name}.log"
    env = team_environment(paths, WORKERS)
    with log.open("ab") as out:
        process = subprocess.Popen(
            worker_command(queue, name),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entry = {"name": name, "queue": queue, "pid": process.pid, "log": str(log)}
    entry["identity"] = _identity_name(env)
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
    # The tracking server never acts in Keel's registry: it gets nobody's key.
    env = {**team_environment(paths), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop(KEY_ENV, None)
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
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


def _identity_name(env: dict[str, str]) -> str:
    """The identity a process with ``env`` acts as, for ``keel team status``."""
    from keel.access.store import KeyStore, default_store_path

    key = env.get(KEY_ENV, "").strip()
    identity = KeyStore(default_store_path()).check(key) if key else None
    return identity.name if identity else "no valid key"


def stop_all(paths: KeelPaths, timeout: float = 15.0) -> list[dict]:
    """Stop every recorded process: SIGTERM (Celery finishes its step), then SIGKILL."""
    return stop(paths, recorded(paths), timeout)


def stop(paths: KeelPaths, entries: list[dict], timeout: float = 15.0) -> list[dict]:
    """Stop the recorded processes ``entries`` and forget them; the others keep running."""
    stopped = []
    for entry in entries:
        pid = entry["pid"]
        if alive(pid):
            # Each service leads its own process group (its server's workers included).
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if alive(pid):
                _signal_group(pid, signal.SIGKILL)
                # A killed process is gone once the kernel has reaped it: wait for that.
                deadline = time.monotonic() + timeout
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        stopped.append(entry)
    pids = {entry["pid"] for entry in stopped}
    _record(paths, [entry for entry in recorded(paths) if entry["pid"] not in pids])
    return stopped
