"""Access control: identities, hashed keys, roles on the registry, serving and the CLI."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from keel.access import (
    AccessDenied,
    ApiKeyError,
    AuthenticationError,
    KeyStore,
    authenticate,
    default_store_path,
    os_user,
)
from keel.access.guard import RegistryAccessDenied
from keel.registry import ApprovalError, ModelRegistry
from tests.test_registry import (  # noqa: F401 (fixtures)
    GATES,
    METRICS,
    config,
    empty_mlflow_db,
    isolated_mlflow_uris,
    registry,
    training_run,
)


@pytest.fixture
def store(keel_home) -> KeyStore:
    return KeyStore(default_store_path(), cache_seconds=0.0)


def test_keys_are_stored_hashed_checked_and_revoked(store):
    key = store.add("tara", ["trainer"])
    assert key.encode() not in store.path.read_bytes()
    identity = store.check(key)
    assert (identity.name, identity.roles) == ("tara", frozenset({"trainer"}))
    assert identity.method == f"api_key:{key.split('_')[1]}"
    assert store.check(key + "x") is None and store.check("not-a-key") is None
    store.revoke(key.split("_")[1], by="root")
    assert store.check(key) is None
    with pytest.raises(ApiKeyError, match="roles must be among"):
        store.add("x", ["root"])
    with pytest.raises(ApiKeyError, match="needs an owner"):
        store.add("  ", ["viewer"])
    assert [(r["action"], r["actor"]) for r in store.access_log()] == [
        ("add_key", "unknown"),
        ("revoke_key", "root"),
    ]


def test_authentication_is_a_key_or_the_real_os_user(store, monkeypatch):
    me = os_user()
    monkeypatch.setenv("USER", "somebody-else")
    monkeypatch.setenv("LOGNAME", "somebody-else")
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    # Before any grant the local profile is one person's machine: the OS user is admin.
    assert authenticate(store) == store.os_user_identity(me)
    assert authenticate(store).name == me and authenticate(store).roles == {"admin"}
    store.grant("someone-else", ["viewer"], by=me)
    assert authenticate(store).roles == frozenset()  # no grant of its own any more
    store.grant(me, ["approver"], by=me)
    assert authenticate(store).roles == {"approver"} and authenticate(store).method == "os_user"

    key = store.add("ci", ["trainer"])
    monkeypatch.setenv("KEEL_API_KEY", key)
    assert authenticate(store).name == "ci"
    monkeypatch.setenv("KEEL_API_KEY", key[:-2])
    with pytest.raises(AuthenticationError, match="not a valid key"):
        authenticate(store)
    monkeypatch.delenv("KEEL_API_KEY")
    monkeypatch.setenv("KEEL_PROFILE", "production")
    with pytest.raises(AuthenticationError, match="only with an API key"):
        authenticate(store)


def test_each_role_is_allowed_and_refused_on_the_registry_with_audit_records(
    registry,  # noqa: F811
    config,  # noqa: F811
    keel_home,
    store,
):
    ident = {
        name: store.check(store.add(name, roles))
        for name, roles in {
            "vic": ["viewer"],
            "tara": ["trainer"],
            "alice": ["approver"],
            "dan": ["deployer"],
            "root": ["admin"],
        }.items()
    }
    first = training_run(config, keel_home, "a", trained_by="tara")
    second = training_run(config, keel_home, "b", trained_by="tara")

    def refused(call, permission):
        before = len(registry.audit_records())
        with pytest.raises(RegistryAccessDenied, match=f"may not {permission}"):
            call()
        record = registry.audit_records()[-1]
        assert len(registry.audit_records()) == before + 1 and record.action == "denied"
        assert record.details["permission"] == permission
        return record

    for name in ("vic", "alice", "dan"):
        denied = refused(
            lambda n=name: registry.register(first, METRICS, GATES, ident[n]), "register"
        )
        assert denied.actor == name and denied.details["identity"]["method"].startswith("api_key")
    assert registry.register(first, METRICS, GATES, ident["tara"]).version == "1"
    registered = registry.audit_records()[-1]
    assert (registered.action, registered.actor) == ("register", "tara")
    assert registered.details["identity"] == ident["tara"].describe()

    for name in ("vic", "tara", "dan"):
        refused(lambda n=name: registry.approve("1", ident[n], "ok"), "approve")
    refused(lambda: registry.reject("1", ident["tara"], "no"), "reject")
    refused(lambda: registry.promote("1", ident["alice"]), "promote")
    assert registry.approve("1", ident["alice"], "report read").approval_status == "approved"
    assert registry.promote("1", ident["dan"], "release").aliases == ("champion",)

    registry.register(second, METRICS, GATES, ident["root"])
    # Four-eyes compares identities: the trainer's name cannot approve, whatever its roles.
    trainer_as_admin = store.check(store.add("tara", ["admin"]))
    with pytest.raises(ApprovalError, match="tara trained version 2"):
        registry.approve("2", trainer_as_admin)
    registry.approve("2", ident["root"], "admin review")
    registry.promote("2", ident["dan"])
    refused(lambda: registry.rollback(ident["alice"], "bad"), "rollback")
    refused(
        lambda: registry.deploy("shadow_set", ident["tara"], "try", aliases={"shadow": "1"}),
        "deploy",
    )
    shadow = registry.deploy("shadow_set", ident["dan"], "try", aliases={"shadow": "1"})
    assert shadow.actor == "dan" and shadow.details["identity"]["roles"] == ["deployer"]
    assert registry.rollback(ident["dan"], "latency").version == "1"

    actions = [(r.action, r.actor) for r in registry.audit_records()]
    assert actions.count(("denied", "tara")) == 3 and ("rollback", "dan") in actions
    assert registry.verify_audit().intact


def test_a_registry_that_requires_identities_acts_as_the_process_never_a_typed_name(
    config,  # noqa: F811
    keel_home,
    store,
    monkeypatch,
):
    from dataclasses import replace

    # One default: the team and production profiles require identities, the local one not.
    with ModelRegistry(config) as default:
        for profile, required in (("local", False), ("team", True), ("production", True)):
            monkeypatch.setenv("KEEL_PROFILE", profile)
            assert default.identities_required() is required
    monkeypatch.setenv("KEEL_PROFILE", "local")

    run = training_run(config, keel_home, "a", trained_by="tara")
    keys = {
        name: store.add(name, roles)
        for name, roles in (
            ("vic", ["viewer"]),
            ("tara", ["trainer", "approver"]),
            ("alice", ["approver"]),
        )
    }
    with ModelRegistry(replace(config, require_identity=True)) as strict:
        # A typed name is a label: the viewer running the process may not register as "tara".
        monkeypatch.setenv("KEEL_API_KEY", keys["vic"])
        with pytest.raises(AccessDenied, match=r"vic \(roles: viewer\) may not register"):
            strict.register(run, METRICS, GATES, "tara")
        denied = strict.audit_records()[-1]
        assert (denied.action, denied.actor) == ("denied", "vic")
        assert denied.details["identity"]["label"] == "tara"

        monkeypatch.setenv("KEEL_API_KEY", keys["tara"])
        assert strict.register(run, METRICS, GATES, "keel-pipeline").created
        registered = strict.audit_records()[-1]
        assert (registered.action, registered.actor) == ("register", "tara")
        # Four-eyes compares identities: tara cannot approve her own version by typing "alice".
        with pytest.raises(ApprovalError, match="tara trained version 1"):
            strict.approve("1", "alice", "looks fine")
        monkeypatch.setenv("KEEL_API_KEY", keys["alice"])
        assert strict.approve("1", "tara", "report read").approval_status == "approved"
        assert strict.audit_records()[-1].actor == "alice"

        # With no identity at all (production takes keys only) a change is refused and recorded.
        monkeypatch.delenv("KEEL_API_KEY")
        monkeypatch.setenv("KEEL_PROFILE", "production")
        with pytest.raises(AccessDenied, match="'alice' is not an authenticated identity"):
            strict.reject("1", "alice", "no")
        assert strict.audit_records()[-1].details["identity"] == {"name": "alice", "method": "none"}
        assert strict.verify_audit().intact


def test_a_trainer_name_is_the_authenticated_identity_where_identities_are_required(
    keel_home, store, monkeypatch
):
    from keel.tracking import LineageError, collect_lineage

    def lineage(trained_by: str = ""):
        return collect_lineage(
            dataset_version="d1",
            training_set_path="train.parquet",
            dagster_data_version="d1",
            feature_service="risk",
            trained_by=trained_by,
        )

    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    monkeypatch.setenv("USER", "somebody-else")
    assert lineage().trained_by == os_user()  # the real OS user, not $USER
    assert lineage("alice").trained_by == "alice"  # local profile: kept, unverified
    monkeypatch.setenv("KEEL_PROFILE", "team")
    monkeypatch.setenv("KEEL_API_KEY", store.add("tara", ["trainer"]))
    assert lineage().trained_by == "tara" and lineage("tara").trained_by == "tara"
    with pytest.raises(LineageError, match=r"tara \(api_key:.*\) may not act as 'alice'"):
        lineage("alice")
    monkeypatch.delenv("KEEL_API_KEY")
    with pytest.raises(LineageError, match="acts only with an API key"):
        lineage()


def test_serving_refuses_a_key_without_the_role_and_logs_it(store):
    from keel.serving.auth import require_role

    app = FastAPI()
    app.state.keys = store

    deployer_only = Depends(require_role("deploy"))
    scorers = Depends(require_role("predict"))

    @app.get("/admin")
    def admin(principal=deployer_only):
        return {"actor": principal.owner}

    @app.get("/score")
    def score(principal=scorers):
        return {"actor": principal.owner}

    viewer, deployer = store.add("vic", ["viewer"]), store.add("dan", ["deployer"])
    release_only = store.add("ops", ["deploy"])
    with TestClient(app) as client:
        # Platform roles score; serving's narrow ``deploy`` key does not.
        for key, status in ((viewer, 200), (deployer, 200), (release_only, 403)):
            assert client.get("/score", headers={"X-API-Key": key}).status_code == status
        assert client.get("/admin", headers={"X-API-Key": release_only}).status_code == 200
        assert client.get("/admin").status_code == 401
        assert client.get("/admin", headers={"X-API-Key": viewer}).status_code == 403
        answer = client.get("/admin", headers={"X-API-Key": deployer})
        assert answer.status_code == 200 and answer.json() == {"actor": "dan"}
    last = store.access_log()[-1]
    assert (last["actor"], last["action"], last["target"], last["allowed"]) == (
        "vic",
        "deploy",
        "/admin",
        0,
    )


def test_cli_manages_keys_only_for_admins(store, monkeypatch):
    from keel import cli as keel_cli

    runner = CliRunner()
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    whoami = runner.invoke(keel_cli.cli, ["access", "whoami"])
    assert whoami.exit_code == 0 and f"{os_user()} (os_user): admin" in whoami.output
    added = runner.invoke(
        keel_cli.cli, ["access", "keys", "add", "--owner", "vic", "--role", "viewer"]
    )
    assert added.exit_code == 0, added.output
    viewer_key = added.output.strip()
    as_viewer = {"KEEL_API_KEY": viewer_key}
    refused = runner.invoke(
        keel_cli.cli, ["access", "keys", "add", "--owner", "x", "--role", "admin"], env=as_viewer
    )
    assert refused.exit_code == 1 and "may not admin" in refused.output
    locked_out = runner.invoke(keel_cli.cli, ["access", "grant", os_user(), "--role", "viewer"])
    assert locked_out.exit_code == 1 and "include --role admin" in locked_out.output
    granted = runner.invoke(keel_cli.cli, ["access", "grant", "someone", "--role", "trainer"])
    assert granted.exit_code == 0
    # The granting OS user kept admin when the bootstrap ended.
    assert authenticate(store).roles == {"admin"}
    log = runner.invoke(keel_cli.cli, ["access", "log"])
    assert "REFUSED vic" in log.output and "grant someone" in log.output
    assert os.environ.get("KEEL_API_KEY") is None


def test_dagster_runs_need_the_role_of_their_job_and_carry_the_launcher(store):
    from keel.access.jobs import LAUNCHED_BY_TAG, authorize_run, required_permission

    promote = {"ops": {"apply_registry_action": {"config": {"action": "promote"}}}}
    assert required_permission("registry_action", promote) == "promote"
    assert required_permission("retrain", None) == "train"
    assert required_permission("release", {}) == "deploy"
    assert required_permission("daily_pipeline", None) == "run"
    viewer = store.check(store.add("vic", ["viewer"]))
    trainer = store.check(store.add("tara", ["trainer"]))
    deployer = store.check(store.add("dan", ["deployer"]))
    for job, run_config, allowed in (
        ("daily_pipeline", None, {"tara", "dan"}),
        ("retrain", None, {"tara"}),
        ("registry_action", promote, {"dan"}),
    ):
        for identity in (viewer, trainer, deployer):
            if identity.name in allowed:
                tags = authorize_run(job, run_config, identity)
                assert tags[LAUNCHED_BY_TAG] == identity.name
            else:
                with pytest.raises(AccessDenied, match=f"job {job}"):
                    authorize_run(job, run_config, identity)


def test_the_local_run_launcher_refuses_a_run_its_identity_may_not_launch(store, monkeypatch):
    import dagster as dg
    from dagster._core.launcher import LaunchRunContext

    from keel.access.jobs import LAUNCHED_BY_TAG
    from orchestration.run_launcher import LocalRunLauncher

    @dg.op
    def step() -> None:
        pass

    @dg.job(name="retrain")
    def retrain() -> None:
        step()

    instance = dg.DagsterInstance.ephemeral()
    launcher = LocalRunLauncher()
    launcher.register_instance(instance)
    run = instance.create_run_for_job(job_def=retrain)
    monkeypatch.setenv("KEEL_API_KEY", store.add("vic", ["viewer"]))
    with pytest.raises(AccessDenied, match="job retrain"):
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    assert LAUNCHED_BY_TAG not in instance.get_run_by_id(run.run_id).tags
    monkeypatch.setenv("KEEL_API_KEY", "keel_unknown_key")
    with pytest.raises(AuthenticationError, match="not a valid key"):
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))


def test_registry_cli_acts_as_the_caller_and_refuses_one_without_a_role(
    config,  # noqa: F811
    store,
    monkeypatch,
):
    from keel import cli as keel_cli

    runner = CliRunner()
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    assert runner.invoke(keel_cli.cli, ["registry", "audit"]).exit_code == 0
    store.grant("someone-else", ["viewer"], by="root")  # ends the bootstrap: this user has none
    refused = runner.invoke(keel_cli.cli, ["registry", "audit"])
    assert refused.exit_code == 1 and f"{os_user()} (roles: none) may not read" in refused.output
    viewer = store.add("vic", ["viewer"])
    allowed = runner.invoke(keel_cli.cli, ["registry", "audit"], env={"KEEL_API_KEY": viewer})
    assert allowed.exit_code == 0, allowed.output
    approve = runner.invoke(
        keel_cli.cli, ["registry", "approve", "1"], env={"KEEL_API_KEY": viewer}
    )
    assert approve.exit_code == 1 and "vic (roles: viewer) may not approve" in approve.output
    wrong = runner.invoke(keel_cli.cli, ["registry", "audit"], env={"KEEL_API_KEY": "keel_x_y"})
    assert wrong.exit_code == 1 and "not a valid key" in wrong.output


def _people(store: KeyStore) -> dict[str, str]:
    roles = {"vic": ["viewer"], "tara": ["trainer"], "alice": ["approver"], "dan": ["deployer"]}
    return {name: store.add(name, person_roles) for name, person_roles in roles.items()}


def test_the_release_cli_acts_as_the_caller_and_refuses_roles_without_deploy(
    registry,  # noqa: F811
    config,  # noqa: F811
    keel_home,
    store,
    monkeypatch,
):
    import json

    from keel import cli as keel_cli

    keys = _people(store)
    tara, alice = store.check(keys["tara"]), store.check(keys["alice"])
    registry.register(training_run(config, keel_home, "a", trained_by="tara"), METRICS, GATES, tara)
    registry.approve("1", alice, "report read")
    fields = ("tracking_uri", "registry_uri", "lock_file")
    monkeypatch.setenv("KEEL_SERVE_REGISTRY", json.dumps({f: getattr(config, f) for f in fields}))
    runner = CliRunner()

    def release(who: str, *args: str):
        env = {"KEEL_API_KEY": keys[who]} if who else {}
        return runner.invoke(keel_cli.cli, ["release", *args], env=env)

    for who in ("vic", "tara", "alice"):
        refused = release(who, "shadow", "1", "--reason", "try")
        assert refused.exit_code == 1 and f"{who} (roles: " in refused.output
        assert "may not deploy on version 1" in refused.output
        denied = registry.audit_records()[-1]
        assert (denied.action, denied.actor) == ("denied", who)
        assert denied.details["permission"] == "deploy"
        assert denied.details["identity"]["method"].startswith("api_key:")
    assert registry.client.get_registered_model(registry.name).aliases.get("shadow") is None
    # `keel access log` shows the refusals too, with the key each refused caller used.
    refused_log = [(r["actor"], r["action"], r["method"]) for r in store.access_log()]
    assert [entry[:2] for entry in refused_log if entry[1] == "deploy"] == [
        ("vic", "deploy"),
        ("tara", "deploy"),
        ("alice", "deploy"),
    ]
    assert all(entry[2].startswith("api_key:") for entry in refused_log if entry[1] == "deploy")

    shown = release("vic", "status")  # reading needs no release role
    assert shown.exit_code == 0 and json.loads(shown.output)["shadow"] is None
    started = release("dan", "shadow", "1")
    assert started.exit_code == 0 and "shadow_set by dan" in started.output
    # A name typed on the command line is not accepted: the caller is the key's owner.
    spoofed = release("vic", "shadow", "--stop", "--actor", "dan")
    assert spoofed.exit_code == 2 and "No such option '--actor'" in spoofed.output
    unknown = runner.invoke(
        keel_cli.cli, ["release", "shadow", "--stop"], env={"KEEL_API_KEY": "keel_x_y"}
    )
    assert unknown.exit_code == 1 and "not a valid key" in unknown.output
    # In the local profile the OS user acts (an admin until the first grant).
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    stopped = release("", "shadow", "--stop")
    assert stopped.exit_code == 0 and f"shadow_clear by {os_user()}" in stopped.output
    actions = [(r.action, r.actor) for r in registry.audit_records()]
    assert actions[-2:] == [("shadow_set", "dan"), ("shadow_clear", os_user())]
    assert registry.verify_audit().intact


def test_an_edge_bundle_is_published_only_by_a_deployer_and_refusals_upload_nothing(
    registry,  # noqa: F811
    config,  # noqa: F811
    keel_home,
    store,
    tmp_path,
):
    import json

    from keel.edge.publish import PublishError, publish_bundle

    keys = _people(store)
    person = {name: store.check(key) for name, key in keys.items()}
    run_id = training_run(config, keel_home, "a", trained_by="tara")
    registry.register(run_id, METRICS, GATES, person["tara"])
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model_fp32.onnx").write_bytes(b"onnx bytes")
    manifest = {"kind": "keel-edge-bundle", "format": 1, "model": {"version": "1"}, "files": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    parity = {"passed": True, "variants": {"fp32": {"max_abs_diff": 1e-7, "auc_change": 0.0}}}
    sizes = {"fp32": 10}

    def uploaded() -> list[str]:
        return [a.path for a in registry.client.list_artifacts(run_id, "edge_bundle")]

    for name in ("vic", "tara", "alice"):
        with pytest.raises(RegistryAccessDenied, match=f"{name} .* may not attach_bundle"):
            publish_bundle(registry, "1", folder, parity, sizes, person[name])
        denied = registry.audit_records()[-1]
        assert (denied.action, denied.actor, denied.to_version) == ("denied", name, "1")
        assert uploaded() == []
    with pytest.raises(PublishError, match="authenticated identity, not 'dan'"):
        publish_bundle(registry, "1", folder, parity, sizes, "dan")
    tags = publish_bundle(registry, "1", folder, parity, sizes, person["dan"])
    assert uploaded() == ["edge_bundle/v1"]
    version_tags = registry.client.get_model_version(registry.name, "1").tags
    assert version_tags["keel.bundle.manifest_sha256"] == tags["keel.bundle.manifest_sha256"]
    attached = registry.audit_records()[-1]
    assert (attached.action, attached.actor) == ("attach_bundle", "dan")
    assert attached.details["identity"]["roles"] == ["deployer"]


def test_the_registry_action_job_acts_as_its_process_and_takes_no_actor_in_config(
    registry,  # noqa: F811
    config,  # noqa: F811
    keel_home,
    store,
    monkeypatch,
):
    import dagster as dg

    from assets.registry import registry_action
    from orchestration.resources import MlflowResource, ModelGovernance

    keys = _people(store)
    run_id = training_run(config, keel_home, "a", trained_by="tara")
    registry.register(run_id, METRICS, GATES, store.check(keys["tara"]))
    resources = {
        "mlflow": MlflowResource(
            tracking_uri=config.tracking_uri,
            registry_uri=config.registry_uri,
            artifact_location=str(keel_home.mlflow / "artifacts"),
            lock_file=config.lock_file,
        ),
        "governance": ModelGovernance(),
    }
    instance = dg.DagsterInstance.ephemeral()

    def approve(who: str, **extra: str):
        monkeypatch.setenv("KEEL_API_KEY", keys[who])
        settings = {"action": "approve", "version": "1", "reason": "review", **extra}
        return registry_action.execute_in_process(
            run_config={"ops": {"apply_registry_action": {"config": settings}}},
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )

    # A name in the run config is no longer taken: the config itself is refused.
    with pytest.raises(dg.DagsterInvalidConfigError, match="actor"):
        approve("alice", actor="alice")
    refused = approve("dan")
    assert not refused.success
    denied = registry.audit_records()[-1]
    assert (denied.action, denied.actor, denied.details["permission"]) == (
        "denied",
        "dan",
        "approve",
    )
    approved = approve("alice")
    assert approved.success
    record = registry.audit_records()[-1]
    assert (record.action, record.actor) == ("approve", "alice")
    assert record.details["identity"]["method"].startswith("api_key:")
    observation = instance.fetch_observations(dg.AssetKey("registered_model"), limit=1).records
    assert observation[0].asset_observation.metadata["actor"].value == "alice"
