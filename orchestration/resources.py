"""Dagster resources, every one of them: the profiles in profiles.py build their instances."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import dagster as dg
from dagster_dbt import DbtCliInvocation, DbtCliResource
from packaging.version import Version

from keel.gates import GatePolicy
from keel.monitoring_policy import (
    DEFAULT_DECISION_THRESHOLD,
    DEFAULT_DRIFT_SHARE,
    DEFAULT_MIN_AUC,
    RetrainPolicy,
)
from keel.streaming.consumer import (
    DEFAULT_DURABLE,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    DEFAULT_URL,
)

if TYPE_CHECKING:
    import duckdb
    from upath import UPath

    from keel.registry import ModelRegistry

_GATES = GatePolicy()
_RETRAIN = RetrainPolicy()
# The dbt variable profiles.yml reads the warehouse path from.
WAREHOUSE_VAR = "keel_warehouse"
# ... and, for the team target, the lake's catalog, data path and extension folder.
LAKE_CATALOG_VAR = "keel_lake_catalog"
LAKE_DATA_PATH_VAR = "keel_lake_data_path"
LAKE_EXTENSIONS_VAR = "keel_lake_extensions"


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse, and where its marts land as Parquet.

    Two kinds, one API: a DuckDB file (``database``, the local profile), or a DuckLake
    (``catalog`` + ``data_path``, the team profile) whose catalog is a Postgres database and
    whose tables are Parquet files under a folder every worker mounts or an ``s3://`` URL.
    ``connect()`` gives a connection whose default catalog is the warehouse either way, so
    ``raw.<table>`` means the same table in both (see keel.lake).
    """

    # DuckDB file of the local profile; leave empty for a lake.
    database: str = ""
    # The lake's catalog: a Postgres connection string (``postgresql://user@host/keel_lake``).
    catalog: str = ""
    # The lake's data: a shared folder or an object store URL; the catalog records it.
    data_path: str = ""
    # Where DuckDB installs the lake's extensions from their packages (empty: a temp folder).
    extension_dir: str = ""
    marts_dir: str
    # DuckDB otherwise caches up to 80% of the machine's memory; past this it spills to disk.
    memory_limit: str = "2GB"

    @property
    def is_lake(self) -> bool:
        return bool(self.catalog)

    def _checked(self) -> None:
        if bool(self.database) == bool(self.catalog):
            raise ValueError(
                "WarehouseResource takes a DuckDB file (database) or a lake (catalog and "
                f"data_path), exactly one: got database={self.database!r}, "
                f"catalog={self.catalog!r}"
            )
        if self.catalog and not self.data_path:
            raise ValueError("WarehouseResource: a lake (catalog) needs a data_path")

    def extension_folder(self) -> Path:
        from keel.lake import default_extension_dir

        return Path(self.extension_dir) if self.extension_dir else default_extension_dir()

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        import duckdb

        self._checked()
        if self.is_lake:
            from keel.lake import connect

            connection = connect(
                self.catalog,
                self.data_path,
                self.extension_folder(),
                read_only=read_only,
                memory_limit=self.memory_limit,
            )
        else:
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
            connection = duckdb.connect(
                self.database, read_only=read_only, config={"memory_limit": self.memory_limit}
            )
        try:
            yield connection
        finally:
            connection.close()

    def dbt_target(self) -> str:
        """The output of dbt_project/profiles.yml that runs on this warehouse."""
        return "team" if self.is_lake else "local"

    def dbt_vars(self) -> dict[str, str]:
        """The dbt variables profiles.yml reads this warehouse's location from."""
        self._checked()
        if not self.is_lake:
            return {WAREHOUSE_VAR: self.database}
        from keel.lake import data_location

        return {
            LAKE_CATALOG_VAR: self.catalog,
            LAKE_DATA_PATH_VAR: data_location(self.data_path),
            LAKE_EXTENSIONS_VAR: str(self.extension_folder()),
        }


class DriftScenarioConfig(dg.Config):
    """A drift the generator switches on from ``start`` (ISO day); see keel.generator."""

    kind: str
    start: str
    strength: float = 0.5


class SourcesResource(dg.ConfigurableResource):
    """Where raw data comes from, and the share of bad rows a partition may hold.

    The generator settings left unset (None) take the values recorded in ``generated_dir`` by
    its first generation, so the UI, schedules and the demo continue one world; a new folder
    starts with GeneratorConfig's defaults and ``NEW_WORLD_LATE_SHARE``. A setting that differs
    from the recorded one is refused (keel.generator.GeneratorConfigError).
    """

    generated_dir: str
    landing_dir: str
    seed: int | None = None
    accounts: int | None = None
    start: str | None = None
    late_share: float | None = None
    label_delay_days: int | None = None
    scenarios: list[DriftScenarioConfig] | None = None
    max_bad_share: float = 0.05

    # A new world sends a few rows late through the landing folder.
    NEW_WORLD_LATE_SHARE: ClassVar[float] = 0.02

    def generator_config(self):  # -> keel.generator.GeneratorConfig
        """The data folder's generator settings; errors if a setting here contradicts them."""
        from keel.generator import (
            GeneratorConfig,
            mismatch_error,
            recorded_config,
            settings_mismatch,
        )

        requested = {
            name: value
            for name, value in (
                ("seed", self.seed),
                ("accounts", self.accounts),
                ("start", self.start),
                ("late_share", self.late_share),
                ("label_delay_days", self.label_delay_days),
            )
            if value is not None
        }
        if self.scenarios is not None:
            requested["scenarios"] = [s.model_dump() for s in self.scenarios]
        folder = Path(self.generated_dir)
        recorded = recorded_config(folder)
        if recorded is None:
            return GeneratorConfig.from_dict({"late_share": self.NEW_WORLD_LATE_SHARE, **requested})
        differences = settings_mismatch(
            recorded, GeneratorConfig.from_dict({**json.loads(recorded.to_json()), **requested})
        )
        if differences:
            raise mismatch_error(folder, differences)
        return recorded


class MonitoringResource(dg.ConfigurableResource):
    """How drift and performance are judged, when they call for retraining, where alerts go."""

    # Days at the end of the champion's training set that make the drift reference.
    reference_days: int = 14
    # Evidently's dataset rule: drift when at least this share of features drifted.
    drift_share: float = DEFAULT_DRIFT_SHARE
    # A drift episode must last this many consecutive days before it triggers a retraining.
    min_drifted_days: int = 2
    # Days with fewer scored rows never trigger: their tests are too noisy.
    min_rows: int = _RETRAIN.min_rows
    # Retrain when the AUC measured on late labels falls below this.
    min_auc: float = DEFAULT_MIN_AUC
    # Score above which an account is flagged, for precision and recall.
    decision_threshold: float = DEFAULT_DECISION_THRESHOLD
    # Run-failure alerts are POSTed here as JSON; empty means they are only logged.
    webhook_url: str = ""


class StreamResource(dg.ConfigurableResource):
    """The JetStream stream, the durable consumer and its log; the lag that counts as behind."""

    url: str = DEFAULT_URL
    stream: str = DEFAULT_STREAM
    subject: str = DEFAULT_SUBJECT
    durable: str = DEFAULT_DURABLE
    # The folder of the consumer's log (<durable>.sqlite), as `keel stream consume` keeps it.
    state_dir: str
    max_unacknowledged: int = 50_000
    max_stalled_s: float = 60.0

    def observe(self) -> tuple[dict, dict]:
        """JetStream's view of the consumer and the consumer's own progress record."""
        import asyncio

        from keel.streaming.lag import consumer_lag, log_progress

        lag = asyncio.run(consumer_lag(self.url, self.stream, self.durable))
        return lag, log_progress(Path(self.state_dir) / f"{self.durable}.sqlite")


class ArtefactStore(dg.ConfigurableResource):
    """Where files that are not tables go: a local folder or an object store (``s3://b/prefix``).

    Models, reports, training sets and predictions, all through ``keel.storage``: writes are
    whole or nothing on both kinds of root, and readers follow ``latest.json`` pointers.
    """

    root: str

    def path(self, *parts: str) -> UPath:
        """The location of ``parts`` under the root; a local one gets its parent folder."""
        from keel.storage import is_local, local_path, location

        target = location(self.root, *parts)
        if is_local(target):
            local_path(target).parent.mkdir(parents=True, exist_ok=True)
        return target

    def write(self, data: bytes | str, *parts: str) -> UPath:
        """Write ``data`` (text as UTF-8) at ``parts``, atomically; returns its location."""
        from keel.files import atomic_write

        return atomic_write(self.path(*parts), data)

    def read_pointer(self, *parts: str) -> dict[str, Any]:
        """The record of the ``latest.json`` pointer in the folder ``parts``."""
        from keel.storage import read_pointer

        return read_pointer(self.path(*parts))

    def write_pointer(self, record: Mapping[str, Any], *parts: str) -> UPath:
        """Make ``record`` the ``latest.json`` pointer of the folder ``parts``."""
        from keel.storage import write_pointer

        return write_pointer(self.path(*parts), record)


class FeatureStoreResource(dg.ConfigurableResource):
    """The Feast repo in ``feature_repo/`` with the profile's ``feature_store.yaml``.

    ``variables`` fill the yaml's ``${NAME}`` placeholders (pass secrets as ``dg.EnvVar``);
    ``marts`` is the folder or URL of the Parquet marts that the training sets read labels from.
    """

    repo_path: str
    config_file: str
    marts: str
    variables: dict[str, str] | None = None

    def store(self):  # -> feast.FeatureStore (imported lazily: feast costs seconds)
        from keel.features import open_store

        return open_store(self.config_file, self.repo_path, self.variables)

    def online_reader(self, feature_service: str):  # -> mirrors.feast_online_reader's reader
        """The fast online lookup that serving uses, for one feature service."""
        from keel.mirrors.feast_online_reader import OnlineFeatureReader

        return OnlineFeatureReader(self.store(), feature_service)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and model registry; registry writes take ``lock_file`` when it is set."""

    tracking_uri: str
    registry_uri: str
    artifact_location: str
    lock_file: str = ""
    # Images carry no .git: the build sets the commit here; empty means ask git.
    code_commit: str = ""
    lock_timeout_s: float = 600.0

    def configure(self, experiment_name: str = "") -> str:
        """Point MLflow at this store, create the experiment if needed, return its id.

        Args:
            experiment_name: Defaults to ``keel.training.EXPERIMENT_NAME``.
        """
        import mlflow

        from keel.training import EXPERIMENT_NAME

        for uri in (self.tracking_uri, self.registry_uri):
            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if "://" not in self.artifact_location:
            Path(self.artifact_location).mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        name = experiment_name or EXPERIMENT_NAME
        # The first writer creates the SQLite schema; two at once corrupt it, hence the lock.
        with self.write_lock():
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            return mlflow.create_experiment(name, artifact_location=self.artifact_location)

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the store's write lock (a file lock) when ``lock_file`` is set; else a no-op."""
        if not self.lock_file:
            yield
            return
        from filelock import FileLock, Timeout

        Path(self.lock_file).parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.lock_file, timeout=self.lock_timeout_s):
                yield
        except Timeout as error:
            raise TimeoutError(
                f"waited {self.lock_timeout_s:.0f} s for the MLflow write lock {self.lock_file}; "
                "another process holds it"
            ) from error


class ComputeResource(dg.ConfigurableResource):
    """Which device PyTorch trains on: ``auto`` takes CUDA when torch sees one, else the CPU."""

    device: str = "auto"
    # Must outlive the node in production (a persistent volume), or preemption loses it. The
    # profile sets both from its paths.
    checkpoint_dir: str = ""
    # A folder (one SQLite study file per model family) or an Optuna database URL.
    study_storage: str = ""
    # LightGBM threads (0: every core) and the network's CPU threads (0: one, which its small
    # batches train fastest on). Fix it for identical LightGBM runs on any machine.
    num_threads: int = 0

    def torch_device(self) -> str:
        """The device to train on (``cpu``, ``cuda``, ``cuda:N``); errors if CUDA is missing."""
        from keel.tabular_net import select_device

        return select_device(self.device)

    def checkpoint_root(self) -> Path:
        """Folder for training checkpoints."""
        if not self.checkpoint_dir:
            raise ValueError("ComputeResource.checkpoint_dir is empty; the profile sets it.")
        return Path(self.checkpoint_dir)

    def optuna_storage(self) -> str:
        """Where Optuna studies live: a folder or a database URL."""
        if not self.study_storage:
            raise ValueError("ComputeResource.study_storage is empty; the profile sets it.")
        return self.study_storage


class ModelGovernance(dg.ConfigurableResource):
    """Gate bounds, the serving SLA, the approval policy and where the audit log lives."""

    min_roc_auc: float = _GATES.min_roc_auc
    max_auc_regression: float = _GATES.max_auc_regression
    max_demographic_parity_difference: float = _GATES.max_demographic_parity_difference
    max_equalized_odds_difference: float = _GATES.max_equalized_odds_difference
    fairness_min_group_rows: int = _GATES.fairness_min_group_rows
    fairness_min_group_positives: int = _GATES.fairness_min_group_positives
    latency_p99_ms: float = _GATES.latency_p99_ms
    min_throughput_rows_per_s: float = _GATES.min_throughput_rows_per_s
    max_model_size_mb: float = _GATES.max_model_size_mb
    threshold_strategy: str = _GATES.threshold_strategy
    fixed_threshold: float = _GATES.fixed_threshold
    bootstrap_samples: int = _GATES.bootstrap_samples
    confidence: float = _GATES.confidence
    # Promote a candidate that passed every gate without a human approval.
    auto_approve: bool = False
    # How an approved challenger reaches champion: "direct" promotes it at registration,
    # "canary" leaves it the approved challenger for canary_deployment; its judge promotes it.
    release: Literal["direct", "canary"] = "direct"
    # SQLAlchemy URL of the audit log; empty keeps it in the MLflow registry's database.
    audit_uri: str = ""
    # Secret that chains the audit log; empty uses a 0600 key file next to a SQLite audit log.
    audit_key: str = ""

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(**{f.name: getattr(self, f.name) for f in fields(GatePolicy)})

    def registry(self, mlflow: MlflowResource, model_name: str = "") -> ModelRegistry:
        """The registry of ``model_name`` (empty: the project's default model)."""
        from keel.registry import ModelRegistry, RegistryConfig

        return ModelRegistry(
            RegistryConfig(
                tracking_uri=mlflow.tracking_uri,
                registry_uri=mlflow.registry_uri,
                lock_file=mlflow.lock_file,
                audit_uri=self.audit_uri,
                lock_timeout_s=mlflow.lock_timeout_s,
                audit_key=self.audit_key,
                **({"model_name": model_name} if model_name else {}),
            )
        )


class KeelDbtCliResource(DbtCliResource):
    """dagster-dbt's CLI resource, run on a given warehouse, without two start-up costs.

    The warehouse's location travels in each invocation's ``--vars`` and ``--target``
    (profiles.yml reads ``keel_warehouse``, or the ``keel_lake_*`` variables for a lake), so
    nothing is set in the process environment: two steps on two warehouses in one process
    cannot cross.

    Before each invocation dagster-dbt runs ``dbt --version`` in a subprocess and loads dbt's
    macros in-process for an adapter that only ``fetch_row_counts`` and
    ``fetch_column_metadata`` use: about 8 seconds a step on two cores. Our dbt executable is
    the one of this environment, so its version is the installed dbt-core's, and no asset
    here fetches row counts or column metadata through the adapter.
    """

    @cached_property
    def _cli_version(self) -> Version:
        return Version(importlib.metadata.version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:
        return None

    def cli_on(
        self,
        warehouse: WarehouseResource,
        args: Sequence[str],
        *,
        variables: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> DbtCliInvocation:
        """``dbt args`` on ``warehouse``, with ``variables`` as further dbt ``--vars``."""
        dbt_vars = {**warehouse.dbt_vars(), **(variables or {})}
        target = ["--target", warehouse.dbt_target()]
        return self.cli([*args, *target, "--vars", json.dumps(dbt_vars)], **kwargs)
