"""Release paths through Dagster: a canary release mode for registration, the canary's own
expected score distribution as its PSI reference, and the shadow report as an evaluation gate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import dagster as dg
import numpy as np

from keel.evaluation.metrics import QUALITY_METRICS
from keel.registry import ModelRegistry, RegistryConfig
from keel.serving import release
from keel.serving.deployments import CANARY
from keel.serving.guardrails import TAG_SCORE_HISTOGRAM, score_histogram
from keel.serving.prediction_log import PredictionLogWriter
from keel.settings import KeelPaths
from tests import release_support
from tests.release_support import dagster_resources, log_rows
from tests.serving_support import (  # noqa: F401 (serving_world is a fixture)
    GATES,
    World,
    log_lightgbm_run,
    serving_world,
)

world = release_support.world
registry_copy = release_support.registry_copy
registry = release_support.registry

EVALUATION_KEY = dg.AssetKey("challenger_evaluation")


def _evaluated_run(world: World, config: RegistryConfig, tmp_path: Path, seed: int) -> str:
    """A freshly trained run in the private registry copy, logged as the training stage does."""
    home = KeelPaths(tmp_path / "release-home")
    shutil.copytree(world.home.marts, home.marts, dirs_exist_ok=True)
    return log_lightgbm_run(home, config, seed=seed)


def _passing_summary(run_id: str) -> dict:
    """An evaluation summary of ``run_id`` that passed every gate."""
    quality = dict.fromkeys(QUALITY_METRICS, 0.7)
    return {
        "gates": [{"name": name, "passed": True} for name in GATES],
        "all_gates_passed": True,
        "comparison": None,
        "challenger": {
            "uri": f"runs:/{run_id}/model",
            "details": {"run_id": run_id},
            "quality": quality,
            "threshold": {"value": 0.5},
            "serving": {
                "latency_p50_ms": 1.0,
                "latency_p99_ms": 2.0,
                "throughput_rows_per_s": 1e5,
            },
            "fairness": {},
            "score_histogram": score_histogram(np.random.default_rng(5).beta(2, 8, 5_000)),
        },
    }


def _record_evaluation(instance: dg.DagsterInstance, summary: dict, folder: Path) -> None:
    """A challenger_evaluation materialisation of ``summary``, as the evaluation records it."""
    path = folder / f"evaluation-{len(list(folder.glob('evaluation-*')))}.json"
    content = json.dumps(summary).encode()
    path.write_bytes(content)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            EVALUATION_KEY,
            metadata={
                "evaluation_path": dg.MetadataValue.path(str(path)),
                "evaluation_sha256": hashlib.sha256(content).hexdigest(),
            },
        )
    )


def test_canary_release_mode_registers_without_promoting_and_the_judge_promotes(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    from assets.registry import registered_model
    from assets.serving import canary_deployment
    from orchestration.resources import ModelGovernance

    run_id = _evaluated_run(world, registry_copy, tmp_path, seed=3)
    resources = dagster_resources(registry_copy, tmp_path)
    resources["governance"] = ModelGovernance(auto_approve=True, release="canary")
    run_config = {
        "ops": {
            "canary_deployment": {
                "config": {
                    "share": 0.3,
                    "min_requests": 100,
                    "promote_after_requests": 300,
                    "promote_after_minutes": 0.0,
                }
            }
        }
    }
    with dg.DagsterInstance.ephemeral() as instance:
        _record_evaluation(instance, _passing_summary(run_id), tmp_path)
        result = dg.materialize(
            [registered_model, canary_deployment],
            resources=resources,
            run_config=run_config,
            instance=instance,
        )
    registered = result.asset_materializations_for_node("registered_model")[0].metadata
    version = str(registered["version"].value)
    assert registered["approval_status"].value == "approved"
    assert registered["aliases"].value == "challenger"
    tags = registry.client.get_model_version(registry.name, version).tags
    assert json.loads(tags[TAG_SCORE_HISTOGRAM])["edges"]
    assert registry.champion() == world.champion
    canary = result.asset_materializations_for_node("canary_deployment")[0].metadata
    assert canary["canary_version"].value == version
    assert canary["champion_version"].value == world.champion

    # The canary holds on live traffic; its judge promotes it.
    state = release.release_state(registry)
    start = datetime.fromisoformat(state.canary_started_at)
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(log_rows("champion", world.champion, 300, start=start, seed=1))
    writer.write(log_rows(CANARY, version, 300, start=start, seed=2))
    writer.close()
    assert release.evaluate_release(registry, tmp_path / "log").action == "promoted"
    assert registry.champion() == version
    actions = [r.action for r in registry.audit_records(limit=5)]
    assert actions[-4:] == ["approve", "canary_start", "canary_pass", "promote"]


# -- the score guardrail: the canary's live scores against its own held-out scores -------------


def test_score_guardrail_holds_a_retrained_canary_and_breaches_a_broken_feature() -> None:
    from datetime import UTC, timedelta

    from keel.serving.guardrails import evaluate_canary
    from tests.release_support import FAST_POLICY, log_frame

    rng = np.random.default_rng(11)
    start = datetime.now(UTC) - timedelta(minutes=5)
    # A retrained model ranks the same accounts with another score scale than the champion.
    champion = log_rows("champion", "1", 600, start=start, seed=1)
    for row in champion:
        row["score"] = float(rng.beta(5, 5))
    held_out = rng.beta(2, 8, 5_000)
    expected = score_histogram(held_out)

    def judge(canary_scores):
        canary = log_rows(CANARY, "2", len(canary_scores), start=start, seed=2)
        for row, value in zip(canary, canary_scores, strict=True):
            row["score"] = float(value)
        frame = log_frame(champion + canary)
        now = datetime.now(UTC)
        verdict = evaluate_canary(
            frame, "2", "1", start, FAST_POLICY, now, expected_scores=expected
        )
        return next(c for c in verdict.checks if c.name == "score_psi"), verdict

    healthy, verdict = judge(rng.beta(2, 8, 500))
    assert healthy.passed is True and healthy.canary < 0.1
    assert healthy.champion > FAST_POLICY.max_psi  # far from the champion: evidence only
    assert verdict.state == "promote"
    # A broken feature (say, spend read as zero) moves the canary's live scores up.
    broken, verdict = judge(np.clip(rng.beta(2, 8, 500) + 0.15, 0, 1))
    assert broken.passed is False and broken.canary > FAST_POLICY.max_psi
    assert [c.name for c in verdict.breaches] == ["score_psi"]
    # Without an expected distribution the score distribution is reported, never judged.
    frame = log_frame(champion + log_rows(CANARY, "2", 500, start=start, seed=2))
    unjudged = evaluate_canary(frame, "2", "1", start, FAST_POLICY, datetime.now(UTC))
    psi = next(c for c in unjudged.checks if c.name == "score_psi")
    assert psi.passed is None and psi.champion > FAST_POLICY.max_psi


def test_a_canary_whose_live_scores_leave_its_held_out_ones_is_rolled_back(
    registry: ModelRegistry, world: World, tmp_path: Path
) -> None:
    from tests.release_support import FAST_POLICY

    held_out = np.random.default_rng(3).beta(2, 8, 5_000)
    registry.client.set_model_version_tag(
        registry.name, world.challenger, TAG_SCORE_HISTOGRAM, json.dumps(score_histogram(held_out))
    )
    release.start_canary(registry, world.challenger, "ops", share=0.3, policy=FAST_POLICY)
    start = datetime.fromisoformat(release.release_state(registry).canary_started_at)
    shifted = log_rows(CANARY, world.challenger, 200, start=start, seed=2)
    for row in shifted:
        row["score"] = min(1.0, row["score"] + 0.3)
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(log_rows("champion", world.champion, 200, start=start, seed=1))
    writer.write(shifted)
    writer.close()
    outcome = release.evaluate_release(registry, tmp_path / "log")
    assert outcome.action == "rolled_back"
    check = next(c for c in outcome.record.details["checks"] if c["name"] == "score_psi")
    assert check["passed"] is False and "held-out" in check["detail"]


# -- the shadow report as one more evaluation gate --------------------------------------------


def test_a_failing_shadow_report_is_an_evaluation_gate_that_blocks_registration(
    registry: ModelRegistry, registry_copy: RegistryConfig, world: World, tmp_path: Path
) -> None:
    from assets.evaluation import add_shadow_gate
    from assets.registry import registered_model
    from assets.serving import SHADOW_KEY

    run_id = registry.client.get_model_version(registry.name, world.challenger).run_id
    resources = dagster_resources(registry_copy, tmp_path)

    def shadowed(instance: dg.DagsterInstance, day: str, agreement: float) -> None:
        comparison = {"rows": 400, "agreement": agreement, "shadow_versions": [world.challenger]}
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                SHADOW_KEY,
                partition=day,
                metadata={"comparison": dg.MetadataValue.json(comparison)},
            )
        )

    with dg.DagsterInstance.ephemeral() as instance:
        summary = _passing_summary(run_id)
        none = add_shadow_gate(instance, registry.client, registry.name, run_id, summary)
        assert none == "no shadow report of this challenger"
        assert [g["name"] for g in summary["gates"]] == list(GATES)

        shadowed(instance, "2026-01-02", agreement=0.55)
        detail = add_shadow_gate(instance, registry.client, registry.name, run_id, summary)
        gate = summary["gates"][-1]
        assert (gate["name"], gate["passed"], gate["value"]) == ("shadow_agreement", False, 0.55)
        assert detail.startswith(f"shadow report 2026-01-02 of version {world.challenger}")
        assert summary["all_gates_passed"] is False
        _record_evaluation(instance, summary, tmp_path)
        blocked = dg.materialize(
            [registered_model], resources=resources, instance=instance, raise_on_error=False
        )
        assert not blocked.success
        assert blocked.asset_materializations_for_node("registered_model") == []
        failure = next(e for e in blocked.all_events if e.is_step_failure)
        assert "shadow_agreement" in failure.event_specific_data.error.message

        # A newer shadow report that agrees replaces the verdict: registration goes ahead.
        shadowed(instance, "2026-01-03", agreement=0.95)
        summary = _passing_summary(run_id)
        add_shadow_gate(instance, registry.client, registry.name, run_id, summary)
        assert summary["gates"][-1]["passed"] is True and summary["all_gates_passed"] is True
        _record_evaluation(instance, summary, tmp_path)
        passed = dg.materialize([registered_model], resources=resources, instance=instance)
    registered = passed.asset_materializations_for_node("registered_model")[0].metadata
    assert str(registered["version"].value) == world.challenger
