"""Edge bundles: ONNX parity with the native models, INT8 bounds, integrity, the stand-alone
runtime in an isolated interpreter and a clean virtual environment, and the serverless handler.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.edge.build import build_bundle, bundle_bytes, write_manifest
from keel.edge.isolated import invoke_handler, run_isolated
from keel.edge.parity import ParityPolicy, check_parity
from keel.training import time_split, train_lightgbm, train_torch
from keel_edge import Bundle, BundleIntegrityError, ContractError, load_bundle
from tests.conftest import REPO_ROOT
from tests.test_training import synthetic_training_set

MODEL_INFO = {"name": "keel-default-risk", "version": "7", "run_id": "r", "model_uri": "m"}


@pytest.fixture(scope="module")
def windows():
    return time_split(synthetic_training_set(rows=1_500, seed=5), 7, 7)


@pytest.fixture(scope="module")
def models(windows):
    lightgbm = train_lightgbm(
        windows.train, windows.validation, seed=3, max_rounds=60, num_threads=1
    ).model
    torch = train_torch(
        windows.train, windows.validation, {"hidden_units": 32}, seed=3, max_epochs=2
    ).model
    return {"lightgbm": lightgbm, "torch": torch}


@pytest.fixture(scope="module")
def bundles(models, windows, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        family: build_bundle(
            model, root / family, model_info=MODEL_INFO, calibration=windows.validation
        )
        for family, model in models.items()
    }


def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def resign(folder: Path) -> None:
    """Re-hash every file into the manifest, as someone would who alters a bundle on purpose."""
    write_manifest(folder, json.loads((folder / "manifest.json").read_text()))


def change_one_weight(folder: Path) -> None:
    """Add 1 to one weight of the FP32 graph: of the largest weight matrix, or one tree leaf."""
    import onnx
    from onnx import numpy_helper

    path = folder / "model.onnx"
    graph = onnx.load_from_string(path.read_bytes())
    matrices = [i for i in graph.graph.initializer if len(i.dims) == 2 and i.data_type == 1]
    if matrices:
        largest = max(matrices, key=lambda i: i.dims[0] * i.dims[1])
        values = numpy_helper.to_array(largest).copy()
        values.flat[0] += 1.0
        largest.CopyFrom(numpy_helper.from_array(values, largest.name))
    else:
        (trees,) = [node for node in graph.graph.node if node.op_type.startswith("TreeEnsemble")]
        (leaves,) = [a for a in trees.attribute if a.name == "target_weights"]
        leaves.floats[0] += 1.0
    path.write_bytes(graph.SerializeToString())


def reorder_two_features(folder: Path) -> None:
    """Swap two numeric features in the contract: the graph then reads them in the wrong slots."""
    contract = json.loads((folder / "contract.json").read_text())
    features = contract["features"]
    first, second = (
        next(i for i, f in enumerate(features) if f["name"] == name)
        for name in ("utilisation", "missed_payments_30d")
    )
    features[first], features[second] = features[second], features[first]
    (folder / "contract.json").write_text(json.dumps(contract))


def json_rows(frame: pd.DataFrame, names) -> list[dict]:
    part = frame.loc[:, list(names)].astype(object)
    return json.loads(json.dumps(part.where(part.notna(), None).to_dict(orient="records")))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", ["lightgbm", "torch"])
def test_bundle_scores_equal_the_native_model_on_the_held_out_window(
    family, windows, models, bundles
):
    test = windows.test
    report = check_parity(bundles[family], models[family], test, test[schema.LABEL].to_numpy())

    assert report["passed"], report
    fp32 = report["variants"]["fp32"]
    assert fp32["max_abs_diff"] <= 1e-5 and fp32["rows_beyond_bound"] == 0
    assert report["rows"] == len(test)
    if family == "torch":
        int8 = report["variants"]["int8"]
        assert 0 < int8["max_abs_diff"] <= ParityPolicy().int8_max_abs_diff
        assert math.isfinite(int8["auc_change"]) and -int8["auc_change"] <= 0.005
        assert set(bundle_bytes(bundles[family])) == {"fp32", "int8"}
    else:
        assert set(report["variants"]) == {"fp32"}  # trees have no INT8 form


@pytest.mark.parametrize("family", ["lightgbm", "torch"])
def test_json_rows_missing_values_and_unseen_categories_score_like_the_native_model(
    family, windows, models, bundles
):
    frame = windows.test.head(40).copy()
    frame.loc[frame.index[:5], "product"] = "diamond"
    frame.loc[frame.index[5:10], "main_channel_30d"] = None
    frame.loc[frame.index[10:15], "balance"] = np.nan
    frame.loc[frame.index[15:20], "spend_trend_7d_vs_30d"] = np.inf
    bundle = load_bundle(bundles[family])

    scores = bundle.predict(json_rows(frame, bundle.feature_names))

    np.testing.assert_allclose(scores, models[family].predict_proba(frame), rtol=0, atol=1e-5)


def test_on_demand_ratios_are_computed_like_the_feature_store_when_absent(bundles):
    from keel.features import RATIO_INPUTS, account_ratios

    rng = np.random.default_rng(1)
    daily = {name: rng.gamma(1.0, 300.0, 50) for name in RATIO_INPUTS}
    daily["spend_30d"][:5] = 0.0
    daily["credit_limit"][5:10] = 0.3
    daily["balance"][10:12] = np.nan
    bundle = load_bundle(bundles["torch"])
    columns = dict(daily)

    bundle.contract._add_on_demand(columns)

    for name, expected in account_ratios(daily).items():
        np.testing.assert_array_equal(columns[name], expected)
    assert set(bundle.request_features) == set(schema.DAILY_FEATURES)


def test_a_request_without_the_ratios_scores_like_one_with_them(windows, bundles, models):
    from keel.features import account_ratios

    frame = windows.test.head(30).copy()
    for name, values in account_ratios(frame).items():
        frame[name] = values  # what the feature store computes at request time
    bundle = load_bundle(bundles["lightgbm"])

    without = bundle.predict(json_rows(frame, bundle.request_features))

    np.testing.assert_allclose(without, models["lightgbm"].predict_proba(frame), atol=1e-5)


def test_values_a_hair_above_a_tree_threshold_take_the_native_branch(windows, models, bundles):
    model = models["lightgbm"]
    numeric = len(model.encoder.numeric)
    rows = []
    for tree in model.booster.dump_model()["tree_info"]:
        root = tree["tree_structure"]
        if root.get("decision_type") == "<=" and root["split_feature"] < numeric:
            row = windows.test.iloc[[len(rows) % len(windows.test)]].copy()
            name = model.feature_names[root["split_feature"]]
            # The next double above the threshold: in float32 it rounds onto the threshold.
            row[name] = np.nextafter(root["threshold"], np.inf)
            rows.append(row)
    frame = pd.concat(rows, ignore_index=True)
    bundle = load_bundle(bundles["lightgbm"])

    scores = bundle.predict(json_rows(frame, bundle.feature_names))

    assert len(frame) >= 10
    np.testing.assert_allclose(scores, model.predict_proba(frame), rtol=0, atol=1e-5)


def test_an_int8_variant_beyond_its_bounds_fails_and_can_be_dropped(
    windows, models, bundles, tmp_path
):
    from keel.edge.build import drop_variant

    bundle = copy_bundle(bundles["torch"], tmp_path / "b")
    strict = ParityPolicy(int8_max_abs_diff=1e-9)

    report = check_parity(bundle, models["torch"], windows.test, None, strict)
    drop_variant(bundle, "int8")
    again = check_parity(bundle, models["torch"], windows.test, None, strict)

    assert not report["passed"] and report["variants"]["fp32"]["passed"]
    assert "differ by more than 1e-09" in report["variants"]["int8"]["failure"]
    assert again["passed"] and set(again["variants"]) == {"fp32"}
    assert not (bundle / "model.int8.onnx").exists()
    with pytest.raises(BundleIntegrityError, match="no 'int8' variant"):
        load_bundle(bundle, "int8")


# --------------------------------------------------------------------------- broken bundles


@pytest.mark.parametrize("family", ["lightgbm", "torch"])
@pytest.mark.parametrize("breakage", [change_one_weight, reorder_two_features])
def test_parity_check_fails_on_a_deliberately_broken_bundle(
    family, breakage, windows, models, bundles, tmp_path
):
    broken = copy_bundle(bundles[family], tmp_path / "broken")
    breakage(broken)

    # Unsigned, the runtime refuses the altered file outright.
    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_bundle(broken)
    unsigned = check_parity(broken, models[family], windows.test, None)
    assert not unsigned["passed"] and "sha256" in unsigned["variants"]["fp32"]["failure"]

    # Re-signed so that every hash matches, the scores give it away.
    resign(broken)
    load_bundle(broken)
    report = check_parity(broken, models[family], windows.test, None)
    assert not report["passed"]
    assert report["variants"]["fp32"]["rows_beyond_bound"] > 0
    assert "differ by more than 1e-05" in report["variants"]["fp32"]["failure"]


def test_files_missing_or_unlisted_or_another_manifest_are_refused(bundles, tmp_path):
    from keel_edge import manifest_sha256

    bundle = copy_bundle(bundles["torch"], tmp_path / "b")
    expected = manifest_sha256(bundle)
    load_bundle(bundle, "int8", expected_manifest_sha256=expected)
    with pytest.raises(BundleIntegrityError, match="expected"):
        load_bundle(bundle, expected_manifest_sha256="0" * 64)
    with pytest.raises(BundleIntegrityError, match="no 'fp16' variant"):
        load_bundle(bundle, "fp16")
    (bundle / "model.int8.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        load_bundle(bundle, "fp32")
    with pytest.raises(BundleIntegrityError, match="not a Keel bundle"):
        load_bundle(tmp_path)


def test_requests_that_break_the_contract_get_clear_errors(bundles, windows):
    bundle = load_bundle(bundles["torch"])
    rows = json_rows(windows.test.head(2), bundle.request_features)

    with pytest.raises(ContractError, match="lacks features spend_90d"):
        bundle.predict([{k: v for k, v in row.items() if k != "spend_90d"} for row in rows])
    with pytest.raises(ContractError, match="'balance' must be numeric"):
        bundle.predict([{**rows[0], "balance": "a lot"}])
    with pytest.raises(ContractError, match="lacks features product, main_channel_30d"):
        bundle.predict([{k: v for k, v in rows[0].items() if k not in schema.CATEGORICAL_FEATURES}])
    with pytest.raises(ContractError, match="list of rows or a mapping"):
        bundle.predict("spend_7d=1")
    assert bundle.predict([]).shape == (0,)


# --------------------------------------------------------------------------- serverless handler


class LambdaContext:
    """What the Lambda runtime passes as ``context`` (the attributes handlers read)."""

    aws_request_id = "0f6b3c2e-req"
    function_name = "keel-edge"
    memory_limit_in_mb = 1024

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def api_gateway_event(payload, base64_body: bool = False) -> dict:
    body = json.dumps(payload)
    if base64_body:
        body = base64.b64encode(body.encode()).decode()
    return {
        "resource": "/score",
        "path": "/score",
        "httpMethod": "POST",
        "headers": {"Content-Type": "application/json"},
        "requestContext": {"requestId": "c6af9ac6", "stage": "prod"},
        "body": body,
        "isBase64Encoded": base64_body,
    }


@pytest.fixture
def serverless(monkeypatch, bundles):
    from keel_edge import serverless

    monkeypatch.setenv("KEEL_BUNDLE_DIR", str(bundles["torch"]))
    monkeypatch.setenv("KEEL_BUNDLE_VARIANT", "int8")
    monkeypatch.setattr(serverless, "_bundle", None)
    monkeypatch.setattr(serverless, "_cold_start", None)
    return serverless


def test_handler_scores_an_api_gateway_request_and_reports_its_cold_start(
    serverless, bundles, windows
):
    bundle = load_bundle(bundles["torch"], "int8")
    rows = json_rows(windows.test.head(3), bundle.request_features)

    first = serverless.handler(api_gateway_event({"rows": rows}), LambdaContext())
    second = serverless.handler(api_gateway_event({"rows": rows}, True), LambdaContext())

    assert first["statusCode"] == 200 and first["headers"]["Content-Type"] == "application/json"
    body = json.loads(first["body"])
    np.testing.assert_array_equal(body["scores"], bundle.predict(rows))
    assert body["model"]["version"] == "7" and body["variant"] == "int8"
    assert body["request_id"] == LambdaContext.aws_request_id
    cold = body["cold_start"]
    assert cold["load_s"] > 0 and cold["first_prediction_s"] > 0
    assert cold["total_s"] == pytest.approx(
        cold["import_s"] + cold["load_s"] + cold["first_prediction_s"]
    )
    assert json.loads(second["body"])["cold_start"] is None
    assert json.loads(second["body"])["scores"] == body["scores"]
    direct = serverless.handler({"rows": rows[:1]}, LambdaContext())  # direct invocation
    assert json.loads(direct["body"])["scores"] == body["scores"][:1]


@pytest.mark.parametrize(
    ("event", "status", "message"),
    [
        ({"body": "{not json", "isBase64Encoded": False}, 400, "not JSON"),
        ({"body": None}, 400, "no body"),
        (api_gateway_event({"rows": []}), 400, "non-empty list"),
        (api_gateway_event([1, 2]), 400, "JSON object"),
        (api_gateway_event({"rows": [{"spend_7d": 1.0}]}), 400, "lacks features"),
        (api_gateway_event({"rows": [{}] * 10_001}), 413, "at most 10000"),
    ],
)
def test_handler_answers_bad_requests_with_a_reason(serverless, event, status, message):
    response = serverless.handler(event, LambdaContext())

    assert response["statusCode"] == status
    assert message in json.loads(response["body"])["error"]


def test_handler_refuses_an_altered_bundle(serverless, bundles, windows, tmp_path, monkeypatch):
    broken = copy_bundle(bundles["torch"], tmp_path / "broken")
    change_one_weight(broken)
    monkeypatch.setenv("KEEL_BUNDLE_DIR", str(broken))
    rows = json_rows(windows.test.head(1), load_bundle(bundles["torch"]).request_features)

    response = serverless.handler(api_gateway_event({"rows": rows}), LambdaContext())

    assert response["statusCode"] == 500
    assert "sha256" in json.loads(response["body"])["error"]


# --------------------------------------------------------------------------- isolated runtime


def test_runtime_runs_in_an_isolated_interpreter_without_keel_pandas_or_torch(
    bundles, models, windows
):
    frame = windows.test.head(5)
    bundle = load_bundle(bundles["lightgbm"])

    result = invoke_handler(bundles["lightgbm"], json_rows(frame, bundle.feature_names))

    assert result["response"]["statusCode"] == 200, result["response"]
    assert result["heavy_modules"] == []
    assert str(REPO_ROOT) not in result["sys_path"]
    scores = json.loads(result["response"]["body"])["scores"]
    np.testing.assert_allclose(scores, models["lightgbm"].predict_proba(frame), atol=1e-5)
    probe = run_isolated("import keel")
    assert probe.returncode != 0 and "No module named 'keel'" in probe.stderr


_COMMAND_LINE = """
import contextlib, io, json, sys
from keel_edge.__main__ import main

def run(*args, stdin=""):
    sys.stdin = io.StringIO(stdin)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

good, broken = sys.argv[1:3]
request = sys.stdin.read()
print(json.dumps([
    run("verify", good),
    run("verify", broken),
    run("score", good, "--variant", "int8", stdin=request),
    run("score", good, stdin='{"rows": [{"spend_7d": 1.0}]}'),
]))
"""


def test_command_line_verifies_and_scores_in_an_isolated_interpreter(bundles, windows, tmp_path):
    broken = copy_bundle(bundles["torch"], tmp_path / "broken")
    reorder_two_features(broken)
    bundle = load_bundle(bundles["torch"], "int8")
    rows = json_rows(windows.test.head(4), bundle.request_features)
    arguments = f"import sys; sys.argv[1:] = [{str(bundles['torch'])!r}, {str(broken)!r}]\n"

    done = run_isolated(arguments + _COMMAND_LINE, json.dumps({"rows": rows}))

    assert done.returncode == 0, done.stderr
    verified, refused, scored, bad_request = json.loads(done.stdout)
    assert verified["code"] == 0 and "contract.json" in json.loads(verified["out"])["verified"]
    assert refused["code"] == 2 and "contract.json has sha256" in refused["err"]
    assert scored["code"] == 0
    np.testing.assert_array_equal(json.loads(scored["out"])["scores"], bundle.predict(rows))
    assert bad_request["code"] == 3 and "lacks features" in bad_request["err"]


def test_function_image_pins_the_locked_runtime_versions():
    locked = dict(
        line.split("==")
        for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    image = REPO_ROOT / "deploy" / "serverless"
    pinned = [
        line.split("==")
        for line in (image / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    ]

    assert {name for name, _ in pinned} >= {"numpy", "onnxruntime"}
    assert all(locked[name] == version for name, version in pinned)
    dockerfile = (image / "Dockerfile").read_text()
    (command,) = re.findall(r'^CMD \["([\w.]+)"\]', dockerfile, flags=re.M)
    module, function = command.rsplit(".", 1)
    assert module == "keel_edge.serverless" and function == "handler"


# --------------------------------------------------------------------------- serving


def test_a_bundle_serves_through_the_serving_model_interface(bundles, models, windows):
    deployments = pytest.importorskip("keel.serving.deployments")
    from keel.edge.serving import BundleRiskModel

    frame = windows.test.head(50).reset_index(drop=True)
    loaded = deployments.LoadedModel(
        "7", "canary", BundleRiskModel(Bundle(bundles["torch"], "int8")), "torch"
    )

    scores = loaded.predict(frame)

    assert loaded.feature_names == models["torch"].feature_names
    np.testing.assert_array_equal(loaded.model.predict(frame), scores)
    np.testing.assert_allclose(
        scores, models["torch"].predict_proba(frame), atol=ParityPolicy().int8_max_abs_diff
    )


def test_keel_serve_bundle_flag_reaches_every_workers_model_loader(keel_home, monkeypatch):
    from click.testing import CliRunner

    from keel.edge.serving import load_version_bundle
    from keel.serving import cli as serve_cli
    from keel.serving.settings import ServeSettings
    from keel.settings import SettingsError

    started = {}
    monkeypatch.setattr(serve_cli, "run_server", lambda settings, *_: started.update(s=settings))

    result = CliRunner().invoke(serve_cli.serve, ["--bundle", "int8", "--no-auth"])

    assert result.exit_code == 0, result.output
    # What each uvicorn worker reads back from the environment the command sets.
    worker = ServeSettings.from_env(started["s"].to_env())
    loader = worker.model_loader()
    assert loader.func is load_version_bundle and loader.keywords == {"variant": "int8"}
    assert ServeSettings().model_loader() is None  # no flag: native models
    with pytest.raises(SettingsError, match="bundle='fp16'"):
        ServeSettings(bundle="fp16")
    refused = CliRunner().invoke(serve_cli.serve, ["--bundle", "fp16"])
    assert refused.exit_code != 0 and "fp16" in refused.output


# --------------------------------------------------------------------------- clean environment


def _locked(name: str) -> str:
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line
    raise LookupError(name)


@pytest.fixture(scope="session")
def clean_venv() -> Path:
    """A virtual environment with only onnxruntime and NumPy (lock versions), built once and
    kept under the temporary folder for later sessions."""
    pins = [_locked("onnxruntime"), _locked("numpy")]
    key = hashlib.sha256(" ".join([sys.version, *pins]).encode()).hexdigest()[:12]
    venv = Path(tempfile.gettempdir()) / f"keel-edge-clean-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text((REPO_ROOT / "requirements.lock").read_text())
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints), *pins],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            pytest.skip(f"cannot install onnxruntime and numpy here: {install.stderr[-500:]}")
        (venv / ".ready").touch()
    return venv


@pytest.mark.slow
def test_bundle_scores_in_a_clean_environment_and_broken_bundles_fail_there(
    clean_venv, bundles, models, windows, tmp_path
):
    python = str(clean_venv / "bin" / "python")
    packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    installed = {p.name.split("-")[0].lower() for p in Path(packages).glob("*.dist-info")}
    assert not installed & {"pandas", "torch", "keel", "lightgbm", "scikit_learn"}
    frame = windows.test.head(20)
    names = load_bundle(bundles["torch"]).feature_names
    rows = json_rows(frame, names)
    expected = models["torch"].predict_proba(frame)

    def score(folder: Path) -> dict:
        return invoke_handler(folder, rows, variant="fp32", python=python, packages=packages)

    good = score(bundles["torch"])
    assert good["heavy_modules"] == [] and good["response"]["statusCode"] == 200
    np.testing.assert_allclose(json.loads(good["response"]["body"])["scores"], expected, atol=1e-5)

    for breakage in (change_one_weight, reorder_two_features):
        broken = copy_bundle(bundles["torch"], tmp_path / breakage.__name__)
        breakage(broken)
        refused = score(broken)
        assert refused["response"]["statusCode"] == 500
        assert "sha256" in refused["response"]["body"]
        resign(broken)
        scores = json.loads(score(broken)["response"]["body"])["scores"]
        assert np.abs(np.asarray(scores) - expected).max() > 1e-5


# --------------------------------------------------------------------------- the asset


@pytest.fixture
def registered_torch_version(keel_home, models, windows, monkeypatch, tmp_path):
    """The PyTorch model logged as the training stage logs it and registered as a version."""
    import mlflow

    from keel.registry import ModelRegistry, RegistryConfig
    from keel.schema import LINEAGE_TAGS
    from keel.training import save_risk_model

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    config = RegistryConfig.local(keel_home)
    training_set = keel_home.artefacts / "training_sets" / "edge.parquet"
    training_set.parent.mkdir(parents=True, exist_ok=True)
    pd.concat([windows.train, windows.validation, windows.test]).to_parquet(training_set)
    dataset_version = hashlib.sha256(training_set.read_bytes()).hexdigest()
    tags = {tag: "x" for tag in LINEAGE_TAGS} | {
        "keel.dataset_version": dataset_version,
        "keel.training_set_path": str(training_set),
        "keel.model_family": "torch",
        "keel.trained_by": "alice",
    }
    mlflow.set_tracking_uri(config.tracking_uri)
    experiment = mlflow.create_experiment("edge", str(keel_home.mlflow / "artifacts"))
    folder = save_risk_model(models["torch"], tmp_path / "risk_model")
    with mlflow.start_run(experiment_id=experiment, tags=tags) as run:
        mlflow.log_params({"setting.validation_days": 7, "setting.test_days": 7})
        mlflow.pyfunc.log_model(
            name="model", loader_module="keel.tracking", data_path=str(folder), pip_requirements=[]
        )
    gates = {"minimum_quality": True, "no_regression": True, "fairness": True, "latency_sla": True}
    with ModelRegistry(config) as registry:
        version = registry.register(
            run.info.run_id, {"roc_auc": 0.8}, gates, "alice", auto_approve=True
        ).version
    return config, version


def materialise_bundle(keel_home, version: str, **settings):
    import dagster as dg

    from assets.bundle import model_bundle
    from assets.evaluation import ModelGovernance
    from orchestration.resources import ArtefactStore, MlflowResource

    store = f"sqlite:///{keel_home.mlflow / 'mlflow.db'}"
    resources = {
        "mlflow": MlflowResource(
            tracking_uri=store,
            registry_uri=store,
            artifact_location=str(keel_home.mlflow / "artifacts"),
            lock_file=str(keel_home.mlflow / "registry.lock"),
        ),
        "governance": ModelGovernance(),
        "artefacts": ArtefactStore(root=str(keel_home.artefacts)),
    }
    settings = {"version": version, "timed_rows": 20, **settings}
    config = {"ops": {"model_bundle": {"config": settings}}}
    return dg.materialize(
        [model_bundle], resources=resources, run_config=config, raise_on_error=False
    )


@pytest.mark.slow
def test_model_bundle_publishes_a_faithful_bundle_and_withholds_a_broken_one(
    keel_home, registered_torch_version, models, windows, monkeypatch
):
    import mlflow

    import keel.edge.export
    from keel.edge.serving import bundle_loader, load_version_bundle
    from keel.registry import ModelRegistry
    from keel.serving.deployments import Deployments

    config, version = registered_torch_version
    result = materialise_bundle(keel_home, version)

    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == "bundle_parity"
    metadata = result.asset_materializations_for_node("model_bundle")[0].metadata
    assert metadata["published"].value and metadata["fp32_max_abs_diff"].value <= 1e-5
    assert metadata["edge_cold_start_s"].value > 0 and metadata["int8_bytes"].value > 0
    client = mlflow.MlflowClient(config.tracking_uri, config.registry_uri)
    tags = client.get_model_version(config.model_name, version).tags
    assert tags["keel.bundle.variants"] == "fp32,int8"
    served = load_version_bundle(config, version, "int8")
    frame = windows.test.head(30)
    np.testing.assert_allclose(
        served.predict_proba(frame), models["torch"].predict_proba(frame), atol=0.02
    )
    # What `keel serve` runs: the deployments follow the champion alias, loading its bundle.
    deployments = Deployments(config, load_model=bundle_loader(config, "int8"))
    assert deployments.refresh() and deployments.current is not None
    champion = deployments.current.champion
    assert champion.version == version and champion.model.variant == "int8"
    np.testing.assert_array_equal(champion.predict(frame), served.predict_proba(frame))

    # The same version again, from an exporter that gets one weight wrong.
    honest_graph = keel.edge.export.onnx_graph

    def broken_graph(model):
        folder = Path(tempfile.mkdtemp())
        (folder / "model.onnx").write_bytes(honest_graph(model))
        change_one_weight(folder)
        return (folder / "model.onnx").read_bytes()

    monkeypatch.setattr(keel.edge.export, "onnx_graph", broken_graph)
    result = materialise_bundle(keel_home, version)

    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "differ by more than 1e-05" in check.description
    assert not result.asset_materializations_for_node("model_bundle")[0].metadata["published"].value
    assert client.get_model_version(config.model_name, version).tags == tags
    with ModelRegistry(config) as registry:
        actions = [record.action for record in registry.audit_records()]
    assert actions.count("attach_bundle") == 1

    # An honest exporter again, but an INT8 bound nothing meets: FP32 ships alone.
    monkeypatch.setattr(keel.edge.export, "onnx_graph", honest_graph)
    result = materialise_bundle(keel_home, version, int8_max_abs_diff=1e-9)

    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    tags = client.get_model_version(config.model_name, version).tags
    assert tags["keel.bundle.variants"] == "fp32"
    assert load_version_bundle(config, version, "int8").variant == "fp32"
