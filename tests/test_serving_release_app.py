"""The release side against the running app: admin routes, hot swap, faulty canaries, outages.

The real app (`keel.serving.app.create_app`) runs under uvicorn on a free 127.0.0.1 port with
features from the serving world's online store; clients are threads with bounded request
counts and time. Faults are injected where a model is loaded (`FaultyModel`): the registry,
the app, the log, the guardrails and the watcher are the real ones.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.registry import ModelRegistry, RegistryConfig
from keel.serving import release
from keel.serving.deployments import CANARY, CHAMPION, Deployments, load_registered_model
from keel.serving.guardrails import GuardrailPolicy
from keel.serving.prediction_log import PredictionLogWriter
from keel.settings import KeelPaths
from tests import release_support
from tests.release_support import dagster_resources, log_rows
from tests.serving_support import (  # noqa: F401 (serving_world is a fixture)
    World,
    keel_home_env,
    serving_world,
)

world = release_support.world
registry_copy = release_support.registry_copy
registry = release_support.registry


class FaultyModel:
    """A real model with injected faults: every ``fail_every``-th call raises, or a delay."""

    def __init__(self, model, fail_every: int = 0, delay_s: float = 0.0) -> None:
        self.model = model
        self.family = model.family
        self.fail_every = fail_every
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.model.feature_names

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        with self._lock:
            self.calls += 1
            calls = self.calls
        if self.delay_s:
            time.sleep(self.delay_s)
        # The two warm-up calls pass, so the version loads and then fails under traffic.
        if self.fail_every and calls > 2 and calls % self.fail_every == 0:
            raise RuntimeError("injected fault")
        return self.model.predict_proba(frame)


def _loader(config: RegistryConfig, faults: dict[str, dict]):
    def load(version: str):
        return FaultyModel(load_registered_model(config, version), **faults.get(version, {}))

    return load


@contextmanager
def running_app(world: World, config: RegistryConfig, tmp_path: Path, **faults):
    """The real app under uvicorn on a free 127.0.0.1 port, with its deployments started."""
    import uvicorn

    from keel.serving.app import create_app
    from keel.serving.auth import KeyStore

    settings = world.serve_settings(
        registry={
            "tracking_uri": config.tracking_uri,
            "registry_uri": config.registry_uri,
            "lock_file": config.lock_file,
        },
        keys_file=str(tmp_path / "keys.db"),
        log_dir=str(tmp_path / "log"),
        cache_entries=0,
        poll_seconds=0.2,
    )
    keys = KeyStore(settings.resolved_keys_file())
    deploy_key = keys.add("release-manager", ["deploy"])
    predict_key = keys.add("client", ["predict"])
    deployments = Deployments(config, poll_seconds=0.2, load_model=_loader(config, faults))
    deployments.start(wait_s=120)
    assert deployments.ready, deployments.last_error
    app = create_app(settings, deployments=deployments)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    # Feast finds the world's stores through KEEL_HOME while the app starts and runs.
    home = keel_home_env(world.home)
    home.__enter__()
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "the app did not start"
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{sock.getsockname()[1]}",
            deployments=deployments,
            deploy_key=deploy_key,
            predict_key=predict_key,
            log_dir=tmp_path / "log",
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        deployments.stop()
        sock.close()
        home.__exit__(None, None, None)


class Load:
    """Clients sending one-account predictions from threads; bounded in count and time."""

    def __init__(self, service, accounts: list[int], threads: int = 4) -> None:
        self.service, self.accounts, self.threads = service, accounts, threads
        self.ok = self.failed = 0
        self.versions: set[str] = set()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self, seed: int, max_requests: int, deadline: float) -> None:
        import httpx

        rng = np.random.default_rng(seed)
        headers = {"X-API-Key": self.service.predict_key}
        with httpx.Client(base_url=self.service.url, headers=headers, timeout=30) as client:
            for _ in range(max_requests):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                account = int(rng.choice(self.accounts))
                try:
                    response = client.post("/v1/predict", json={"account_ids": [account]})
                    good = response.status_code == 200
                    version = response.json()["predictions"][0]["model_version"] if good else ""
                except httpx.HTTPError:
                    good, version = False, ""
                with self._lock:
                    self.ok += good
                    self.failed += not good
                    self.versions.add(version)

    def start(self, max_requests: int, max_seconds: float) -> Load:
        deadline = time.monotonic() + max_seconds
        per_thread = max_requests // self.threads
        self._workers = [
            threading.Thread(target=self._run, args=(n, per_thread, deadline), daemon=True)
            for n in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def join(self) -> Load:
        self.stop.set()
        for worker in self._workers:
            worker.join(timeout=60)
        return self


def _wait_for(condition, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - started


def test_admin_routes_need_the_deploy_role_and_record_the_key_owner(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    import httpx

    with (
        running_app(world, registry_copy, tmp_path) as service,
        httpx.Client(base_url=service.url, timeout=30) as client,
    ):
        body = {"version": world.challenger, "share": 0.2, "min_requests": 50}
        assert client.post("/v1/admin/canary", json=body).status_code == 401
        as_client = {"X-API-Key": service.predict_key}
        assert client.post("/v1/admin/canary", json=body, headers=as_client).status_code == 403
        deployer = {"X-API-Key": service.deploy_key}
        bad = client.post("/v1/admin/canary", json={**body, "share": 1.5}, headers=deployer)
        assert bad.status_code == 422
        started = client.post("/v1/admin/canary", json=body, headers=deployer)
        assert started.status_code == 200, started.text
        answer = started.json()
        assert answer["serving"] == {CHAMPION: world.champion, CANARY: world.challenger}
        assert answer["audit_record"]["actor"] == "release-manager"
        assert answer["registry"]["canary_policy"]["min_requests"] == 50
        again = client.post("/v1/admin/slots/green", json={"version": "999"}, headers=deployer)
        assert again.status_code == 409 and "999" in again.json()["detail"]
        client.request(
            "DELETE", "/v1/admin/canary", json={"reason": "done"}, headers=deployer
        ).raise_for_status()
        assert client.post(
            "/v1/admin/slots/green", json={"version": world.challenger}, headers=deployer
        ).is_success
        switched = client.post("/v1/admin/switch", json={}, headers=deployer).json()
        assert switched["serving"] == {CHAMPION: world.challenger}
        back = client.post("/v1/admin/switch", json={"reason": "back"}, headers=deployer)
        assert back.json()["serving"] == {CHAMPION: world.champion}
    actors = {r.actor for r in registry.audit_records(limit=6)}
    assert actors == {"release-manager"}


@pytest.mark.slow
def test_hot_swap_under_load_fails_no_request(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    with running_app(world, registry_copy, tmp_path) as service:
        load = Load(service, world.account_ids).start(max_requests=4_000, max_seconds=60)
        _wait_for(lambda: load.ok >= 200, 60)
        registry.promote(world.challenger, "ops", "hot swap under load")
        swap = _wait_for(
            lambda: service.deployments.current.champion.version == world.challenger, 30
        )
        done = load.ok + 200
        _wait_for(lambda: load.ok >= done, 60)
        load.join()
    print(f"hot swap: {load.ok} ok, {load.failed} failed, swapped after {swap:.2f} s")
    assert load.failed == 0
    assert load.versions == {world.champion, world.challenger}


def _canary_fault_run(registry, config, world, tmp_path, fault: dict, policy: GuardrailPolicy):
    """A canary with ``fault`` under load, judged by the supervisor's watcher; the numbers."""
    release.start_canary(registry, world.challenger, "ops", share=0.3, policy=policy)
    started = time.monotonic()
    with running_app(world, config, tmp_path, **{world.challenger: fault}) as service:
        watcher = release.ReleaseWatcher(config, service.log_dir, interval_s=0.5).start()
        load = Load(service, world.account_ids).start(max_requests=20_000, max_seconds=240)
        try:
            _wait_for(lambda: release.release_state(registry).canary is None, 240)
            rolled_back_after = time.monotonic() - started
            _wait_for(lambda: service.deployments.current.canary is None, 10)
        finally:
            load.join()
            watcher.stop()
    rollback = registry.audit_records(limit=1)[-1]
    return load, rolled_back_after, rollback


@pytest.mark.slow
def test_a_canary_failing_one_request_in_five_is_rolled_back_and_clients_see_no_error(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    policy = GuardrailPolicy(
        window_minutes=2, min_requests=100, max_psi=50.0, promote_after_requests=100_000
    )
    load, after, rollback = _canary_fault_run(
        registry, registry_copy, world, tmp_path, {"fail_every": 5}, policy
    )
    print(f"erroring canary: {load.ok} ok, {load.failed} failed, rolled back after {after:.1f} s")
    assert load.failed == 0
    assert after < policy.window_minutes * 60
    assert rollback.action == "canary_rollback" and rollback.actor == release.WATCHER
    error_check = next(c for c in rollback.details["checks"] if c["name"] == "error_rate")
    assert error_check["passed"] is False and error_check["canary"] == pytest.approx(0.2, abs=0.05)


@pytest.mark.slow
def test_a_canary_five_times_slower_is_rolled_back(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    # The champion's median request latency under the same load sets the canary's handicap:
    # its requests take five times as long.
    with running_app(world, registry_copy, tmp_path / "probe") as service:
        probe = Load(service, world.account_ids).start(400, 60)
        _wait_for(lambda: probe.ok + probe.failed >= 400, 90)
        probe.join()
        from keel.serving.prediction_log import read_prediction_log

        champion_ms = float(read_prediction_log(service.log_dir)["latency_ms"].median())
    # Two different models differ in scores; this test is about speed alone.
    policy = GuardrailPolicy(
        window_minutes=2,
        min_requests=100,
        min_latency_rows=100,
        max_psi=50.0,
        promote_after_requests=100_000,
    )
    fault = {"delay_s": 4 * champion_ms / 1000}
    load, after, rollback = _canary_fault_run(
        registry, registry_copy, world, tmp_path, fault, policy
    )
    latency = next(c for c in rollback.details["checks"] if c["name"] == "p99_latency_ms")
    print(
        f"slow canary: champion median {champion_ms:.1f} ms, canary p99 {latency['canary']:.1f} ms"
        f" vs {latency['champion']:.1f} ms; {load.ok} ok, {load.failed} failed, "
        f"rolled back after {after:.1f} s"
    )
    assert load.failed == 0 and latency["passed"] is False
    assert after < policy.window_minutes * 60


@pytest.mark.slow
def test_registry_down_keeps_the_last_good_model_serving(
    registry: ModelRegistry,
    registry_copy: RegistryConfig,
    world: World,
    tmp_path: Path,
    venv_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The registry behind a real MLflow tracking server that is then stopped.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen(
        [
            str(venv_bin / "mlflow"),
            "server",
            *("--backend-store-uri", registry_copy.tracking_uri),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _answers(url), 120)
        remote = RegistryConfig(
            tracking_uri=url,
            registry_uri=url,
            lock_file=registry_copy.lock_file,
            audit_uri=registry_copy.tracking_uri,
            audit_key_file=str(Path(registry_copy.lock_file).with_name("registry-audit.key")),
        )
        with running_app(world, remote, tmp_path) as service:
            load = Load(service, world.account_ids).start(max_requests=3_000, max_seconds=90)
            _wait_for(lambda: load.ok >= 100, 60)
            server.terminate()
            server.wait(timeout=30)
            polls = service.deployments.polls
            _wait_for(lambda: service.deployments.polls >= polls + 5, 60)
            served_while_down = load.ok
            _wait_for(lambda: load.ok >= served_while_down + 300, 60)
            load.join()
            assert "registry unreachable" in service.deployments.last_error
            assert service.deployments.current.champion.version == world.champion
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    print(f"registry down: {load.ok} ok, {load.failed} failed")
    assert load.failed == 0


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_release_demo_rolls_back_the_broken_canary_and_promotes_the_good_one(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel.serving.demo import run_release_demo

    home = tmp_path / "demo-home"
    shutil.copytree(world.home.home, home, ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv("KEEL_HOME", str(home))
    monkeypatch.setenv("KEEL_PROFILE", "local")
    monkeypatch.setenv("KEEL_SERVE_FEAST_OVERRIDES", json.dumps(world.feast_overrides))
    paths = KeelPaths(home)
    with ModelRegistry(RegistryConfig.local(paths)) as registry:
        registry.promote(world.challenger, "ops", "the loop retrained")
    lines: list[str] = []
    records = run_release_demo(paths, echo=lines.append)
    assert [r.action for r in records] == [
        "canary_start",
        "canary_rollback",
        "canary_start",
        "canary_pass",
        "promote",
        "slot_set",
        "switch",
        "promote",
    ]
    assert all(", 0 failed;" in line for line in lines if "requests answered" in line)
    with ModelRegistry(RegistryConfig.local(paths)) as registry:
        assert registry.champion() == world.challenger


@pytest.mark.slow
def test_drift_report_runs_on_live_traffic(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    import dagster as dg

    from assets.serving import online_drift_report, online_predictions

    day = "2026-01-02"
    source = registry.lineage(world.champion)["training_set"]["path"]
    frame = pd.read_parquet(source).head(400).reset_index(drop=True)
    frame["utilisation"] = frame["utilisation"] + 2.0  # live traffic drifted on two features
    frame["balance"] = frame["balance"] * 5.0
    start = datetime.fromisoformat(f"{day}T10:00:00+00:00")
    rows = log_rows("champion", world.champion, len(frame), start=start, seed=3)
    for row, (_, features) in zip(rows, frame.iterrows(), strict=True):
        row["features"] = {name: features[name] for name in schema.MODEL_FEATURES}
    folder = tmp_path / "artefacts" / "prediction_log"
    writer = PredictionLogWriter(folder)
    writer.write(rows)
    writer.close()
    next(folder.glob("predictions-*.jsonl")).rename(
        folder / "predictions-20260102T000000-1-1.jsonl"
    )
    resources = dagster_resources(registry_copy, tmp_path)
    result = dg.materialize(
        [online_predictions, online_drift_report], resources=resources, partition_key=day
    )
    metadata = result.asset_materializations_for_node("online_drift_report")[0].metadata
    drifted = set(metadata["drifted_features"].value)
    assert {"utilisation", "balance"} <= drifted and "spend_7d" not in drifted
    assert metadata["rows"].value == 400
    assert metadata["champion_version"].value == world.champion
