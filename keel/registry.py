"""The model registry on MLflow: lineage-tagged versions, approvals, aliases, rollback, audit.

Stage 4 of the article. The article's stage words map onto MLflow aliases and one tag:

- Development: a training run in the MLflow experiment, not registered yet;
- Staging: the registered version holding the ``challenger`` alias (it passed every gate);
- Production: the version holding the ``champion`` alias, which serving loads;
- Archived: a former champion, a rejected version or a challenger replaced by a newer one.

Only candidates that passed every gate are registered. Promotion to champion needs an
approval by someone other than the person who trained the model, or the auto-approve policy
(which only acts when every gate passed). Every registration, approval, rejection, promotion
and rollback appends one record to an append-only, hash-chained audit table that lives in a
SQL database (by default the registry's own). Registry writes are serialised across
processes (a file lock, plus a Postgres advisory lock when the audit database is Postgres),
and registration is idempotent per dataset version and model family.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keel.schema import LINEAGE_TAGS
from keel.settings import KeelPaths
from keel.training import REGISTERED_MODEL_NAME

# Where training logs the pyfunc model inside its run (keel.tracking.MODEL_ARTIFACT).
MODEL_ARTIFACT_PATH = "model"

CHALLENGER = "challenger"
CHAMPION = "champion"
STAGING, PRODUCTION, ARCHIVED = "Staging", "Production", "Archived"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
AUTO_APPROVER = "policy:auto-approve"
ACTIONS = ("register", "approve", "reject", "promote", "rollback")

TAG_TRAINING_SET_SHA256 = "keel.training_set_sha256"
TAG_STAGE = "keel.stage"
TAG_APPROVAL = "keel.approval_status"
TAG_GATES_PASSED = "keel.gates_passed"
TAG_PREVIOUS_CHAMPION = "keel.previous_champion"
TAG_EVALUATION_REPORT = "keel.evaluation_report"
METRIC_PREFIX = "keel.metric."
GATE_PREFIX = "keel.gate."

AUDIT_TABLE = "keel_registry_audit"
_GENESIS_HASH = "0" * 64
_PG_LOCK_KEY = 0x6B65656C  # "keel": one advisory lock for every registry write


class RegistryError(RuntimeError):
    """A registry action that cannot be carried out as asked."""


class ApprovalError(RegistryError):
    """An approval, promotion or rejection that the workflow forbids."""


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry and its audit log live.

    Attributes:
        tracking_uri: MLflow tracking store (runs and their lineage tags).
        registry_uri: MLflow model registry store.
        lock_file: File lock that serialises registry writes; empty means next to the SQLite
            audit database, or none for Postgres (which takes an advisory lock instead).
        audit_uri: SQLAlchemy URL of the audit database; empty means the registry's own
            database (must then be ``sqlite:`` or ``postgresql:``).
        model_name: The registered model.
        lock_timeout_s: How long a writer waits for the lock before giving up with an error.
    """

    tracking_uri: str
    registry_uri: str
    lock_file: str = ""
    audit_uri: str = ""
    model_name: str = REGISTERED_MODEL_NAME
    lock_timeout_s: float = 300.0

    @classmethod
    def local(cls, paths: KeelPaths | None = None) -> RegistryConfig:
        """The embedded profile's layout: MLflow on SQLite inside the data folder."""
        paths = paths or KeelPaths.current()
        database = f"sqlite:///{paths.mlflow / 'mlflow.db'}"
        return cls(
            tracking_uri=database,
            registry_uri=database,
            lock_file=str(paths.mlflow / "registry.lock"),
        )

    def resolved_audit_uri(self) -> str:
        uri = self.audit_uri or self.registry_uri
        if not uri.startswith(("sqlite:", "postgresql")):
            raise RegistryError(
                f"the registry at {self.registry_uri!r} is not a SQL database, so the audit log "
                "needs its own: set audit_uri to a sqlite:/// or postgresql:// URL"
            )
        return uri


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit trail: who did what, when, from which version to which, and why."""

    id: int
    recorded_at: str
    model_name: str
    action: str
    actor: str
    from_version: str | None
    to_version: str | None
    reason: str
    details: dict[str, Any]
    previous_hash: str
    record_hash: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersionInfo:
    """A registered version as the workflow sees it."""

    version: str
    stage: str
    approval_status: str
    aliases: tuple[str, ...]
    trained_by: str
    dataset_version: str
    model_family: str
    created: bool = False


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    from upath import UPath

    target = UPath(path)
    if not target.exists():
        raise RegistryError(f"training set {path!r} does not exist: its lineage cannot be proven")
    digest = hashlib.sha256()
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    for file in files:
        if target.is_dir():
            digest.update(str(file.relative_to(target)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _record_hash(previous_hash: str, fields: Mapping[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((previous_hash + canonical).encode()).hexdigest()


class ModelRegistry:
    """The registered model ``keel-default-risk``: versions, approvals, aliases and audit trail.

    Every method that changes the registry runs under one cross-process lock, so parallel
    pipelines never meet SQLite's "database is locked" and never race on aliases.
    """

    def __init__(self, config: RegistryConfig):
        import sqlalchemy
        from mlflow import MlflowClient

        self.config = config
        self.name = config.model_name
        self.client = MlflowClient(
            tracking_uri=config.tracking_uri, registry_uri=config.registry_uri
        )
        audit_uri = config.resolved_audit_uri()
        connect_args = {"timeout": 60} if audit_uri.startswith("sqlite:") else {}
        self._audit_engine = sqlalchemy.create_engine(audit_uri, connect_args=connect_args)
        self._audit = _audit_table(sqlalchemy.MetaData())
        self._lock_file = config.lock_file
        if not self._lock_file and self._audit_engine.dialect.name == "sqlite":
            database = self._audit_engine.url.database or ""
            if database in ("", ":memory:"):
                raise RegistryError("an in-memory audit database cannot be shared: give a file")
            self._lock_file = f"{database}.lock"
        with self._serialised():
            _create_audit_table(self._audit_engine, self._audit)

    def close(self) -> None:
        self._audit_engine.dispose()

    # -- locking -------------------------------------------------------------------------------

    @contextmanager
    def _serialised(self) -> Iterator[None]:
        from filelock import FileLock, Timeout

        with ExitStack() as stack:
            if self._lock_file:
                Path(self._lock_file).parent.mkdir(parents=True, exist_ok=True)
                try:
                    stack.enter_context(
                        FileLock(self._lock_file, timeout=self.config.lock_timeout_s)
                    )
                except Timeout as error:
                    raise RegistryError(
                        f"another registry writer held {self._lock_file} for more than "
                        f"{self.config.lock_timeout_s:g} s; try again or raise lock_timeout_s"
                    ) from error
            if self._audit_engine.dialect.name == "postgresql":
                import sqlalchemy

                connection = stack.enter_context(self._audit_engine.connect())
                connection.execute(sqlalchemy.text(f"select pg_advisory_lock({_PG_LOCK_KEY})"))
                stack.callback(
                    connection.execute,
                    sqlalchemy.text(f"select pg_advisory_unlock({_PG_LOCK_KEY})"),
                )
            yield

    # -- reading -------------------------------------------------------------------------------

    def _aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return {
                k: str(v) for k, v in self.client.get_registered_model(self.name).aliases.items()
            }
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    def _version(self, version: str):  # -> mlflow ModelVersion
        from mlflow.exceptions import MlflowException

        if not str(version).isdigit():
            raise RegistryError(f"{version!r} is not a version number")
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as error:
            raise RegistryError(f"{self.name} has no version {version}") from error

    def resolve(self, version_or_alias: str) -> str:
        """A version number from a number or an alias (``champion``, ``challenger``)."""
        text = str(version_or_alias).strip()
        if text.isdigit():
            return str(self._version(text).version)
        aliases = self._aliases()
        if text not in aliases:
            known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{self.name} has no alias {text!r} (aliases: {known})")
        return aliases[text]

    def info(self, version_or_alias: str) -> VersionInfo:
        version = self._version(self.resolve(version_or_alias))
        aliases = tuple(a for a, v in self._aliases().items() if v == str(version.version))
        tags = version.tags
        return VersionInfo(
            version=str(version.version),
            stage=tags.get(TAG_STAGE, ""),
            approval_status=tags.get(TAG_APPROVAL, ""),
            aliases=aliases,
            trained_by=tags.get("keel.trained_by", ""),
            dataset_version=tags.get("keel.dataset_version", ""),
            model_family=tags.get("keel.model_family", ""),
        )

    def champion(self) -> str | None:
        return self._aliases().get(CHAMPION)

    def challenger(self) -> str | None:
        return self._aliases().get(CHALLENGER)

    def find(self, dataset_version: str, model_family: str) -> str | None:
        """The version already registered for this dataset version and model family, if any."""
        for value in (dataset_version, model_family):
            if not value or "'" in value or "`" in value:
                raise RegistryError(f"{value!r} is not a usable dataset version or model family")
        found = self.client.search_model_versions(
            f"name = '{self.name}' and tags.`keel.dataset_version` = '{dataset_version}' "
            f"and tags.`keel.model_family` = '{model_family}'"
        )
        return str(min(int(v.version) for v in found)) if found else None

    def lineage(self, version_or_alias: str) -> dict[str, Any]:
        """What the version was built from: training set, features, dbt models, code, metrics."""
        number = self.resolve(version_or_alias)
        version = self._version(number)
        tags = version.tags
        path = tags.get("keel.training_set_path", "")
        recorded = tags.get(TAG_TRAINING_SET_SHA256, "")
        try:
            current = file_sha256(path) if path else None
        except RegistryError:
            current = None
        return {
            "model": self.name,
            "version": number,
            "asked_for": str(version_or_alias),
            "aliases": [a for a, v in self._aliases().items() if v == number],
            "stage": tags.get(TAG_STAGE),
            "approval_status": tags.get(TAG_APPROVAL),
            "model_uri": f"models:/{self.name}/{number}",
            "source": version.source,
            "mlflow_run_id": version.run_id,
            "training_set": {
                "path": path,
                "sha256": recorded,
                "dataset_version": tags.get("keel.dataset_version"),
                "exists": current is not None,
                "sha256_matches": current == recorded if current is not None else None,
            },
            "feature_service": tags.get("keel.feature_service"),
            "dbt_models": [m for m in tags.get("keel.dbt_models", "").split(",") if m],
            "dbt_manifest_hash": tags.get("keel.dbt_manifest_hash"),
            "code_commit": tags.get("keel.code_commit"),
            "code_dirty": tags.get("keel.code_dirty") == "true",
            "dagster_data_version": tags.get("keel.dagster_data_version"),
            "model_family": tags.get("keel.model_family"),
            "trained_by": tags.get("keel.trained_by"),
            "evaluation_report": tags.get(TAG_EVALUATION_REPORT),
            "metrics": {
                k.removeprefix(METRIC_PREFIX): float(v)
                for k, v in tags.items()
                if k.startswith(METRIC_PREFIX)
            },
            "gates": {
                k.removeprefix(GATE_PREFIX): v for k, v in tags.items() if k.startswith(GATE_PREFIX)
            },
        }

    # -- the audit trail -------------------------------------------------------------------------

    def audit_records(self, limit: int | None = None) -> list[AuditRecord]:
        """The audit trail, oldest first (the last ``limit`` records when given)."""
        import sqlalchemy

        table = self._audit
        query = sqlalchemy.select(table).where(table.c.model_name == self.name)
        if limit:
            query = query.order_by(table.c.id.desc()).limit(limit)
        with self._audit_engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        rows.sort(key=lambda row: row["id"])
        return [AuditRecord(**{**row, "details": json.loads(row["details"])}) for row in rows]

    def verify_audit(self) -> tuple[bool, int | None]:
        """Recompute the hash chain over every record; returns (intact, first bad record id)."""
        import sqlalchemy

        with self._audit_engine.connect() as connection:
            rows = connection.execute(sqlalchemy.select(self._audit).order_by(self._audit.c.id))
            previous = _GENESIS_HASH
            for row in rows:
                record = dict(row._mapping)
                fields = {k: record[k] for k in _HASHED_FIELDS}
                if record["previous_hash"] != previous or record["record_hash"] != _record_hash(
                    previous, fields
                ):
                    return False, record["id"]
                previous = record["record_hash"]
        return True, None

    def _append(
        self,
        action: str,
        actor: str,
        from_version: str | None,
        to_version: str | None,
        reason: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one record; callers hold the registry lock, which keeps the chain linear."""
        import sqlalchemy

        table = self._audit
        fields = {
            "recorded_at": _now(),
            "model_name": self.name,
            "action": action,
            "actor": actor,
            "from_version": from_version,
            "to_version": to_version,
            "reason": reason,
            "details": json.dumps(dict(details or {}), sort_keys=True, default=str),
        }
        with self._audit_engine.begin() as connection:
            last = connection.execute(
                sqlalchemy.select(table.c.record_hash).order_by(table.c.id.desc()).limit(1)
            ).scalar()
            previous = last or _GENESIS_HASH
            record_hash = _record_hash(previous, fields)
            result = connection.execute(
                table.insert().values(**fields, previous_hash=previous, record_hash=record_hash)
            )
            record_id = result.inserted_primary_key[0]
        return AuditRecord(
            id=record_id,
            **{**fields, "details": json.loads(fields["details"])},
            previous_hash=previous,
            record_hash=record_hash,
        )

    # -- writing -------------------------------------------------------------------------------

    def _set_tags(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def _model_source(self, run_id: str, model_uri: str | None) -> tuple[str, str | None]:
        """The run's model: its MLflow 3 logged model, or a ``model`` folder of run artefacts."""
        if model_uri and model_uri.startswith("models:/m-"):
            return model_uri, model_uri.removeprefix("models:/")
        run = self.client.get_run(run_id)
        for output in run.outputs.model_outputs if run.outputs else []:
            logged = self.client.get_logged_model(output.model_id)
            if logged.name == MODEL_ARTIFACT_PATH:
                return f"models:/{logged.model_id}", logged.model_id
        if any(
            a.path == f"{MODEL_ARTIFACT_PATH}/MLmodel"
            for a in self.client.list_artifacts(run_id, MODEL_ARTIFACT_PATH)
        ):
            return f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}", None
        raise RegistryError(f"run {run_id} has no model logged under {MODEL_ARTIFACT_PATH!r}")

    def register(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        gates: Mapping[str, bool],
        actor: str,
        auto_approve: bool = False,
        model_uri: str | None = None,
        evaluation_report: str = "",
        reason: str = "",
    ) -> VersionInfo:
        """Register a candidate that passed every gate and make it the challenger.

        Idempotent per dataset version and model family: a second call for the same pair
        returns the existing version (``created=False``) and writes nothing. With
        ``auto_approve`` the new version is approved by the policy and promoted to champion.

        Args:
            run_id: The MLflow training run (it carries the lineage tags).
            metrics: Headline evaluation numbers, stored as version tags.
            gates: Gate name -> passed; every gate must have passed.
            actor: Who registers (a person or the pipeline).
            auto_approve: Whether the auto-approve policy is on.
            model_uri: The run's model URI when known (``models:/m-...`` or ``runs:/...``).
            evaluation_report: Where the evaluation's HTML report is kept.
            reason: Why, for the audit trail.
        """
        if not gates:
            raise RegistryError("no gate results: a candidate is registered only after its gates")
        failed = sorted(name for name, passed in gates.items() if not passed)
        if failed:
            raise RegistryError(
                f"run {run_id} failed the gates {', '.join(failed)}: only candidates that pass "
                "every gate are registered"
            )
        run_tags = self.client.get_run(run_id).data.tags
        missing = [tag for tag in LINEAGE_TAGS if tag not in run_tags]
        if missing:
            raise RegistryError(f"run {run_id} lacks the lineage tags {', '.join(missing)}")
        lineage = {tag: run_tags[tag] for tag in LINEAGE_TAGS}
        dataset_version, family = lineage["keel.dataset_version"], lineage["keel.model_family"]
        training_set_sha256 = file_sha256(lineage["keel.training_set_path"])
        with self._serialised():
            existing = self.find(dataset_version, family)
            if existing is not None:
                return self.info(existing)
            source, model_id = self._model_source(run_id, model_uri)
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(
                    self.name,
                    description="Probability that a credit-card account defaults (Keel).",
                )
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            tags = {
                **lineage,
                TAG_TRAINING_SET_SHA256: training_set_sha256,
                TAG_STAGE: STAGING,
                TAG_APPROVAL: PENDING,
                TAG_GATES_PASSED: "true",
                TAG_EVALUATION_REPORT: evaluation_report,
                "keel.registered_by": actor,
                "keel.registered_at": _now(),
                **{f"{METRIC_PREFIX}{k}": f"{float(v):.6g}" for k, v in metrics.items()},
                **{f"{GATE_PREFIX}{k}": "passed" for k in gates},
            }
            created = self.client.create_model_version(
                self.name, source, run_id=run_id, tags=tags, model_id=model_id
            )
            number = str(created.version)
            previous_challenger = self.challenger()
            if previous_challenger and previous_challenger != self.champion():
                self._set_tags(previous_challenger, {TAG_STAGE: ARCHIVED})
            self.client.set_registered_model_alias(self.name, CHALLENGER, number)
            self._append(
                "register",
                actor,
                previous_challenger,
                number,
                reason or "passed every gate",
                {
                    "run_id": run_id,
                    "dataset_version": dataset_version,
                    "model_family": family,
                    "training_set_sha256": training_set_sha256,
                    "gates": dict(gates),
                    "metrics": dict(metrics),
                },
            )
            if auto_approve:
                self._approve(number, AUTO_APPROVER, "auto-approve policy: every gate passed")
                self._promote(number, AUTO_APPROVER, "auto-approve policy: every gate passed")
        return VersionInfo(**{**asdict(self.info(number)), "created": True})

    def approve(self, version: str, actor: str, reason: str = "") -> VersionInfo:
        """Record an approval; the model's trainer may not approve it."""
        with self._serialised():
            number = self.resolve(version)
            self._approve(number, actor, reason)
        return self.info(number)

    def _approve(self, number: str, actor: str, reason: str) -> None:
        tags = self._version(number).tags
        status = tags.get(TAG_APPROVAL)
        _require_actor(actor)
        if status == REJECTED:
            raise ApprovalError(f"version {number} was rejected; register a new candidate")
        if status == APPROVED:
            raise ApprovalError(
                f"version {number} is already approved by {tags['keel.approved_by']}"
            )
        if tags.get(TAG_GATES_PASSED) != "true":
            raise ApprovalError(f"version {number} has no record of passing every gate")
        if actor == tags.get("keel.trained_by"):
            raise ApprovalError(
                f"{actor} trained version {number} and may not approve it: another person must"
            )
        self._set_tags(
            number,
            {
                TAG_APPROVAL: APPROVED,
                "keel.approved_by": actor,
                "keel.approved_at": _now(),
                "keel.approval_reason": reason,
            },
        )
        self._append("approve", actor, None, number, reason)

    def reject(self, version: str, actor: str, reason: str) -> VersionInfo:
        """Reject a version for good; the champion is rolled back, not rejected."""
        _require_actor(actor)
        if not reason.strip():
            raise ApprovalError("a rejection needs a reason")
        with self._serialised():
            number = self.resolve(version)
            if number == self.champion():
                raise ApprovalError(
                    f"version {number} is the champion: roll back first, then reject it"
                )
            if self._version(number).tags.get(TAG_APPROVAL) == REJECTED:
                raise ApprovalError(f"version {number} is already rejected")
            self._set_tags(
                number,
                {
                    TAG_APPROVAL: REJECTED,
                    TAG_STAGE: ARCHIVED,
                    "keel.rejected_by": actor,
                    "keel.rejected_at": _now(),
                    "keel.rejection_reason": reason,
                },
            )
            if self.challenger() == number:
                self.client.delete_registered_model_alias(self.name, CHALLENGER)
            self._append("reject", actor, None, number, reason)
        return self.info(number)

    def promote(self, version: str, actor: str, reason: str = "") -> VersionInfo:
        """Make an approved version the champion; the old champion is kept for rollback."""
        with self._serialised():
            number = self.resolve(version)
            self._promote(number, actor, reason)
        return self.info(number)

    def _promote(self, number: str, actor: str, reason: str) -> None:
        _require_actor(actor)
        tags = self._version(number).tags
        if tags.get(TAG_APPROVAL) != APPROVED:
            raise ApprovalError(
                f"version {number} is {tags.get(TAG_APPROVAL, 'not approved')}: promotion to "
                f"{CHAMPION} needs an approval by someone other than its trainer "
                f"({tags.get('keel.trained_by', 'unknown')}) or the auto-approve policy"
            )
        previous = self.champion()
        if previous == number:
            raise ApprovalError(f"version {number} is already the champion")
        self.client.set_registered_model_alias(self.name, CHAMPION, number)
        promoted_tags = {
            TAG_STAGE: PRODUCTION,
            "keel.promoted_by": actor,
            "keel.promoted_at": _now(),
        }
        if previous:
            promoted_tags[TAG_PREVIOUS_CHAMPION] = previous
            self._set_tags(previous, {TAG_STAGE: ARCHIVED})
        self._set_tags(number, promoted_tags)
        if self.challenger() == number:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
        self._append("promote", actor, previous, number, reason)

    def rollback(self, actor: str, reason: str) -> VersionInfo:
        """Give the champion alias back to the version that held it before the current one."""
        _require_actor(actor)
        if not reason.strip():
            raise ApprovalError("a rollback needs a reason")
        with self._serialised():
            current = self.champion()
            if current is None:
                raise RegistryError(f"{self.name} has no champion to roll back")
            previous = self._version(current).tags.get(TAG_PREVIOUS_CHAMPION)
            if not previous:
                raise RegistryError(
                    f"champion version {current} has no previous champion to roll back to"
                )
            self.client.set_registered_model_alias(self.name, CHAMPION, previous)
            self._set_tags(
                current,
                {
                    TAG_STAGE: ARCHIVED,
                    "keel.rolled_back_by": actor,
                    "keel.rolled_back_at": _now(),
                    "keel.rollback_reason": reason,
                },
            )
            self._set_tags(previous, {TAG_STAGE: PRODUCTION})
            self._append("rollback", actor, current, previous, reason)
        return self.info(previous)


def _require_actor(actor: str) -> None:
    if not actor or not actor.strip():
        raise ApprovalError("every registry action needs an actor (who is doing this)")


_HASHED_FIELDS = (
    "recorded_at",
    "model_name",
    "action",
    "actor",
    "from_version",
    "to_version",
    "reason",
    "details",
)


def _audit_table(metadata):  # -> sqlalchemy.Table
    import sqlalchemy as sa

    return sa.Table(
        AUDIT_TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False, index=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("from_version", sa.String(32)),
        sa.Column("to_version", sa.String(32)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("previous_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("record_hash", sa.String(64), nullable=False, unique=True),
    )


def _create_audit_table(engine, table) -> None:
    """Create the audit table with triggers that refuse UPDATE and DELETE (append-only)."""
    import sqlalchemy as sa

    table.metadata.create_all(engine, checkfirst=True)
    message = f"{AUDIT_TABLE} is append-only"
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            for event in ("UPDATE", "DELETE"):
                connection.execute(
                    sa.text(
                        f"CREATE TRIGGER IF NOT EXISTS {AUDIT_TABLE}_no_{event.lower()} "
                        f"BEFORE {event} ON {AUDIT_TABLE} "
                        f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
                    )
                )
        elif engine.dialect.name == "postgresql":
            connection.execute(
                sa.text(
                    f"CREATE OR REPLACE FUNCTION {AUDIT_TABLE}_refuse() RETURNS trigger "
                    f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{message}'; END $$"
                )
            )
            connection.execute(
                sa.text(
                    f"CREATE OR REPLACE TRIGGER {AUDIT_TABLE}_no_change BEFORE UPDATE OR DELETE "
                    f"ON {AUDIT_TABLE} FOR EACH ROW EXECUTE FUNCTION {AUDIT_TABLE}_refuse()"
                )
            )
            connection.execute(
                sa.text(
                    f"CREATE OR REPLACE TRIGGER {AUDIT_TABLE}_no_truncate BEFORE TRUNCATE "
                    f"ON {AUDIT_TABLE} FOR EACH STATEMENT EXECUTE FUNCTION {AUDIT_TABLE}_refuse()"
                )
            )
