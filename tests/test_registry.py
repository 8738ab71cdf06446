"""The model registry: lineage tags, approvals, promotion, rollback, audit, parallel writers."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import multiprocessing
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from keel import cli as keel_cli
from keel.registry import (
    ARCHIVED,
    AUTO_APPROVER,
    CHALLENGER,
    CHAMPION,
    PRODUCTION,
    STAGING,
    ApprovalError,
    ModelRegistry,
    RegistryConfig,
    RegistryError,
)
from keel.settings import KeelPaths

GATES = {"minimum_quality": True, "no_regression": True, "fairness": True, "latency_sla": True}
METRICS = {"roc_auc": 0.81, "pr_auc": 0.42, "latency_p99_ms": 1.5}
DBT_MODELS = "stg_accounts,int_account_daily,fct_account_features_daily"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pyfunc_model(value: float):
    import mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.full(len(model_input), value)

    return Constant()


def _write_training_set(paths: KeelPaths, name: str) -> Path:
    target = paths.artefacts / "training_sets" / f"{name}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    pd.DataFrame(
        {
            "account_id": np.arange(50),
            "defaulted": rng.integers(0, 2, 50),
            "spend_7d": rng.random(50),
        }
    ).to_parquet(target)
    return target


def _lineage_tags(training_set: Path, dataset_version: str, family: str, trained_by: str) -> dict:
    return {
        "keel.dataset_version": dataset_version,
        "keel.training_set_path": str(training_set),
        "keel.dagster_data_version": f"dv-{dataset_version[:8]}",
        "keel.code_commit": "0123456789abcdef0123456789abcdef01234567",
        "keel.code_dirty": "false",
        "keel.feature_service": "default_risk_v1",
        "keel.dbt_manifest_hash": hashlib.sha256(b"manifest").hexdigest(),
        "keel.dbt_models": DBT_MODELS,
        "keel.model_family": family,
        "keel.trained_by": trained_by,
    }


def _experiment(config: RegistryConfig, paths: KeelPaths) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking_uri)
    found = client.get_experiment_by_name(config.model_name)
    if found:
        return found.experiment_id
    return client.create_experiment(
        config.model_name, artifact_location=str(paths.mlflow / "artifacts")
    )


def training_run(
    config: RegistryConfig,
    paths: KeelPaths,
    dataset: str = "a",
    family: str = "lightgbm",
    trained_by: str = "alice",
) -> str:
    """An MLflow run as the training stage leaves it: lineage tags and a pyfunc under `model`."""
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    training_set = _write_training_set(paths, dataset)
    dataset_version = hashlib.sha256(training_set.read_bytes()).hexdigest()
    with mlflow.start_run(experiment_id=_experiment(config, paths)) as run:
        mlflow.set_tags(_lineage_tags(training_set, dataset_version, family, trained_by))
        mlflow.pyfunc.log_model(name="model", python_model=_pyfunc_model(0.1), pip_requirements=[])
    return run.info.run_id


def quick_runs(config: RegistryConfig, paths: KeelPaths, count: int) -> list[str]:
    """Runs whose model is a folder of run artefacts (logged by copying one saved model)."""
    import mlflow
    from mlflow import MlflowClient

    saved = paths.home / "saved-model"
    if not saved.exists():
        mlflow.pyfunc.save_model(str(saved), python_model=_pyfunc_model(0.2), pip_requirements=[])
    client = MlflowClient(config.tracking_uri)
    experiment = _experiment(config, paths)
    run_ids = []
    for n in range(count):
        training_set = _write_training_set(paths, f"parallel-{n}")
        run = client.create_run(experiment)
        dataset_version = hashlib.sha256(training_set.read_bytes()).hexdigest()
        for key, value in _lineage_tags(training_set, dataset_version, "torch", "alice").items():
            client.set_tag(run.info.run_id, key, value)
        client.log_artifacts(run.info.run_id, str(saved), "model")
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    return run_ids


@pytest.fixture(autouse=True)
def isolated_mlflow_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_*_URI: keep one test's store out of the next."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow store with its tables made once: creating them costs seconds per test."""
    from mlflow import MlflowClient

    database = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture
def config(keel_home: KeelPaths, empty_mlflow_db: Path) -> RegistryConfig:
    shutil.copyfile(empty_mlflow_db, keel_home.mlflow / "mlflow.db")
    return RegistryConfig.local(keel_home)


@pytest.fixture
def registry(config: RegistryConfig):
    opened = ModelRegistry(config)
    yield opened
    opened.close()


def test_registration_tags_lineage_and_sets_the_challenger(registry, config, keel_home):
    run_id = training_run(config, keel_home)
    info = registry.register(run_id, METRICS, GATES, actor="keel-pipeline")
    assert info.created and info.version == "1"
    assert info.aliases == (CHALLENGER,) and info.stage == STAGING
    assert info.approval_status == "pending"
    tags = registry.client.get_model_version(registry.name, "1").tags
    training_set = Path(tags["keel.training_set_path"])
    assert tags["keel.training_set_sha256"] == hashlib.sha256(training_set.read_bytes()).hexdigest()
    assert tags["keel.feature_service"] == "default_risk_v1"
    assert tags["keel.metric.roc_auc"] == "0.81"
    assert tags["keel.gate.fairness"] == "passed"
    [record] = registry.audit_records()
    assert (record.action, record.to_version, record.details["run_id"]) == ("register", "1", run_id)


def test_registration_refuses_failed_gates_and_missing_lineage(registry, config, keel_home):
    run_id = training_run(config, keel_home)
    with pytest.raises(RegistryError, match="failed the gates fairness"):
        registry.register(run_id, METRICS, {**GATES, "fairness": False}, actor="keel-pipeline")
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking_uri)
    bare = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    with pytest.raises(RegistryError, match=r"lacks the lineage tags keel\.dataset_version"):
        registry.register(bare, METRICS, GATES, actor="keel-pipeline")
    assert registry.audit_records() == []


def test_registration_is_idempotent_per_dataset_version_and_family(registry, config, keel_home):
    first = registry.register(training_run(config, keel_home), METRICS, GATES, actor="ci")
    again = registry.register(training_run(config, keel_home), METRICS, GATES, actor="ci")
    assert (again.version, again.created) == (first.version, False)
    other_family = registry.register(
        training_run(config, keel_home, family="torch"), METRICS, GATES, actor="ci"
    )
    assert other_family.version == "2"
    assert [r.action for r in registry.audit_records()] == ["register", "register"]


def test_self_approval_is_refused_and_promotion_needs_approval(registry, config, keel_home):
    version = registry.register(training_run(config, keel_home), METRICS, GATES, actor="ci").version
    with pytest.raises(ApprovalError, match="alice trained version 1 and may not approve it"):
        registry.approve(version, actor="alice", reason="looks good to me")
    with pytest.raises(ApprovalError, match="promotion to champion needs an approval"):
        registry.promote(version, actor="alice")
    assert registry.champion() is None
    approved = registry.approve(version, actor="bob", reason="reviewed the report")
    assert approved.approval_status == "approved"
    promoted = registry.promote(version, actor="alice", reason="release")
    assert promoted.aliases == (CHAMPION,) and promoted.stage == PRODUCTION
    assert registry.challenger() is None
    actions = [(r.action, r.actor, r.from_version, r.to_version) for r in registry.audit_records()]
    assert actions == [
        ("register", "ci", None, "1"),
        ("approve", "bob", None, "1"),
        ("promote", "alice", None, "1"),
    ]


def test_auto_approve_policy_promotes_a_candidate_that_passed_every_gate(
    registry, config, keel_home
):
    info = registry.register(
        training_run(config, keel_home), METRICS, GATES, actor="ci", auto_approve=True
    )
    assert info.aliases == (CHAMPION,) and info.approval_status == "approved"
    records = registry.audit_records()
    assert [(r.action, r.actor) for r in records] == [
        ("register", "ci"),
        ("approve", AUTO_APPROVER),
        ("promote", AUTO_APPROVER),
    ]


def test_rollback_restores_the_previous_champion_and_is_audited(registry, config, keel_home):
    for dataset in ("a", "b"):
        run_id = training_run(config, keel_home, dataset=dataset)
        registry.register(run_id, METRICS, GATES, actor="ci", auto_approve=True)
    assert registry.champion() == "2"
    restored = registry.rollback(actor="carol", reason="error rate up after release")
    assert restored.version == "1" and registry.champion() == "1"
    assert restored.stage == PRODUCTION
    assert registry.info("2").stage == ARCHIVED
    last = registry.audit_records()[-1]
    assert (last.action, last.actor, last.from_version, last.to_version) == (
        "rollback",
        "carol",
        "2",
        "1",
    )
    assert last.reason == "error rate up after release"
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(actor="carol", reason="again")


def test_rejection_is_final_and_the_champion_cannot_be_rejected(registry, config, keel_home):
    registry.register(training_run(config, keel_home, "a"), METRICS, GATES, "ci", auto_approve=True)
    registry.register(training_run(config, keel_home, "b"), METRICS, GATES, actor="ci")
    with pytest.raises(ApprovalError, match="needs a reason"):
        registry.reject("challenger", actor="bob", reason=" ")
    rejected = registry.reject("challenger", actor="bob", reason="fails the stress test")
    assert rejected.approval_status == "rejected" and rejected.stage == ARCHIVED
    assert registry.challenger() is None
    with pytest.raises(ApprovalError, match="was rejected"):
        registry.approve("2", actor="bob")
    with pytest.raises(ApprovalError, match="is the champion: roll back first"):
        registry.reject("champion", actor="bob", reason="no")


def test_audit_log_is_append_only_and_hash_chained(registry, config, keel_home):
    registry.register(training_run(config, keel_home), METRICS, GATES, "ci", auto_approve=True)
    assert registry.verify_audit().intact
    engine = sa.create_engine(config.registry_uri)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as connection:
        connection.execute(sa.text("update keel_registry_audit set actor = 'mallory'"))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as connection:
        connection.execute(sa.text("delete from keel_registry_audit"))
    # Someone with raw database access drops the guard and edits history: the chain shows it.
    with engine.begin() as connection:
        connection.execute(sa.text("drop trigger keel_registry_audit_no_update"))
        connection.execute(sa.text("update keel_registry_audit set actor = 'mallory' where id = 2"))
    engine.dispose()
    assert registry.verify_audit()[:2] == (False, 2)


def test_lineage_returns_real_paths_and_hashes(registry, config, keel_home):
    run_id = training_run(config, keel_home)
    registry.register(run_id, METRICS, GATES, actor="ci", auto_approve=True)
    lineage = registry.lineage("champion")
    training_set = Path(lineage["training_set"]["path"])
    assert training_set.is_file() and training_set.is_relative_to(keel_home.home)
    assert (
        lineage["training_set"]["sha256"] == hashlib.sha256(training_set.read_bytes()).hexdigest()
    )
    assert lineage["training_set"]["sha256_matches"] is True
    assert lineage["mlflow_run_id"] == run_id
    assert lineage["feature_service"] == "default_risk_v1"
    assert lineage["dbt_models"] == [
        "stg_accounts",
        "int_account_daily",
        "fct_account_features_daily",
    ]
    assert len(lineage["code_commit"]) == 40 and lineage["code_dirty"] is False
    assert lineage["metrics"]["roc_auc"] == pytest.approx(0.81)
    training_set.write_bytes(b"changed after training")
    assert registry.lineage("1")["training_set"]["sha256_matches"] is False
    with pytest.raises(RegistryError, match="has no alias 'challenger'"):
        registry.lineage("challenger")


def _invoke(*args: str, key: str = ""):
    return CliRunner().invoke(
        keel_cli.cli, ["registry", *args], catch_exceptions=False, env={"KEEL_API_KEY": key}
    )


def test_cli_approve_promote_rollback_audit_and_lineage(registry, config, keel_home):
    from keel.access import KeyStore, default_store_path

    registry.register(training_run(config, keel_home, "a"), METRICS, GATES, "ci", auto_approve=True)
    registry.register(training_run(config, keel_home, "b"), METRICS, GATES, actor="ci")
    keys = KeyStore(default_store_path())
    alice, bob = keys.add("alice", ["approver"]), keys.add("bob", ["approver", "deployer"])
    carol = keys.add("carol", ["deployer"])

    refused = _invoke("approve", "2", key=alice)
    assert refused.exit_code == 1 and "may not approve it" in refused.output
    approved = _invoke("approve", "challenger", "--reason", "report reviewed", key=bob)
    assert approved.exit_code == 0 and "version 2: approved" in approved.output
    promoted = _invoke("promote", "2", "--reason", "weekly release", key=bob)
    assert promoted.exit_code == 0 and "champion" in promoted.output
    rolled = _invoke("rollback", "--reason", "latency regression", key=carol)
    assert rolled.exit_code == 0 and "version 1:" in rolled.output
    assert registry.champion() == "1"

    audit = _invoke("audit", "--json")
    assert audit.exit_code == 0
    records = json.loads(audit.output)
    assert [r["action"] for r in records][-3:] == ["approve", "promote", "rollback"]
    assert records[-1] | {"recorded_at": None, "record_hash": None, "previous_hash": None} == {
        **records[-1],
        "recorded_at": None,
        "record_hash": None,
        "previous_hash": None,
        "action": "rollback",
        "actor": "carol",
        "from_version": "2",
        "to_version": "1",
        "reason": "latency regression",
    }
    verified = _invoke("audit", "--verify")
    assert verified.exit_code == 0 and "rollback" in verified.output

    lineage = _invoke("lineage", "champion", "--json")
    assert lineage.exit_code == 0
    result = json.loads(lineage.output)
    assert result["version"] == "1" and Path(result["training_set"]["path"]).is_file()
    assert result["training_set"]["sha256_matches"] is True

    missing = _invoke("lineage", "7")
    assert missing.exit_code == 1 and "has no version 7" in missing.output


def _forkserver():
    """Processes forked from one server that imported MLflow and its stores once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "mlflow",
            "mlflow.store.tracking.sqlalchemy_store",
            "mlflow.store.model_registry.sqlalchemy_store",
            "sqlalchemy",
            "filelock",
            "keel.registry",
        ]
    )
    return context


def _register_in_process(tracking_uri, lock_file, run_id, start) -> None:
    config = RegistryConfig(
        tracking_uri=tracking_uri, registry_uri=tracking_uri, lock_file=lock_file
    )
    registry = ModelRegistry(config)
    start.wait(timeout=120)
    registry.register(run_id, METRICS, GATES, actor=f"worker-{run_id[:6]}")
    registry.close()


def test_parallel_registrations_give_distinct_versions_and_one_audit_record_each(
    registry, config, keel_home
):
    run_ids = quick_runs(config, keel_home, 10)
    # Two extra workers register datasets that others register too: still one version each.
    jobs = [*run_ids, run_ids[0], run_ids[1]]
    # Separate processes, forked from a server that imported MLflow once (no shared state).
    context = _forkserver()
    start = context.Event()
    workers = [
        context.Process(
            target=_register_in_process,
            args=(config.tracking_uri, config.lock_file, run_id, start),
        )
        for run_id in jobs
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0] * len(jobs)
    versions = registry.client.search_model_versions(f"name = '{registry.name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, 11))
    assert sorted(v.run_id for v in versions) == sorted(run_ids)
    records = registry.audit_records()
    assert [r.action for r in records] == ["register"] * 10
    assert sorted(r.to_version for r in records) == sorted(str(n) for n in range(1, 11))
    assert registry.verify_audit().intact


def _postgres_url() -> str | None:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        return None
    for user in ("root", "postgres"):
        url = f"postgresql+psycopg2://{user}@127.0.0.1:5432/test"
        try:
            sa.create_engine(url).connect().close()
            return url
        except sa.exc.OperationalError:
            continue
    return None


def test_audit_log_on_postgres_is_append_only(config, keel_home):
    url = _postgres_url()
    if url is None:
        pytest.skip(
            "PostgreSQL is not reachable on 127.0.0.1:5432 (database `test`, user root or "
            "postgres): install the Debian package postgresql and start it to run this test"
        )
    schema = f"keel_audit_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as connection:
        connection.execute(sa.text(f"create schema {schema}"))
    try:
        audit_uri = f"{url}?options=-csearch_path%3D{schema}"
        registry = ModelRegistry(
            RegistryConfig(
                config.tracking_uri,
                config.registry_uri,
                audit_uri=audit_uri,
                audit_key=uuid.uuid4().hex + uuid.uuid4().hex,
            )
        )
        registry.register(training_run(config, keel_home), METRICS, GATES, "ci", auto_approve=True)
        assert [r.action for r in registry.audit_records()] == ["register", "approve", "promote"]
        assert registry.verify_audit().intact
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), admin.begin() as connection:
            connection.execute(sa.text(f"update {schema}.keel_registry_audit set actor = 'x'"))
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), admin.begin() as connection:
            connection.execute(sa.text(f"truncate {schema}.keel_registry_audit"))
        registry.close()
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"drop schema {schema} cascade"))
        admin.dispose()


# -- controls: a crash between record and alias, tampering, approval bypass ---------------------


def _act_and_die(tracking_uri: str, lock_file: str, action: str, moved: bool) -> None:
    """Promote version 2 or roll back, and SIGKILL this process as the champion alias moves.

    ``moved`` kills it just after the alias moved, else just before.
    """
    import os
    import signal

    from mlflow import MlflowClient

    real = MlflowClient.set_registered_model_alias

    def die_at_the_alias(self, name, alias, number):
        if alias == CHAMPION:
            if moved:
                real(self, name, alias, number)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, name, alias, number)

    MlflowClient.set_registered_model_alias = die_at_the_alias
    registry = ModelRegistry(RegistryConfig(tracking_uri, tracking_uri, lock_file=lock_file))
    if action == "promote":
        registry.promote("2", actor="bob", reason="weekly release")
    else:
        registry.rollback(actor="carol", reason="canary error rate")


def test_a_writer_killed_between_the_audit_record_and_the_alias_move(registry, config, keel_home):
    registry.register(training_run(config, keel_home, "a"), METRICS, GATES, "ci", auto_approve=True)
    registry.register(training_run(config, keel_home, "b"), METRICS, GATES, actor="ci")
    registry.approve("2", actor="bob", reason="report reviewed")
    context = _forkserver()
    steps = [("promote", False, "1", "2"), ("rollback", True, "2", "1")]
    for action, moved, before, after in steps:
        writer = context.Process(
            target=_act_and_die, args=(config.tracking_uri, config.lock_file, action, moved)
        )
        writer.start()
        writer.join(timeout=120)
        assert writer.exitcode == -9  # killed at the alias, not finished

        # The next registry to open finds the recorded change and carries it out.
        with ModelRegistry(config) as reopened:
            last = reopened.audit_records()[-1]
            assert (last.action, last.from_version, last.to_version) == (action, before, after)
            assert reopened.champion() == after
            assert reopened.info(after).stage == PRODUCTION
            assert reopened.info(before).stage == ARCHIVED
            assert reopened.verify_audit().intact
            reopened.require_approved(after)


def _unkeyed_chain(rows: list[dict]) -> list[tuple[str, str]]:
    """What a forger without the key computes: the plain SHA-256 chain over the same fields."""
    previous, hashes = "0" * 64, []
    for row in rows:
        fields = {k: row[k] for k in ("recorded_at", "model_name", "action", "actor")}
        fields |= {k: row[k] for k in ("from_version", "to_version", "reason", "details")}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
        record_hash = hashlib.sha256((previous + canonical).encode()).hexdigest()
        hashes.append((previous, record_hash))
        previous = record_hash
    return hashes


@pytest.mark.parametrize("attack", ["rewrite-and-rechain", "delete-newest"])
def test_rewritten_or_deleted_audit_records_are_detected(registry, config, keel_home, attack):
    registry.register(training_run(config, keel_home), METRICS, GATES, "ci", auto_approve=True)
    assert registry.verify_audit().intact
    key_file = keel_home.mlflow / "registry-audit.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    with ModelRegistry(RegistryConfig(**{**config.__dict__, "audit_key": "k" * 64})) as other:
        assert "keyed hash" in other.verify_audit().problem  # another key: nothing verifies
    engine = sa.create_engine(config.registry_uri)
    with engine.begin() as connection:
        connection.execute(sa.text("drop trigger keel_registry_audit_no_update"))
        connection.execute(sa.text("drop trigger keel_registry_audit_no_delete"))
        if attack == "rewrite-and-rechain":
            # Someone with the database rewrites who approved, and recomputes every later hash.
            connection.execute(
                sa.text("update keel_registry_audit set actor = 'mallory' where id = 2")
            )
            rows = connection.execute(sa.text("select * from keel_registry_audit order by id"))
            rows = [dict(row._mapping) for row in rows]
            for row, (previous, digest) in zip(rows, _unkeyed_chain(rows), strict=True):
                connection.execute(
                    sa.text(
                        "update keel_registry_audit set previous_hash = :p, record_hash = :h "
                        "where id = :id"
                    ),
                    {"p": previous, "h": digest, "id": row["id"]},
                )
        else:
            # ... or deletes the newest records (the promotion), which leaves a valid chain.
            connection.execute(sa.text("delete from keel_registry_audit where id = 3"))
    engine.dispose()
    verdict = registry.verify_audit()
    assert not verdict.intact
    if attack == "rewrite-and-rechain":
        assert verdict.broken_at == 1 and "keyed hash" in verdict.problem
    else:
        assert "records were deleted" in verdict.problem
        # Removing the head as well does not hide it.
        registry.client.delete_registered_model_tag(registry.name, "keel.audit_head")
        assert "head of keel-default-risk is missing" in registry.verify_audit().problem
    reported = _invoke("audit", "--verify")
    assert reported.exit_code == 1 and "fails verification" in reported.output
    with pytest.raises(RegistryError, match="fails verification"):
        registry.rollback("carol", "no writes onto a broken log")
    with pytest.raises(ApprovalError, match="fails verification"):
        registry.require_approved("1")


def test_an_audit_key_readable_by_others_is_refused(config, keel_home):
    key_file = keel_home.home / "shared.key"
    key_file.write_text("k" * 64)
    key_file.chmod(0o644)
    with pytest.raises(RegistryError, match="open to other users"):
        ModelRegistry(RegistryConfig(**{**config.__dict__, "audit_key_file": str(key_file)}))
    with pytest.raises(RegistryError, match="at least 32 characters"):
        ModelRegistry(RegistryConfig(**{**config.__dict__, "audit_key": "short"}))
    refused = _invoke("--audit-key-file", str(key_file), "audit", "--verify")
    assert refused.exit_code == 1 and "chmod 600" in refused.output
    short = CliRunner().invoke(
        keel_cli.cli, ["registry", "audit"], env={"KEEL_REGISTRY_AUDIT_KEY": "short"}
    )
    assert short.exit_code == 1 and "at least 32 characters" in short.output


@contextlib.contextmanager
def _webhook() -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP endpoint on a free port that keeps what is POSTed to it."""
    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/alerts", received
    finally:
        server.shutdown()
        server.server_close()


def test_a_champion_set_directly_in_mlflow_is_refused_by_batch_scoring_and_alerted(
    registry, config, keel_home
):
    import dagster as dg

    from assets.inference import batch_predictions
    from keel.inference import approved_champion
    from orchestration.profiles import resources_for
    from orchestration.resources import MonitoringResource
    from orchestration.sensors import run_failure_alert

    registry.register(training_run(config, keel_home, "a"), METRICS, GATES, "ci", auto_approve=True)
    registry.register(training_run(config, keel_home, "b"), METRICS, GATES, actor="ci")
    resources = resources_for("local")
    assert approved_champion(registry) == "1"

    # Someone with MLflow access moves the alias and writes the approval tag by hand.
    registry.client.set_registered_model_alias(registry.name, CHAMPION, "2")
    registry.client.set_model_version_tag(registry.name, "2", "keel.approval_status", "approved")
    with pytest.raises(ApprovalError, match=r"holds no approval of it \(its approval tag says"):
        registry.require_approved("2")
    with pytest.raises(ApprovalError, match="holds no approval"):
        registry.promote("2", actor="bob")

    instance = dg.DagsterInstance.ephemeral()
    with _webhook() as (url, received):
        monitoring = MonitoringResource(webhook_url=url)
        result = dg.materialize(
            [batch_predictions],
            partition_key="2026-02-01",
            resources={**resources, "monitoring": monitoring},
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        [failure] = [event for event in result.all_events if event.is_step_failure]
        message = failure.step_failure_data.error.message
        assert "batch scoring refused: version 2 of keel-default-risk is not approved" in message
        run_failure_alert(
            dg.build_run_status_sensor_context(
                sensor_name=run_failure_alert.name,
                dagster_event=result.get_run_failure_event(),
                dagster_instance=instance,
                dagster_run=result.dagster_run,
                resources={"monitoring": monitoring},
            ).for_run_failure()
        )
    assert len(received) == 1
    assert "version 2 of keel-default-risk is not approved" in json.dumps(received[0])
    assert not (keel_home.artefacts / "predictions" / "2026-02-01.parquet").exists()

    # Moving the alias back onto a version approved once is refused too: the log says 1 -> 2.
    registry.approve("2", actor="bob", reason="reviewed")
    registry.promote("2", actor="bob", reason="release")
    assert approved_champion(registry) == "2"
    registry.client.set_registered_model_alias(registry.name, CHAMPION, "1")
    registry.require_approved("1")
    with pytest.raises(ApprovalError, match="points at version 1, but the audit log made ver"):
        approved_champion(registry)


def _evaluation_summary(run_id: str, fairness_passed: bool) -> dict:
    """An evaluation summary as challenger_evaluation writes it (the fields registration reads)."""
    from keel.evaluation.metrics import QUALITY_METRICS

    gates = {"minimum_quality": True, "no_regression": True, "fairness": fairness_passed}
    return {
        "challenger": {
            "uri": f"runs:/{run_id}/model",
            "details": {"run_id": run_id},
            "quality": dict.fromkeys(QUALITY_METRICS, 0.8),
            "serving": {"latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "throughput_rows_per_s": 9e4},
            "threshold": {"value": 0.5},
            "fairness": {},
        },
        "comparison": None,
        "gates": [{"name": name, "passed": passed} for name, passed in gates.items()],
    }


@pytest.mark.parametrize("damage", ["none", "gate-flipped", "cut-short"])
def test_registration_refuses_an_evaluation_file_that_is_not_the_one_evaluated(
    registry, config, keel_home, damage
):
    import dagster as dg

    from assets.registry import registered_model
    from orchestration.profiles import resources_for

    run_id = training_run(config, keel_home)
    path = keel_home.artefacts / "evaluation" / "run-1" / "evaluation.json"
    path.parent.mkdir(parents=True)
    # The evaluation found the candidate unfair, unless the test keeps the file intact.
    summary = _evaluation_summary(run_id, fairness_passed=damage == "none")
    written = json.dumps(summary, indent=2).encode()
    path.write_bytes(written)
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "challenger_evaluation",
            metadata={
                "evaluation_path": dg.MetadataValue.path(str(path)),
                "evaluation_sha256": hashlib.sha256(written).hexdigest(),
            },
        )
    )
    if damage == "gate-flipped":
        path.write_text(json.dumps(_evaluation_summary(run_id, fairness_passed=True), indent=2))
    elif damage == "cut-short":
        path.write_bytes(written[: len(written) // 2])
    resources = resources_for("local")
    result = dg.materialize(
        [registered_model], resources=resources, instance=instance, raise_on_error=False
    )
    versions = registry.client.search_model_versions(f"name = '{registry.name}'")
    if damage == "none":
        assert result.success and [v.version for v in versions] == [1]
        return
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "is not the file its evaluation wrote" in failure.step_failure_data.error.message
    assert versions == [] and registry.audit_records() == []


def _open_handles(database: Path) -> list[str]:
    """Files this process holds open on ``database`` (and its journal)."""
    handles = []
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith(str(database)):
            handles.append(target)
    return handles


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_scoring_and_monitoring_close_the_registry_they_open(registry, config, keel_home):
    import dagster as dg

    from assets.inference import champion
    from assets.monitoring import reference_profile
    from orchestration.profiles import resources_for
    from orchestration.resources import ModelGovernance

    audit = keel_home.home / "audit.db"
    governance = ModelGovernance(audit_uri=f"sqlite:///{audit}")
    resources = resources_for("local")
    with ModelRegistry(RegistryConfig(**{**config.__dict__, "audit_uri": governance.audit_uri})):
        assert _open_handles(audit)  # an open registry holds its audit database
    assert _open_handles(audit) == []
    with pytest.raises(dg.Failure, match="there is no champion yet"):
        champion(resources["mlflow"], governance)
    assert _open_handles(audit) == []
    with pytest.raises(RegistryError, match="has no version 7"):
        reference_profile(
            "7", resources["mlflow"], governance, resources["artefacts"], resources["monitoring"]
        )
    assert _open_handles(audit) == []
