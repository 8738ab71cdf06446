"""Releases of keel serve: deployments follow the registry, canary guardrails, blue-green, shadow.

Fast tests run on a copy of the session's serving world registry (real MLflow, real LightGBM
models, real audit table), so they may move aliases freely. Tests against the running app
under load are marked slow.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from keel.registry import ApprovalError, ModelRegistry, RegistryConfig
from keel.serving import guardrails, release
from keel.serving.deployments import (
    CANARY,
    CHAMPION,
    Deployments,
    LoadedModel,
    Snapshot,
    entity_bucket,
)
from keel.serving.guardrails import GuardrailPolicy, evaluate_canary
from keel.serving.prediction_log import PredictionLogWriter
from keel.settings import KeelPaths
from tests.serving_support import APPROVER, GATES, TRAINER, World, serving_world  # noqa: F401 (a fixture)

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


def test_blue_green_switch_is_instant_and_switches_back(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World
) -> None:
    champion, challenger = world.champion, world.challenger
    deployments = Deployments(registry_copy, poll_seconds=0.2)
    deployments.refresh()
    release.assign_slot(registry, "green", challenger, "ops")
    deployments.refresh()
    standby = deployments.current.standby
    assert standby.version == challenger and deployments.current.live_slot == "blue"

    release.switch(registry, "ops", "release 2")
    deployments.refresh()
    assert deployments.current.champion.version == challenger
    # The switched-to model is the one already warm in the standby slot: nothing was loaded.
    assert deployments.current.champion.model is standby.model
    assert deployments.current.standby.version == champion
    assert deployments.current.live_slot == "green"

    release.switch(registry, "ops", "switch back")
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
    assert registry.champion() == champion


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
