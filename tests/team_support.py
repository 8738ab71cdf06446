"""A small real Keel job for the team profile's tests, importable by the Celery workers.

One day of the generator's extracts loaded into the team profile's warehouse (the lake) and
validated: four steps (two raw tables, their blocking validation checks), each a Celery task
of the team executor; ``load_job`` is the two loads alone. The workers rebuild the job from
this module, with resources from the same environment (KEEL_HOME, KEEL_LAKE_CATALOG, the
generator's size) as the test that launched the run.
"""

import os

import dagster as dg

from assets.ingestion import INGESTION_CHECKS, raw_account_activity, raw_default_labels
from assets.training import GPU_OP_TAGS
from keel.settings import KeelPaths
from orchestration.executors import executor_for
from orchestration.profiles import resources_for
from orchestration.resources import ComputeResource, SourcesResource

ACCOUNTS_ENV = "KEEL_TEAM_TEST_ACCOUNTS"


def sources() -> SourcesResource:
    """The generated world of the test that launched the run (its size from the environment)."""
    paths = KeelPaths.current()
    return SourcesResource(
        generated_dir=str(paths.generated),
        landing_dir=str(paths.landing),
        accounts=int(os.environ.get(ACCOUNTS_ENV, "300")),
        late_share=0.02,
    )


def _resources() -> dict:
    return {**resources_for("team"), "sources": sources()}


def _raw_job(name: str, validated: bool) -> dg.JobDefinition:
    assets = [raw_account_activity, raw_default_labels]
    keys = {a.key for a in assets}
    checks = [c for c in INGESTION_CHECKS if {k.asset_key for k in c.check_keys} <= keys]
    defs = dg.Definitions(
        assets=assets,
        asset_checks=checks if validated else [],
        jobs=[dg.define_asset_job(name, selection=dg.AssetSelection.assets(*assets))],
        resources=_resources(),
        executor=executor_for("team"),
    )
    return defs.resolve_job_def(name)


def ingest_job() -> dg.JobDefinition:
    """Ingest and validate one day, every step on a Celery worker."""
    return _raw_job("team_ingest", validated=True)


def load_job() -> dg.JobDefinition:
    """Load one day into both raw tables, two steps on Celery workers, no validation."""
    return _raw_job("team_load", validated=False)


@dg.asset(deps=[raw_account_activity], op_tags=GPU_OP_TAGS)
def gpu_step(compute: ComputeResource) -> str:
    """A step with the torch model's tags: the device it would train on, where it ran."""
    return compute.torch_device()


def gpu_job() -> dg.JobDefinition:
    """One day ingested on the default queue, then a step with the torch tags on the gpu queue."""
    defs = dg.Definitions(
        assets=[raw_account_activity, gpu_step],
        jobs=[dg.define_asset_job("team_gpu", selection=["raw_account_activity", "gpu_step"])],
        resources=_resources(),
        executor=executor_for("team"),
    )
    return defs.resolve_job_def("team_gpu")
