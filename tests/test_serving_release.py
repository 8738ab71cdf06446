"""Releases of keel serve: deployments follow the registry, canary guardrails, blue-green, shadow.

Fast tests run on a copy of the session's serving world registry (real MLflow, real LightGBM
models, real audit table), so they may move aliases freely. Tests against the running app
under load are marked slow.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.registry import ApprovalError, ModelRegistry, RegistryConfig
from keel.serving import guardrails, release
from keel.serving.deployments import (
    CANARY,
    CHAMPION,
    Deployments,
    LoadedModel,
    Snapshot,
    entity_bucket,
    load_registered_model,
)
from keel.serving.guardrails import GuardrailPolicy, evaluate_canary
from keel.serving.prediction_log import PredictionLogWriter
from keel.settings import KeelPaths
from tests.serving_support import (  # noqa: F401 (serving_world is a fixture)
    APPROVER,
    GATES,
    TRAINER,
    World,
    keel_home_env,
    serving_world,
)

# Small bars so that a test judges after a few hundred log rows.
FAST_POLICY = GuardrailPolicy(
    window_minutes=10,
    min_requests=100,
    promote_after_requests=300,
    promote_after_minutes=0,
)


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    """The session's serving world (registered champion and challenger); aliases never move."""
    return request.getfixturevalue("serving_world")


@pytest.fixture
def registry_copy(world: World, tmp_path: Path) -> RegistryConfig:
    """A private copy of the world's registry database (the model artefacts stay shared)."""
    home = KeelPaths(tmp_path / "release-home").ensure()
    for path in world.home.mlflow.iterdir():  # the database and the audit key
        if path.is_file() and not path.name.endswith(".lock"):
            shutil.copy2(path, home.mlflow / path.name)
    return RegistryConfig.local(home)


@pytest.fixture
def registry(registry_copy: RegistryConfig):
    opened = ModelRegistry(registry_copy)
    yield opened
    opened.close()


def _model(version: str, arm: str = CANARY) -> LoadedModel:
    return LoadedModel(version=version, arm=arm, model=None)


# -- routing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.1, 0.3])
def test_canary_split_is_within_two_points_of_its_share_over_10000_entities(share: float) -> None:
    snapshot = Snapshot(champion=_model("1", CHAMPION), canary=_model("2"), canary_share=share)
    arms = [snapshot.arm_for(account_id) for account_id in range(10_000)]
    assert abs(arms.count(CANARY) / len(arms) - share) <= 0.02


def test_arms_are_sticky_per_entity_across_workers_and_calls() -> None:
    first = Snapshot(champion=_model("1", CHAMPION), canary=_model("2"), canary_share=0.2)
    # Another worker builds its own snapshot later: the same entities go to the same arm.
    second = Snapshot(champion=_model("1", CHAMPION), canary=_model("2"), canary_share=0.2)
    ids = list(range(1_000, 3_000, 7))
    assert [first.arm_for(i) for i in ids] == [second.arm_for(i) for i in reversed(ids)][::-1]
    assert {first.arm_for(i) for i in ids} == {CHAMPION, CANARY}
    # A larger share keeps every earlier canary entity in the canary.
    wider = Snapshot(champion=_model("1", CHAMPION), canary=_model("2"), canary_share=0.5)
    assert all(wider.arm_for(i) == CANARY for i in ids if first.arm_for(i) == CANARY)
    no_canary = Snapshot(champion=_model("1", CHAMPION))
    assert {no_canary.arm_for(i) for i in ids} == {CHAMPION}
    assert 0.0 <= entity_bucket(42, "2") < 1.0


# -- deployments follow the registry ---------------------------------------------------------------


def test_deployments_follow_canary_and_shadow_aliases_and_audit_them(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World
) -> None:
    champion, challenger = world.champion, world.challenger
    deployments = Deployments(registry_copy, poll_seconds=0.2)
    assert deployments.refresh() and deployments.current.versions() == {CHAMPION: champion}
    frame = _feature_frame(deployments.current.champion.feature_names, 5)
    assert deployments.current.champion.predict(frame).shape == (5,)

    release.start_canary(registry, challenger, "ops", share=0.25, policy=FAST_POLICY)
    release.set_shadow(registry, challenger, "ops")
    deployments.refresh()
    snapshot = deployments.current
    assert snapshot.versions() == {CHAMPION: champion, CANARY: challenger, "shadow": challenger}
    assert snapshot.canary_share == 0.25
    assert release.release_state(registry).canary_policy == FAST_POLICY

    release.stop_canary(registry, "ops", "enough")
    release.set_shadow(registry, None, "ops")
    deployments.refresh()
    assert deployments.current.versions() == {CHAMPION: champion}
    records = registry.audit_records(limit=4)
    assert [(r.action, r.actor) for r in records] == [
        ("canary_start", "ops"),
        ("shadow_set", "ops"),
        ("canary_stop", "ops"),
        ("shadow_clear", "ops"),
    ]
    assert records[0].details["share"] == 0.25 and records[0].to_version == challenger
    assert registry.verify_audit().intact


def _register_broken_version(registry: ModelRegistry, world: World, scratch: Path) -> str:
    """A registered, approved version whose weights were altered after it was logged."""
    import mlflow

    from keel.serving.deployments import model_artifacts_uri

    client = registry.client
    good = client.get_model_version(registry.name, world.challenger)
    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model_artifacts_uri(client, registry.name, world.challenger),
            dst_path=str(scratch / "download"),
            tracking_uri=registry.config.tracking_uri,
        )
    )
    weights = next(folder.rglob("model.txt"))
    weights.write_text(weights.read_text().replace("Tree=0", "Tree=0\n", 1))
    experiment = client.create_experiment("broken", artifact_location=str(scratch / "artefacts"))
    tags = {k: v for k, v in client.get_run(good.run_id).data.tags.items() if k.startswith("keel.")}
    tags["keel.dataset_version"] = f"broken-{uuid.uuid4().hex}"
    run = client.create_run(experiment, tags=tags)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    version = registry.register(run.info.run_id, {"roc_auc": 0.7}, GATES, actor=TRAINER).version
    registry.approve(version, APPROVER, "looks fine on paper")
    return version


def test_a_version_that_fails_to_load_never_takes_traffic(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    version = _register_broken_version(registry, world, tmp_path)
    deployments = Deployments(registry_copy, poll_seconds=0.2)
    deployments.refresh()
    release.start_canary(registry, version, "ops", share=0.5)
    assert deployments.refresh()
    assert deployments.current.canary is None
    assert "ModelIntegrityError" in deployments.failed_versions()[version]
    assert deployments.current.champion.version == world.champion

    # Made the champion, it still cannot serve: the last good champion keeps answering.
    release.stop_canary(registry, "ops", "broken")
    registry.promote(version, "ops", "by mistake")
    deployments.refresh()
    assert registry.champion() == version
    assert deployments.current.champion.version == world.champion


def test_an_unapproved_version_cannot_take_canary_traffic(
    registry: ModelRegistry, world: World
) -> None:
    version = registry.client.create_model_version(
        registry.name, registry.client.get_model_version_download_uri(registry.name, "2")
    ).version
    with pytest.raises(ApprovalError, match="only once approved"):
        release.start_canary(registry, str(version), "ops", share=0.1)
    assert release.release_state(registry).canary is None


def test_blue_green_switch_from_the_cli_is_instant_and_the_job_switches_back(
    registry: ModelRegistry,
    registry_copy: RegistryConfig,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from keel import cli as keel_cli

    champion, challenger = world.champion, world.challenger
    fields = ("tracking_uri", "registry_uri", "lock_file")
    registry_json = json.dumps({name: getattr(registry_copy, name) for name in fields})
    monkeypatch.setenv("KEEL_SERVE_REGISTRY", registry_json)
    runner = CliRunner()

    def keel(*args: str) -> str:
        result = runner.invoke(keel_cli.cli, ["release", *args, "--actor", "ops"])
        assert result.exit_code == 0, result.output
        return result.output

    deployments = Deployments(registry_copy, poll_seconds=0.2)
    deployments.refresh()
    assert "slot_set" in keel("slot", "green", challenger)
    deployments.refresh()
    standby = deployments.current.standby
    assert standby.version == challenger and deployments.current.live_slot == "blue"

    assert f"switch by ops: {champion} -> {challenger}" in keel("switch", "--reason", "release")
    deployments.refresh()
    assert deployments.current.champion.version == challenger
    # The switched-to model is the one already warm in the standby slot: nothing was loaded.
    assert deployments.current.champion.model is standby.model
    assert deployments.current.standby.version == champion
    assert deployments.current.live_slot == "green"

    # Switching back from the Dagster registry_action job.
    from assets.registry import registry_action

    run = registry_action.execute_in_process(
        run_config={
            "ops": {
                "apply_registry_action": {
                    "config": {"action": "switch", "actor": "dagster-ops", "reason": "back"}
                }
            }
        },
        resources=_dagster_resources(registry_copy, tmp_path),
    )
    assert run.success
    deployments.refresh()
    assert deployments.current.champion.version == champion
    actions = [(r.action, r.from_version, r.to_version) for r in registry.audit_records(limit=5)]
    assert actions == [
        ("slot_set", None, challenger),
        ("switch", champion, challenger),
        ("promote", champion, challenger),
        ("switch", challenger, champion),
        ("promote", challenger, champion),
    ]
    assert registry.audit_records(limit=1)[-1].actor == "dagster-ops"
    assert registry.champion() == champion
    refused = runner.invoke(keel_cli.cli, ["release", "canary", champion, "--actor", "ops"])
    assert refused.exit_code == 1 and "champion already" in refused.output


# -- guardrails --------------------------------------------------------------------------------


def _feature_frame(names: tuple[str, ...], rows: int) -> pd.DataFrame:
    from keel.serving.deployments import warm_frame

    return warm_frame(names, rows)


def _log_rows(
    arm: str,
    version: str,
    count: int,
    *,
    start: datetime,
    error_share: float = 0.0,
    latency_ms: float = 4.0,
    seed: int = 0,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(count):
        failed = n < round(count * error_share)
        rows.append(
            {
                "record": "prediction",
                "request_id": uuid.uuid4().hex,
                "ts": (start + timedelta(milliseconds=10 * n)).isoformat(),
                "account_id": int(rng.integers(1, 10_000)),
                "row": 0,
                "arm": arm,
                "model_version": version,
                "score": float(rng.beta(2, 8)),
                "latency_ms": float(latency_ms * rng.uniform(0.8, 1.2)),
                "error": f"{arm}: RuntimeError: boom" if failed else None,
                "fallback_version": "1" if failed else None,
                "cache_hit": False,
                "feature_event_time": None,
                "features": {},
                "route": "lookup",
            }
        )
    return rows


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


def test_guardrails_flag_errors_latency_and_score_shift_and_pass_a_healthy_canary() -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    now = datetime.now(UTC)
    champion = _log_rows("champion", "1", 900, start=start, seed=1)

    def verdict(canary_rows):
        return evaluate_canary(_frame(champion + canary_rows), "2", "1", start, FAST_POLICY, now)

    healthy = verdict(_log_rows(CANARY, "2", 400, start=start, seed=2))
    assert healthy.state == guardrails.PROMOTE and not healthy.breaches
    erroring = verdict(_log_rows(CANARY, "2", 400, start=start, error_share=0.2, seed=2))
    assert [c.name for c in erroring.breaches] == ["error_rate"]
    assert erroring.breaches[0].canary == pytest.approx(0.2)
    slow = verdict(_log_rows(CANARY, "2", 400, start=start, latency_ms=20.0, seed=2))
    assert [c.name for c in slow.breaches] == ["p99_latency_ms"]
    shifted = _log_rows(CANARY, "2", 400, start=start, seed=2)
    for row in shifted:
        row["score"] = min(1.0, row["score"] + 0.3)
    assert [c.name for c in verdict(shifted).breaches] == ["score_psi"]
    few = verdict(_log_rows(CANARY, "2", 50, start=start, error_share=0.5, seed=2))
    assert few.state == guardrails.COLLECTING and not few.breaches


def test_auc_guardrail_judges_once_labels_arrive() -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    rng = np.random.default_rng(7)
    champion = _log_rows("champion", "1", 600, start=start, seed=1)
    canary = _log_rows(CANARY, "2", 600, start=start, seed=2)
    labels = []
    for row in champion + canary:
        label = int(rng.random() < 0.3)
        labels.append({"account_id": row["account_id"], "label": label})
        # The champion ranks well; the canary's scores are noise.
        if row["arm"] == "champion":
            row["score"] = float(np.clip(0.3 + 0.4 * label + rng.normal(0, 0.15), 0, 1))
    frame = _frame(champion + canary)
    without = evaluate_canary(frame, "2", "1", start, FAST_POLICY, datetime.now(UTC))
    assert next(c for c in without.checks if c.name == "auc").passed is None
    labelled = pd.DataFrame(labels).drop_duplicates("account_id")
    judged = evaluate_canary(frame, "2", "1", start, FAST_POLICY, datetime.now(UTC), labelled)
    auc = next(c for c in judged.checks if c.name == "auc")
    assert auc.passed is False and auc.champion > 0.8 and auc.canary < 0.6


# -- the judge: rollback with evidence and an alert, promotion, idempotence --------------------


class _Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        return None


@pytest.fixture
def webhook():
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    _Webhook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alert", _Webhook.received
    server.shutdown()
    server.server_close()


def test_a_breached_canary_is_rolled_back_once_with_evidence_and_an_alert(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path, webhook
) -> None:
    url, received = webhook
    champion, challenger = world.champion, world.challenger
    release.start_canary(registry, challenger, "ops", share=0.3, policy=FAST_POLICY)
    start = datetime.fromisoformat(release.release_state(registry).canary_started_at)
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(_log_rows("champion", champion, 400, start=start, seed=1))
    writer.write(_log_rows(CANARY, challenger, 200, start=start, error_share=0.2, seed=2))
    writer.close()
    # The supervisor's watcher and the Dagster sensor judge at the same moment.
    registries = [ModelRegistry(registry_copy) for _ in range(2)]
    outcomes: list = [None, None]

    def judge(n: int) -> None:
        outcomes[n] = release.evaluate_release(registries[n], tmp_path / "log", webhook_url=url)

    threads = [threading.Thread(target=judge, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for opened in registries:
        opened.close()
    assert sorted(o.action for o in outcomes) in (
        ["already_handled", "rolled_back"],
        ["none", "rolled_back"],
    )
    rollbacks = [r for r in registry.audit_records() if r.action == "canary_rollback"]
    assert len(rollbacks) == 1
    evidence = rollbacks[0].details
    assert evidence["state"] == "breached" and evidence["canary_rows"] == 200
    error_check = next(c for c in evidence["checks"] if c["name"] == "error_rate")
    assert error_check["passed"] is False and error_check["canary"] == pytest.approx(0.2)
    assert registry.deployment_state()[0].get(CANARY) is None
    assert registry.champion() == champion
    assert len(received) == 1 and received[0]["canary_version"] == challenger
    assert received[0]["audit_record"] == rollbacks[0].id
    from prometheus_client import REGISTRY

    def gauge(name: str) -> float | None:
        labels = {"arm": CANARY, "guardrail": name}
        return REGISTRY.get_sample_value("keel_serve_guardrail_state", labels)

    assert (gauge("error_rate"), gauge("p99_latency_ms")) == (1.0, 0.0)
    assert release.evaluate_release(registry, tmp_path / "log").action == "none"


def test_a_canary_that_holds_is_promoted_under_the_approval_policy(
    registry: ModelRegistry, world: World, tmp_path: Path
) -> None:
    champion, challenger = world.champion, world.challenger
    release.start_canary(registry, challenger, "ops", share=0.3, policy=FAST_POLICY)
    start = datetime.fromisoformat(release.release_state(registry).canary_started_at)
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(_log_rows("champion", champion, 200, start=start, seed=1))
    writer.write(_log_rows(CANARY, challenger, 150, start=start, seed=2))
    writer.close()
    # Not yet enough canary requests for promotion: it keeps running.
    assert release.evaluate_release(registry, tmp_path / "log").action == "healthy"
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(_log_rows(CANARY, challenger, 200, start=start, seed=3))
    writer.close()
    outcome = release.evaluate_release(registry, tmp_path / "log")
    assert outcome.action == "promoted"
    assert registry.champion() == challenger
    assert release.release_state(registry).canary is None
    records = registry.audit_records(limit=2)
    assert [(r.action, r.from_version, r.to_version) for r in records] == [
        ("canary_pass", champion, challenger),
        ("promote", champion, challenger),
    ]
    assert records[0].details["canary_rows_since_start"] == 350


# -- the running app: admin routes, hot swap, faulty canaries, registry outage -----------------


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
        window_minutes=2, min_requests=100, max_psi=50.0, promote_after_requests=100_000
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


# -- Dagster: the canary asset and sensor, the daily live-traffic assets -----------------------


def _dagster_resources(config: RegistryConfig, root: Path, webhook_url: str = "") -> dict:
    from orchestration.resources import (
        ArtefactStore,
        FeatureStoreResource,
        MlflowResource,
        ModelGovernance,
        MonitoringResource,
    )

    return {
        "mlflow": MlflowResource(
            tracking_uri=config.tracking_uri,
            registry_uri=config.registry_uri,
            artifact_location=str(root / "mlruns"),
            lock_file=config.lock_file,
        ),
        "governance": ModelGovernance(auto_approve=True),
        "artefacts": ArtefactStore(root=str(root / "artefacts")),
        "monitoring": MonitoringResource(webhook_url=webhook_url),
        "feature_store": FeatureStoreResource(
            repo_path=str(root), config_file="feature_store.yaml", marts=str(root / "marts")
        ),
    }


def test_dagster_canary_asset_and_sensor_roll_back_a_breached_canary(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path, webhook
) -> None:
    import dagster as dg

    from assets.serving import CanaryConfig, canary_deployment
    from orchestration.release_sensors import SENSOR_ACTOR, canary_sensor

    url, received = webhook
    resources = _dagster_resources(registry_copy, tmp_path, url)
    # The registered challenger is the registry's `challenger` alias.
    registry.client.set_registered_model_alias(registry.name, "challenger", world.challenger)
    with dg.DagsterInstance.ephemeral() as instance:
        result = canary_deployment(
            context=dg.build_asset_context(instance=instance),
            config=CanaryConfig(share=0.3, min_requests=100),
            mlflow=resources["mlflow"],
            governance=resources["governance"],
        )
        assert result.metadata["canary_version"].value == world.challenger
        state = release.release_state(registry)
        assert state.canary == world.challenger and state.canary_policy.min_requests == 100

        writer = PredictionLogWriter(tmp_path / "artefacts" / "prediction_log")
        start = datetime.fromisoformat(state.canary_started_at)
        writer.write(_log_rows("champion", world.champion, 300, start=start, seed=1))
        writer.write(_log_rows(CANARY, world.challenger, 150, start=start, error_share=0.2))
        writer.close()
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            outcome = canary_sensor(context)
        assert isinstance(outcome, dg.SensorResult)
        observation = outcome.asset_events[0]
        assert observation.metadata["action"].value == "rolled_back"
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            assert isinstance(canary_sensor(context), dg.SkipReason)
    last = registry.audit_records(limit=1)[-1]
    assert (last.action, last.actor) == ("canary_rollback", SENSOR_ACTOR)
    assert received and received[0]["canary_version"] == world.challenger


def test_daily_live_traffic_assets_report_the_shadow(tmp_path: Path) -> None:
    import dagster as dg

    from assets.serving import online_predictions, shadow_report

    day = "2026-01-02"
    start = datetime.fromisoformat(f"{day}T10:00:00+00:00")
    rows = _log_rows("champion", "1", 400, start=start, seed=4)
    rng = np.random.default_rng(5)
    shadows = []
    for row in rows:
        row["features"] = {"spend_7d": 1.0, "product": "gold"}
        # The shadow's line comes later, on its own; it mostly agrees with the served score.
        shadows.append(
            {
                **{k: row[k] for k in ("request_id", "ts", "account_id", "row")},
                "record": "shadow",
                "shadow_version": "2",
                "shadow_score": float(np.clip(row["score"] + rng.normal(0, 0.02), 0, 1)),
                "shadow_latency_ms": 1.5,
                "shadow_error": None,
            }
        )
    folder = tmp_path / "artefacts" / "prediction_log"
    writer = PredictionLogWriter(folder)
    writer.write(rows)
    writer.write(shadows)
    writer.write(_log_rows("champion", "1", 5, start=start - timedelta(days=1)))  # another day
    writer.close()
    # As a worker that started that morning would have named it.
    written = next(folder.glob("predictions-*.jsonl"))
    written.rename(folder / f"predictions-{day.replace('-', '')}T000000-1-1.jsonl")
    marts = tmp_path / "marts" / schema.LABELS_MART
    marts.mkdir(parents=True)
    labels = pd.DataFrame(
        {
            "account_id": [row["account_id"] for row in rows],
            "event_timestamp": pd.Timestamp("2026-01-03", tz="UTC"),
            "defaulted": [int(row["score"] > 0.25) for row in rows],
        }
    ).drop_duplicates("account_id")
    labels.to_parquet(marts / "2026-02-01.parquet")
    resources = _dagster_resources(RegistryConfig("sqlite://", "sqlite://"), tmp_path)
    resources["feature_store"] = resources["feature_store"].model_copy(
        update={"marts": str(tmp_path / "marts")}
    )
    result = dg.materialize(
        [online_predictions, shadow_report], resources=resources, partition_key=day
    )
    online = result.asset_materializations_for_node("online_predictions")[0].metadata
    assert online["rows"].value == 400
    frame = pd.read_parquet(tmp_path / "artefacts" / "online_predictions" / f"{day}.parquet")
    assert frame.loc[0, "product"] == "gold" and frame["spend_7d"].eq(1.0).all()
    report = result.asset_materializations_for_node("shadow_report")[0].metadata
    comparison = report["comparison"].value
    served, shadow = frame["score"].to_numpy(), frame["shadow_score"].to_numpy()
    assert comparison["rows"] == 400
    assert comparison["agreement"] == pytest.approx(((served >= 0.5) == (shadow >= 0.5)).mean())
    assert comparison["pearson"] == pytest.approx(np.corrcoef(served, shadow)[0, 1])
    assert comparison["shadow_p99_ms"] == pytest.approx(1.5)
    from sklearn.metrics import roc_auc_score

    truth = frame["account_id"].map(labels.set_index("account_id")["defaulted"])
    assert comparison["labelled_rows"] == 400
    assert comparison["served_auc"] == pytest.approx(roc_auc_score(truth, served))
    assert comparison["shadow_auc"] == pytest.approx(roc_auc_score(truth, shadow))
    assert comparison["shadow_auc"] < comparison["served_auc"]
    assert report["gate"].value.startswith("passed")


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
    rows = _log_rows("champion", world.champion, len(frame), start=start, seed=3)
    for row, (_, features) in zip(rows, frame.iterrows(), strict=True):
        row["features"] = {name: features[name] for name in schema.MODEL_FEATURES}
    folder = tmp_path / "artefacts" / "prediction_log"
    writer = PredictionLogWriter(folder)
    writer.write(rows)
    writer.close()
    next(folder.glob("predictions-*.jsonl")).rename(
        folder / "predictions-20260102T000000-1-1.jsonl"
    )
    resources = _dagster_resources(registry_copy, tmp_path)
    result = dg.materialize(
        [online_predictions, online_drift_report], resources=resources, partition_key=day
    )
    metadata = result.asset_materializations_for_node("online_drift_report")[0].metadata
    drifted = set(metadata["drifted_features"].value)
    assert {"utilisation", "balance"} <= drifted and "spend_7d" not in drifted
    assert metadata["rows"].value == 400
    assert metadata["champion_version"].value == world.champion
