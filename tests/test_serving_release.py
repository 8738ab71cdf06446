"""Releases of keel serve: deployments follow the registry, guardrails, the judge, blue-green.

The tests run on a private copy of the session's serving world registry (real MLflow, real
LightGBM models, real audit table), so they may move aliases freely. The running app under
load is in test_serving_release_app.py.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
)
from keel.serving.guardrails import evaluate_canary
from keel.serving.log_tail import GUARDRAIL_COLUMNS, PredictionLogTail
from keel.serving.prediction_log import SHADOW, PredictionLogWriter, read_prediction_log
from tests import release_support
from tests.release_support import FAST_POLICY, dagster_resources, log_frame, log_rows
from tests.serving_support import (  # noqa: F401 (serving_world is a fixture)
    APPROVER,
    GATES,
    TRAINER,
    World,
    serving_world,
)

# Fixtures shared with the app tests.
world = release_support.world
registry_copy = release_support.registry_copy
registry = release_support.registry
webhook = release_support.webhook


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
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    version = registry.client.create_model_version(
        registry.name, registry.client.get_model_version_download_uri(registry.name, "2")
    ).version
    with pytest.raises(ApprovalError, match="only once approved"):
        release.start_canary(registry, str(version), "ops", share=0.1)
    assert release.release_state(registry).canary is None
    # Aliases moved by hand in MLflow: the audit log holds no approval, so it serves nothing.
    registry.client.set_registered_model_alias(registry.name, CANARY, str(version))
    registry.client.set_registered_model_tag(registry.name, "keel.canary_share", "0.5")
    deployments = Deployments(registry_copy, poll_seconds=0.2)
    assert deployments.refresh() and deployments.current.canary is None
    assert "not approved" in deployments.failed_versions()[str(version)]
    assert release.evaluate_release(registry, tmp_path / "log").action == "unmanaged"
    # Even an approved version is not followed as champion when the alias moved by hand.
    registry.client.set_registered_model_alias(registry.name, CHAMPION, world.challenger)
    assert deployments.refresh()
    assert deployments.current.champion.version == world.champion
    assert "moved outside Keel" in deployments.last_error


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
    # The CLI and the job act as authenticated identities: "ops" runs the CLI.
    from keel.access import KeyStore

    keys = KeyStore(tmp_path / "access.db")
    monkeypatch.setenv("KEEL_ACCESS_FILE", str(keys.path))
    monkeypatch.setenv("KEEL_API_KEY", keys.add("ops", ["deployer"]))
    runner = CliRunner()

    def keel(*args: str) -> str:
        result = runner.invoke(keel_cli.cli, ["release", *args])
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

    monkeypatch.setenv("KEEL_API_KEY", keys.add("dagster-ops", ["deployer"]))
    run = registry_action.execute_in_process(
        run_config={
            "ops": {"apply_registry_action": {"config": {"action": "switch", "reason": "back"}}}
        },
        resources=dagster_resources(registry_copy, tmp_path),
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
    refused = runner.invoke(keel_cli.cli, ["release", "canary", champion])
    assert refused.exit_code == 1 and "champion already" in refused.output


# -- guardrails --------------------------------------------------------------------------------


def _feature_frame(names: tuple[str, ...], rows: int) -> pd.DataFrame:
    from keel.serving.deployments import warm_frame

    return warm_frame(names, rows)


def test_guardrails_flag_errors_latency_and_score_shift_and_pass_a_healthy_canary() -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    now = datetime.now(UTC)
    champion = log_rows("champion", "1", 900, start=start, seed=1)

    # The canary's scores on its held-out window, as its evaluation stored them.
    expected = guardrails.score_histogram(np.random.default_rng(9).beta(2, 8, 5_000))

    def verdict(canary_rows):
        frame = log_frame(champion + canary_rows)
        return evaluate_canary(frame, "2", "1", start, FAST_POLICY, now, expected_scores=expected)

    healthy = verdict(log_rows(CANARY, "2", 400, start=start, seed=2))
    assert healthy.state == guardrails.PROMOTE and not healthy.breaches
    erroring = verdict(log_rows(CANARY, "2", 400, start=start, error_share=0.2, seed=2))
    assert [c.name for c in erroring.breaches] == ["error_rate"]
    assert erroring.breaches[0].canary == pytest.approx(0.2)
    slow = verdict(log_rows(CANARY, "2", 400, start=start, latency_ms=20.0, seed=2))
    assert [c.name for c in slow.breaches] == ["p99_latency_ms"]
    shifted = log_rows(CANARY, "2", 400, start=start, seed=2)
    for row in shifted:
        row["score"] = min(1.0, row["score"] + 0.3)
    assert [c.name for c in verdict(shifted).breaches] == ["score_psi"]
    few = verdict(log_rows(CANARY, "2", 50, start=start, error_share=0.5, seed=2))
    assert few.state == guardrails.COLLECTING and not few.breaches


def test_latency_guardrail_compares_the_span_both_arms_cover_with_enough_rows() -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    now = datetime.now(UTC)
    # The champion's first 9 s were slow (a busy machine); the canary started later.
    champion = log_rows("champion", "1", 900, start=start, latency_ms=30.0, seed=1)
    champion += log_rows("champion", "1", 900, start=start + timedelta(seconds=9), seed=3)
    later = start + timedelta(seconds=9)
    canary = log_rows(CANARY, "2", 400, start=later, latency_ms=9.0, seed=2)
    verdict = evaluate_canary(log_frame(champion + canary), "2", "1", start, FAST_POLICY, now)
    latency = next(c for c in verdict.checks if c.name == "p99_latency_ms")
    assert latency.passed is False and latency.champion < 5  # only the span both arms cover
    # The same slow canary on too few rows for a p99 is not judged on latency yet.
    policy = replace(FAST_POLICY, min_latency_rows=500)
    few = evaluate_canary(log_frame(champion + canary), "2", "1", start, policy, now)
    latency = next(c for c in few.checks if c.name == "p99_latency_ms")
    assert latency.passed is None and "a p99 needs 500" in latency.detail
    assert few.state != guardrails.BREACHED and not few.breaches


def test_auc_guardrail_judges_once_labels_arrive() -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    rng = np.random.default_rng(7)
    champion = log_rows("champion", "1", 600, start=start, seed=1)
    canary = log_rows(CANARY, "2", 600, start=start, seed=2)
    labels = []
    for row in champion + canary:
        label = int(rng.random() < 0.3)
        labels.append({"account_id": row["account_id"], "label": label})
        # The champion ranks well; the canary's scores are noise.
        if row["arm"] == "champion":
            row["score"] = float(np.clip(0.3 + 0.4 * label + rng.normal(0, 0.15), 0, 1))
    frame = log_frame(champion + canary)
    without = evaluate_canary(frame, "2", "1", start, FAST_POLICY, datetime.now(UTC))
    assert next(c for c in without.checks if c.name == "auc").passed is None
    labelled = pd.DataFrame(labels).drop_duplicates("account_id")
    judged = evaluate_canary(frame, "2", "1", start, FAST_POLICY, datetime.now(UTC), labelled)
    auc = next(c for c in judged.checks if c.name == "auc")
    assert auc.passed is False and auc.champion > 0.8 and auc.canary < 0.6


# -- the judge: rollback with evidence and an alert, promotion, idempotence --------------------


def test_a_breached_canary_is_rolled_back_once_with_evidence_and_an_alert(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path, webhook
) -> None:
    url, received = webhook
    champion, challenger = world.champion, world.challenger
    release.start_canary(registry, challenger, "ops", share=0.3, policy=FAST_POLICY)
    start = datetime.fromisoformat(release.release_state(registry).canary_started_at)
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(log_rows("champion", champion, 400, start=start, seed=1))
    writer.write(log_rows(CANARY, challenger, 200, start=start, error_share=0.2, seed=2))
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
    writer.write(log_rows("champion", champion, 200, start=start, seed=1))
    writer.write(log_rows(CANARY, challenger, 150, start=start, seed=2))
    writer.close()
    # Not yet enough canary requests for promotion: it keeps running.
    tail = PredictionLogTail()  # as the watcher judges: the second call reads only new lines
    assert release.evaluate_release(registry, tmp_path / "log", tail=tail).action == "healthy"
    assert tail.lines_parsed == 350
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(log_rows(CANARY, challenger, 200, start=start, seed=3))
    writer.close()
    outcome = release.evaluate_release(registry, tmp_path / "log", tail=tail)
    assert tail.lines_parsed == 550
    assert outcome.action == "promoted"
    assert registry.champion() == challenger
    assert release.release_state(registry).canary is None
    records = registry.audit_records(limit=2)
    assert [(r.action, r.from_version, r.to_version) for r in records] == [
        ("canary_pass", champion, challenger),
        ("promote", champion, challenger),
    ]
    assert records[0].details["canary_rows_since_start"] == 350


def test_the_log_tail_reads_each_line_once_and_equals_a_full_read(tmp_path: Path) -> None:
    start = datetime.now(UTC) - timedelta(seconds=30)
    folder = tmp_path / "log"
    first, second = PredictionLogWriter(folder), PredictionLogWriter(folder, rotate_bytes=1)
    rows = log_rows(CHAMPION, "1", 300, start=start, seed=1)
    rows += log_rows(CANARY, "2", 100, start=start, error_share=0.1, seed=2)
    for row in rows:
        row["features"] = {"balance": 1.5, "segment": 'a,"features":{}'}
    shadow = [{"record": SHADOW, "request_id": r["request_id"], "row": 0} for r in rows]
    before = log_rows(CHAMPION, "1", 50, start=start - timedelta(minutes=5), seed=3)
    first.write(before + rows[:250] + shadow[:100])
    tail = PredictionLogTail()
    assert len(tail.read(folder, start)) == 250
    assert tail.lines_parsed == 300  # the 50 earlier rows are parsed, then left out by time
    second.write(rows[250:300])  # a second worker's file, rotated after every write
    second.write(rows[300:])
    with (folder / first.path.name).open("ab") as handle:
        handle.write(b'{"record":"prediction","ts":"2026')  # a line still being written
    read = tail.read(folder, start)
    assert tail.lines_parsed == 450  # only the 150 new lines were parsed
    full = read_prediction_log(folder, since=start)
    key = ["ts", "account_id"]
    pd.testing.assert_frame_equal(
        read.sort_values(key).reset_index(drop=True),
        full[list(GUARDRAIL_COLUMNS)].sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )
    now = datetime.now(UTC)
    verdict = evaluate_canary(read, "2", "1", start, FAST_POLICY, now)
    assert verdict.canary_rows == 100 and verdict.checks[0].passed is False
    assert verdict == evaluate_canary(full, "2", "1", start, FAST_POLICY, now)
    # A later start reads again from scratch; rows that leave the window are counted.
    later = start + timedelta(milliseconds=1)  # leaves out the first row of each arm
    assert len(tail.read(folder, later)) == 398 and tail.lines_parsed == 450
    kept = tail.read(folder, later, keep_from=datetime.now(UTC))
    assert kept.empty
    assert (tail.dropped_rows(CHAMPION, "1"), tail.dropped_rows(CANARY, "2")) == (299, 99)
    first.close()
    second.close()


# -- Dagster: the canary asset and sensor, the daily live-traffic assets -----------------------


def test_dagster_canary_asset_and_sensor_roll_back_a_breached_canary(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path, webhook
) -> None:
    import dagster as dg

    from assets.serving import CanaryConfig, canary_deployment
    from orchestration.release_sensors import SENSOR_ACTOR, canary_sensor

    url, received = webhook
    resources = dagster_resources(registry_copy, tmp_path, url)
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
        writer.write(log_rows("champion", world.champion, 300, start=start, seed=1))
        writer.write(log_rows(CANARY, world.challenger, 150, start=start, error_share=0.2))
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
    rows = log_rows("champion", "1", 400, start=start, seed=4)
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
    writer.write(log_rows("champion", "1", 5, start=start - timedelta(days=1)))  # another day
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
    resources = dagster_resources(RegistryConfig("sqlite://", "sqlite://"), tmp_path)
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
