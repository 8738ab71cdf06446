"""The production profile's per-step pods: the torch step's GPU request reaches its pod spec."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from orchestration.executors import executor_for

REPO_ROOT = Path(__file__).resolve().parent.parent


def _training_job(keel_home):
    from assets import training
    from orchestration.profiles import resources_for

    defs = dg.Definitions(
        assets=dg.load_assets_from_modules([training]),
        resources=resources_for("local"),
        executor=executor_for("production"),
    )
    return defs.resolve_implicit_global_asset_job_def()


def _step_pod(job: dg.JobDefinition, step: str):
    """The Kubernetes job dagster-k8s builds for a step, from the step's tags.

    The same calls as the executor's K8sStepHandler: get_user_defined_k8s_config on the step's
    tags, then construct_dagster_k8s_job.
    """
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    tags = dict(job.graph.node_dict[step].tags)
    config = DagsterK8sJobConfig(
        job_image="registry.example/keel:1",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
    )
    return construct_dagster_k8s_job(
        job_config=config,
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{step.replace('_', '-')}",
        user_defined_k8s_config=get_user_defined_k8s_config(tags),
        component="step_worker",
    )


def test_the_torch_steps_gpu_request_reaches_its_pod_and_no_other_step_asks_for_one(keel_home):
    job = _training_job(keel_home)
    # Every step is its own pod: the production executor is dagster-k8s's k8s_job_executor.
    assert job.executor_def.name == "keel_k8s"
    container = _step_pod(job, "torch_model").spec.template.spec.containers[0]
    assert container.resources.requests == {"nvidia.com/gpu": "1"}
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert container.image == "registry.example/keel:1"
    other = _step_pod(job, "lightgbm_model").spec.template.spec.containers[0]
    assert "nvidia.com/gpu" not in ((other.resources and other.resources.requests) or {})


def test_helm_values_and_dockerfile_describe_the_same_code_location():
    values = yaml.safe_load((REPO_ROOT / "deploy" / "helm" / "values.yaml").read_text())
    server = values["dagster-user-deployments"]["deployments"][0]
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert server["dagsterApiGrpcArgs"] == ["-m", "orchestration.definitions"]
    assert "requirements.lock" in dockerfile
    assert {"name": "KEEL_PROFILE", "value": "production"} in server["env"]


def test_production_step_pods_need_their_image_namespace_and_service_account(monkeypatch):
    settings = {
        "KEEL_IMAGE": "registry.example/keel:1",
        "KEEL_K8S_NAMESPACE": "keel",
        "KEEL_K8S_SERVICE_ACCOUNT": "keel-runs",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    schema = executor_for("production").config_schema
    resolved = schema.resolve_config({})
    assert resolved.success, resolved.errors
    assert resolved.value["config"]["job_image"] == "registry.example/keel:1"
    for name in settings:
        monkeypatch.delenv(name)
        missing = schema.resolve_config({})
        assert not missing.success
        assert name in str(missing.errors)
        monkeypatch.setenv(name, settings[name])
