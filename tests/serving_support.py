"""A small serving world for tests: Feast applied and materialised, two registered models.

`build_world` writes seeded marts into a Keel home, applies the Feast repo under a unique
project, materialises the online store (SQLite, or the real Redis at 127.0.0.1:6379), trains
two small LightGBM models and registers them in that home's MLflow registry: version 1 is the
approved ``champion``, version 2 the approved ``challenger`` (usable as canary or shadow).
It takes a few seconds; the ``serving_world`` fixtures build one per session and backend.

Usage in a test module::

    from tests.serving_support import serving_world  # noqa: F401 (a fixture)

    def test_something(serving_world):
        world = serving_world  # World(home=..., store=..., champion="1", challenger="2", ...)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.pit_join import FIRST_DAY, write_synthetic_marts
from keel import schema
from keel.settings import HOME_ENV, PROFILE_ENV, KeelPaths

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SKIP_REDIS = (
    f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}; start it to run this test "
    "(Debian: apt-get install redis-server && redis-server --daemonize yes)."
)
ACCOUNTS = 300
DAYS = 2
TRAINER = "trainer"
APPROVER = "approver"
GATES = {"minimum_quality": True, "no_regression": True, "fairness": True, "latency_sla": True}


@dataclass
class World:
    """What `build_world` made, and how to reach it."""

    home: KeelPaths
    backend: str  # "sqlite" or "redis"
    project: str
    feast_overrides: dict[str, Any]
    account_ids: list[int] = field(repr=False)
    champion: str
    challenger: str
    registry: dict[str, str]  # RegistryConfig fields
    days: list[date] = field(default_factory=list)  # days of the marts, oldest first
    materialised: list[date] = field(default_factory=list)

    def open_store(self):
        from keel import features

        with keel_home_env(self.home):
            return features.open_store(overrides=self.feast_overrides)

    def registry_config(self):
        from keel.registry import RegistryConfig

        return RegistryConfig(**self.registry)

    def materialise(self, day: date) -> None:
        """Write another day (newer event times) into the online store."""
        from keel import features

        with keel_home_env(self.home):
            features.materialize_day(self.open_store(), day)
        self.materialised.append(day)

    def serve_settings(self, **changes):
        """`keel.serving.settings.ServeSettings` for this world (log and keys in its home)."""
        from keel.serving.settings import ServeSettings

        values = {
            "feast_overrides": self.feast_overrides,
            "registry": self.registry,
            "keys_file": str(self.home.home / "serve" / "api_keys.db"),
            "log_dir": str(self.home.artefacts / "prediction_log"),
            "poll_seconds": 0.5,
            **changes,
        }
        return ServeSettings(**values)


@contextmanager
def keel_home_env(home: KeelPaths) -> Iterator[None]:
    """KEEL_HOME and KEEL_PROFILE pointing at ``home`` for the block (Feast reads them)."""
    saved = {name: os.environ.get(name) for name in (HOME_ENV, PROFILE_ENV)}
    os.environ[HOME_ENV], os.environ[PROFILE_ENV] = str(home.home), "local"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def redis_available() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=0.5):
            return True
    except OSError:
        return False


def delete_redis_project(project: str) -> None:
    """Remove a test project's keys from the shared Redis server (never FLUSHDB)."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=0.5)
    for key in client.scan_iter(match=b"*" + project.encode(), count=1000):
        client.delete(key)


def training_frame(marts: Path, seed: int):
    """Model features from the marts with a label that rises with missed payments."""
    import pandas as pd

    from keel.features import account_ratios

    frame = pd.read_parquet(marts / schema.FEATURES_MART)
    for name, values in account_ratios(frame).items():
        frame[name] = values
    rng = np.random.default_rng(seed)
    logit = -2.5 + 1.5 * frame["missed_payments_90d"] + 0.8 * frame["utilisation"]
    frame[schema.LABEL] = (rng.random(len(frame)) < 1 / (1 + np.exp(-logit))).astype(int)
    return frame


def log_lightgbm_run(home: KeelPaths, registry_config, seed: int) -> str:
    """Train a small LightGBM model and log it as the training stage does; returns the run id."""
    import mlflow
    from mlflow import MlflowClient

    from keel.training import save_risk_model, train_lightgbm

    frame = training_frame(home.marts, seed)
    split = len(frame) * 3 // 4
    fit = train_lightgbm(
        frame.iloc[:split], frame.iloc[split:], seed=seed, max_rounds=25, num_threads=1
    )
    training_set = home.artefacts / "training_sets" / f"serving-{seed}.parquet"
    training_set.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(training_set)
    dataset_version = hashlib.sha256(training_set.read_bytes()).hexdigest()
    tags = {
        "keel.dataset_version": dataset_version,
        "keel.training_set_path": str(training_set),
        "keel.dagster_data_version": f"dv-{dataset_version[:8]}",
        "keel.code_commit": "0" * 40,
        "keel.code_dirty": "false",
        "keel.feature_service": schema.FEATURE_SERVICE,
        "keel.dbt_manifest_hash": hashlib.sha256(b"manifest").hexdigest(),
        "keel.dbt_models": "fct_account_features_daily",
        "keel.model_family": "lightgbm",
        "keel.trained_by": TRAINER,
    }
    client = MlflowClient(registry_config.tracking_uri)
    experiment = client.get_experiment_by_name(registry_config.model_name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            registry_config.model_name, artifact_location=str(home.mlflow / "artifacts")
        )
    )
    folder = save_risk_model(fit.model, home.home / "scratch" / f"model-{seed}")
    mlflow.set_tracking_uri(registry_config.tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        mlflow.pyfunc.log_model(
            name="model", loader_module="keel.tracking", data_path=str(folder), pip_requirements=[]
        )
    return run.info.run_id


def build_world(home: KeelPaths, backend: str = "sqlite", accounts: int = ACCOUNTS) -> World:
    """Marts, Feast (applied, newest day materialised) and two registered LightGBM models."""
    from keel import features
    from keel.mirrors.feast_online_stores import KeelRedisOnlineStore
    from keel.registry import ModelRegistry, RegistryConfig

    if backend == "redis" and not redis_available():
        pytest.skip(SKIP_REDIS)
    home.ensure()
    project = f"srv{uuid.uuid4().hex[:10]}"
    overrides: dict[str, Any] = {"project": project}
    if backend == "redis":
        overrides["online_store"] = {
            "type": f"{KeelRedisOnlineStore.__module__}.{KeelRedisOnlineStore.__name__}",
            "connection_string": f"{REDIS_HOST}:{REDIS_PORT}",
        }
    days = [FIRST_DAY + timedelta(days=n) for n in range(DAYS)]
    with keel_home_env(home):
        write_synthetic_marts(home.marts, accounts=accounts, days=DAYS, label_rows=accounts)
        store = features.open_store(overrides=overrides)
        features.apply_repo(store)
        features.materialize_day(store, days[0])
        config = RegistryConfig.local(home)
        registry = ModelRegistry(config)
        try:
            champion_run = log_lightgbm_run(home, config, seed=1)
            champion = registry.register(
                champion_run, {"roc_auc": 0.7}, GATES, actor=TRAINER, auto_approve=True
            ).version
            challenger_run = log_lightgbm_run(home, config, seed=2)
            challenger = registry.register(
                challenger_run, {"roc_auc": 0.71}, GATES, actor=TRAINER
            ).version
            registry.approve(challenger, actor=APPROVER, reason="serving test challenger")
        finally:
            registry.close()
    return World(
        home=home,
        backend=backend,
        project=project,
        feast_overrides=overrides,
        account_ids=[int(n) * 10 for n in range(1, accounts + 1)],
        champion=str(champion),
        challenger=str(challenger),
        registry={
            "tracking_uri": config.tracking_uri,
            "registry_uri": config.registry_uri,
            "lock_file": config.lock_file,
        },
        days=days,
        materialised=[days[0]],
    )


def clone_world(world: World, home: KeelPaths, backend: str | None = None) -> World:
    """A copy of ``world`` in ``home``: its own registry and online store, in a second or two.

    The copy's registered models still load from ``world``'s artefacts (read only). A Redis
    copy gets its own Feast project, applied and materialised afresh.
    """
    from keel import features
    from keel.mirrors.feast_online_stores import KeelRedisOnlineStore
    from keel.registry import RegistryConfig

    backend = backend or world.backend
    if backend == "redis" and not redis_available():
        pytest.skip(SKIP_REDIS)
    shutil.copytree(world.home.home, home.home)
    shutil.rmtree(home.artefacts / "prediction_log", ignore_errors=True)
    shutil.rmtree(home.home / "serve", ignore_errors=True)
    config = RegistryConfig.local(home)
    clone = replace(
        world,
        home=home,
        backend=backend,
        registry={
            "tracking_uri": config.tracking_uri,
            "registry_uri": config.registry_uri,
            "lock_file": config.lock_file,
        },
        materialised=list(world.materialised),
    )
    if backend != world.backend or backend == "redis":
        clone.project = f"srv{uuid.uuid4().hex[:10]}"
        clone.feast_overrides = {"project": clone.project}
        if backend == "redis":
            clone.feast_overrides["online_store"] = {
                "type": f"{KeelRedisOnlineStore.__module__}.{KeelRedisOnlineStore.__name__}",
                "connection_string": f"{REDIS_HOST}:{REDIS_PORT}",
            }
        with keel_home_env(home):
            store = features.open_store(overrides=clone.feast_overrides)
            features.apply_repo(store)
            for day in clone.materialised:
                features.materialize_day(store, day)
    return clone


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    world: World, port: int, workers: int = 2, log_file: Path | None = None, **settings: Any
) -> subprocess.Popen:
    """``keel serve`` on 127.0.0.1:``port`` for ``world`` in a new process group."""
    environment = {
        **os.environ,
        **world.serve_settings(**settings).to_env(),
        HOME_ENV: str(world.home.home),
        PROFILE_ENV: "local",
    }
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    command = [str(Path(sys.executable).parent / "keel"), "serve", "--port", str(port)]
    return subprocess.Popen(
        [*command, "--workers", str(workers)],
        env=environment,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 240.0) -> None:
    """Wait until ``/readyz`` answers 200 (workers import Feast and MLflow: slow on 2 cores)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keel serve exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"keel serve on port {port} not ready after {timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture(scope="session")
def serving_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One SQLite-backed world per test session; never change it (clone it: `fresh_world`)."""
    return build_world(KeelPaths(tmp_path_factory.mktemp("serving-sqlite") / "keel-home"))


@pytest.fixture(scope="session")
def serving_world_redis(
    tmp_path_factory: pytest.TempPathFactory, serving_world: World
) -> Iterator[World]:
    """The session's world on the real Redis (its own project); skips when Redis is down."""
    home = KeelPaths(tmp_path_factory.mktemp("serving-redis") / "keel-home")
    world = clone_world(serving_world, home, backend="redis")
    yield world
    delete_redis_project(world.project)


@pytest.fixture
def fresh_world(tmp_path: Path, serving_world: World) -> World:
    """A copy of the session's world for one test that changes aliases or materialises days."""
    return clone_world(serving_world, KeelPaths(tmp_path / "keel-home"))
