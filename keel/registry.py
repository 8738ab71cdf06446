"""The model registry on MLflow: lineage-tagged versions, approvals, aliases, rollback, audit.

The usual lifecycle stages map onto MLflow aliases and one tag:

- Development: a training run in the MLflow experiment, not registered yet;
- Staging: the registered version holding the ``challenger`` alias (it passed every gate);
- Production: the version holding the ``champion`` alias, which serving loads;
- Archived: a former champion, a rejected version or a challenger replaced by a newer one.

Only candidates that passed every gate are registered. Promotion to champion needs an
approval by someone other than the person who trained the model, or the auto-approve policy
(which only acts when every gate passed). Every registration, approval, rejection, promotion
and rollback appends one record to an append-only audit table in a SQL database (by default
the registry's own), chained with a key kept outside it (``keel.registry_audit``). The record
is written before the aliases and tags move; a writer that dies in between leaves it pending
and the next writer finishes the change. The audit log, not MLflow's tags, decides whether a
version is approved (``require_approved``). Registry writes are serialised across processes
(a file lock, plus a Postgres advisory lock when the audit database is Postgres), and
registration is idempotent per dataset version and model family. Who may register, approve,
reject, promote, roll back and deploy is decided by the roles of authenticated identities
(``keel.access``); refusals are audited too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.access.guard import AccessSteps
from keel.registry_audit import AUDIT_TABLE as AUDIT_TABLE  # the table's name, for readers
from keel.registry_audit import (
    HEAD_TAG,
    KEY_FILE_NAME,
    AuditHead,
    AuditKeyError,
    AuditLog,
    AuditRecord,
    AuditVerdict,
    load_key,
)
from keel.registry_lineage import (
    GATE_PREFIX,
    METRIC_PREFIX,
    TAG_APPROVAL,
    TAG_EVALUATION_REPORT,
    TAG_GATES_PASSED,
    TAG_PREVIOUS_CHAMPION,
    TAG_STAGE,
    TAG_TRAINING_SET_SHA256,
    file_sha256,
    version_lineage,
)
from keel.registry_releases import ReleaseSteps
from keel.registry_types import (
    ACTIONS,
    APPROVED,
    ARCHIVED,
    AUTO_APPROVER,
    CHALLENGER,
    CHAMPION,
    DEPLOY_ACTIONS,
    MODEL_ARTIFACT_PATH,
    PENDING,
    PRODUCTION,
    REJECTED,
    STAGING,
    ApprovalError,
    RegistryConfig,
    RegistryError,
    VersionInfo,
    require_actor,
)
from keel.schema import LINEAGE_TAGS

if TYPE_CHECKING:
    from keel.access import Identity

# The registry's names live in keel.registry_types; callers import them from here.
__all__ = [
    "ACTIONS",
    "APPROVED",
    "ARCHIVED",
    "AUTO_APPROVER",
    "CHALLENGER",
    "CHAMPION",
    "DEPLOY_ACTIONS",
    "MODEL_ARTIFACT_PATH",
    "PENDING",
    "PRODUCTION",
    "REJECTED",
    "STAGING",
    "ApprovalError",
    "ModelRegistry",
    "RegistryConfig",
    "RegistryError",
    "VersionInfo",
]

_PG_LOCK_KEY = 0x6B65656C  # "keel": one advisory lock for every registry write


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class ModelRegistry(ReleaseSteps, AccessSteps):
    """The registered model (``schema.REGISTERED_MODEL``): versions, approvals, aliases, audit.

    Every method that changes the registry runs under one cross-process lock, so parallel
    pipelines never meet SQLite's "database is locked" and never race on aliases. Use it as a
    context manager (``with ModelRegistry(config) as registry:``) so its connections close.
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
        self._lock_file = config.lock_file
        key_file = config.audit_key_file
        if self._audit_engine.dialect.name == "sqlite":
            database = self._audit_engine.url.database or ""
            if database in ("", ":memory:"):
                raise RegistryError("an in-memory audit database cannot be shared: give a file")
            self._lock_file = self._lock_file or f"{database}.lock"
            key_file = key_file or str(Path(database).with_name(KEY_FILE_NAME))
        try:
            key = load_key(config.audit_key, key_file)
        except AuditKeyError as error:
            raise RegistryError(str(error)) from error
        self._log = AuditLog(self._audit_engine, key, self.name)
        with self._serialised(settle=False):
            self._log.create()
            # A writer died after recording a change: carry it out before anyone reads aliases.
            if self._log.pending() and self.verify_audit().intact:
                self._recover()

    def close(self) -> None:
        self._audit_engine.dispose()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- locking -------------------------------------------------------------------------------

    @contextmanager
    def _serialised(self, settle: bool = True) -> Iterator[None]:
        """Hold the registry lock; a writer first checks the audit log and finishes its backlog."""
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
            if settle:
                verdict = self.verify_audit()
                if not verdict.intact:
                    raise RegistryError(
                        f"the registry audit log fails verification ({verdict.problem}): "
                        "nothing is written until it is investigated (keel registry audit --verify)"
                    )
                self._recover()
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
        aliases = [a for a, v in self._aliases().items() if v == number]
        return version_lineage(self.name, self._version(number), str(version_or_alias), aliases)

    # -- the audit trail -------------------------------------------------------------------------

    def audit_records(self, limit: int | None = None) -> list[AuditRecord]:
        """The audit trail, oldest first (the last ``limit`` records when given)."""
        return self._log.records(limit)

    def _head(self) -> AuditHead | None:
        from mlflow.exceptions import MlflowException

        try:
            text = self.client.get_registered_model(self.name).tags.get(HEAD_TAG)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return AuditHead.from_json(text) if text else None

    def verify_audit(self) -> AuditVerdict:
        """Check the keyed chain and the head kept in MLflow: (intact, first bad record, why)."""
        return self._log.verify(self._head())

    def audited_champion(self) -> str | None:
        """The champion as the audit log has it: where the last promotion or rollback went."""
        moves = [r for r in self._log.records() if r.action in ("promote", "rollback")]
        return moves[-1].to_version if moves else None

    def _version_records(self, number: str) -> list[AuditRecord]:
        return [r for r in self._log.records() if r.to_version == number]

    def _approval_problem(self, number: str) -> str | None:
        """Why the audit log does not approve ``number``, or None when it does."""
        version = self._version(number)
        records = self._version_records(number)
        registered = [r for r in records if r.action == "register"]
        if not registered:
            return "the audit log has no registration of it (it was not registered by Keel)"
        if registered[-1].details.get("run_id") not in (None, version.run_id):
            return "its MLflow run is not the one the audit log registered"
        decisions = [r for r in records if r.action in ("approve", "reject")]
        if not decisions:
            tag = version.tags.get(TAG_APPROVAL, "")
            said = f" (its approval tag says {tag!r}, set outside Keel)" if tag == APPROVED else ""
            return f"the audit log holds no approval of it{said}"
        last = decisions[-1]
        if last.action == "reject":
            return f"{last.actor} rejected it ({last.reason})"
        trained_by = registered[-1].details.get("trained_by") or version.tags.get("keel.trained_by")
        if last.actor == trained_by:
            return f"it was approved by {last.actor}, who trained it"
        return None

    def require_approved(self, version: str) -> None:
        """Raise ApprovalError unless the verified audit log holds a valid approval of ``version``.

        Anyone with MLflow access can move an alias or set a tag; only the audit log, chained
        with a key MLflow never sees, says who approved what. Scoring and serving call this
        before a version answers.
        """
        number = str(version).strip()
        verdict = self.verify_audit()
        if not verdict.intact:
            raise ApprovalError(
                f"the registry audit log fails verification ({verdict.problem}): no version of "
                f"{self.name} is trusted until it is investigated"
            )
        try:
            problem = self._approval_problem(number)
        except RegistryError as error:
            raise ApprovalError(str(error)) from error
        if problem:
            raise ApprovalError(
                f"version {number} of {self.name} is not approved: {problem}. Approve it with "
                f"`keel registry approve {number}` (someone other than its trainer)"
            )

    def _append(
        self,
        action: str,
        actor: str,
        from_version: str | None,
        to_version: str | None,
        reason: str,
        details: Mapping[str, Any] | None = None,
        replay: bool = False,
    ) -> AuditRecord:
        """Record a change before the caller makes it (callers hold the lock).

        The record and its pending mark share one transaction, then the head moves. With
        ``replay`` it stays pending until the caller settles it, so that a writer dying in
        between leaves a change the next writer finishes (`_apply`); otherwise it is settled
        at once.
        """
        details = {**self._identity_details(actor), **(details or {})}
        record = self._log.append(_now(), action, actor, from_version, to_version, reason, details)
        self._move_head(record)
        if not replay:
            self._log.settle(record.id)
        return record

    def _move_head(self, record: AuditRecord) -> None:
        self.client.set_registered_model_tag(self.name, HEAD_TAG, self._log.head(record).to_json())

    def _record(
        self,
        action: str,
        actor: str,
        from_version: str | None,
        to_version: str | None,
        reason: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Write the audit record, then make the change it describes."""
        record = self._append(action, actor, from_version, to_version, reason, details, True)
        self._apply(record)
        self._log.settle(record.id)
        return record

    def _recover(self) -> None:
        """Finish the changes of records whose writer died before making them."""
        for record in self._log.pending():
            head = self._head()
            if head is None or record.id > head.record_id:
                self._move_head(record)
            if record.action in ACTIONS:
                self._apply(record)
            elif record.action in DEPLOY_ACTIONS:
                self._apply_deployment(record)
            self._log.settle(record.id)

    def _apply(self, record: AuditRecord) -> None:
        """Move the aliases and tags as ``record`` says; doing it twice changes nothing."""
        number, old, actor, at = (
            record.to_version,
            record.from_version,
            record.actor,
            record.recorded_at,
        )
        if record.action == "register":
            if old and old != number and old != self.champion():
                self._set_tags(old, {TAG_STAGE: ARCHIVED})
            self.client.set_registered_model_alias(self.name, CHALLENGER, number)
        elif record.action == "approve":
            self._set_tags(
                number,
                {
                    TAG_APPROVAL: APPROVED,
                    "keel.approved_by": actor,
                    "keel.approved_at": at,
                    "keel.approval_reason": record.reason,
                },
            )
        elif record.action == "reject":
            self._set_tags(
                number,
                {
                    TAG_APPROVAL: REJECTED,
                    TAG_STAGE: ARCHIVED,
                    "keel.rejected_by": actor,
                    "keel.rejected_at": at,
                    "keel.rejection_reason": record.reason,
                },
            )
            if self.challenger() == number:
                self.client.delete_registered_model_alias(self.name, CHALLENGER)
        elif record.action == "promote":
            self.client.set_registered_model_alias(self.name, CHAMPION, number)
            promoted = {TAG_STAGE: PRODUCTION, "keel.promoted_by": actor, "keel.promoted_at": at}
            if old:
                promoted[TAG_PREVIOUS_CHAMPION] = old
                self._set_tags(old, {TAG_STAGE: ARCHIVED})
            self._set_tags(number, promoted)
            if self.challenger() == number:
                self.client.delete_registered_model_alias(self.name, CHALLENGER)
        elif record.action == "rollback":
            self.client.set_registered_model_alias(self.name, CHAMPION, number)
            self._set_tags(
                old,
                {
                    TAG_STAGE: ARCHIVED,
                    "keel.rolled_back_by": actor,
                    "keel.rolled_back_at": at,
                    "keel.rollback_reason": record.reason,
                },
            )
            self._set_tags(number, {TAG_STAGE: PRODUCTION})

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
        actor: Identity | str,
        auto_approve: bool = False,
        model_uri: str | None = None,
        evaluation_report: str = "",
        reason: str = "",
        promote: bool = True,
        extra_tags: Mapping[str, str] | None = None,
    ) -> VersionInfo:
        """Register a candidate that passed every gate and make it the challenger.

        Idempotent per dataset version and model family: a second call for the same pair
        returns the existing version (``created=False``) and writes nothing. With
        ``auto_approve`` the new version is approved by the policy and, unless ``promote`` is
        False (a canary release promotes it later), promoted to champion.

        Args:
            run_id: The MLflow training run (it carries the lineage tags).
            metrics: Headline evaluation numbers, stored as version tags.
            gates: Gate name -> passed; every gate must have passed.
            actor: Who registers: an authenticated identity with the ``trainer`` role (or free
                text, recorded as unverified, when the registry does not require identities).
            auto_approve: Whether the auto-approve policy is on.
            model_uri: The run's model URI when known (``models:/m-...`` or ``runs:/...``).
            evaluation_report: Where the evaluation's HTML report is kept.
            reason: Why, for the audit trail.
            promote: Whether an auto-approved version becomes the champion at once.
            extra_tags: More version tags (the held-out score histogram, for example).
        """
        actor = self._authorize(actor, "register", None)
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
        try:
            training_set_sha256 = file_sha256(lineage["keel.training_set_path"])
        except FileNotFoundError as error:
            raise RegistryError(
                f"training set {lineage['keel.training_set_path']!r} does not exist: its lineage "
                "cannot be proven"
            ) from error
        details = {
            "run_id": run_id,
            "dataset_version": dataset_version,
            "model_family": family,
            "trained_by": lineage["keel.trained_by"],
            "training_set_sha256": training_set_sha256,
            "gates": dict(gates),
            "metrics": dict(metrics),
        }
        with self._serialised():
            number = self.find(dataset_version, family)
            if number is not None:
                if any(r.action == "register" for r in self._version_records(number)):
                    return self.info(number)
                # A writer died between creating this version and recording it: record it now.
                self._record("register", actor, self.challenger(), number, reason, details)
                return VersionInfo(**{**asdict(self.info(number)), "created": True})
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
                **(extra_tags or {}),
            }
            created = self.client.create_model_version(
                self.name, source, run_id=run_id, tags=tags, model_id=model_id
            )
            number = str(created.version)
            reason = reason or "passed every gate"
            self._record("register", actor, self.challenger(), number, reason, details)
            if auto_approve:
                self._approve(number, AUTO_APPROVER, "auto-approve policy: every gate passed")
                if promote:
                    self._promote(number, AUTO_APPROVER, "auto-approve policy: every gate passed")
        return VersionInfo(**{**asdict(self.info(number)), "created": True})

    def approve(self, version: str, actor: Identity | str, reason: str = "") -> VersionInfo:
        """Record an approval; the model's trainer may not approve it."""
        actor = self._authorize(actor, "approve", version)
        with self._serialised():
            number = self.resolve(version)
            self._approve(number, actor, reason)
        return self.info(number)

    def _approve(self, number: str, actor: str, reason: str) -> None:
        require_actor(actor)
        tags = self._version(number).tags
        records = self._version_records(number)
        registered = [r for r in records if r.action == "register"]
        if not registered:
            raise ApprovalError(f"version {number} has no registration in the audit log")
        decisions = [r for r in records if r.action in ("approve", "reject")]
        if decisions and decisions[-1].action == "reject":
            raise ApprovalError(f"version {number} was rejected; register a new candidate")
        if decisions:
            raise ApprovalError(f"version {number} is already approved by {decisions[-1].actor}")
        gates = registered[-1].details.get("gates") or {}
        if not gates or not all(gates.values()):
            raise ApprovalError(f"version {number} has no record of passing every gate")
        if actor == (registered[-1].details.get("trained_by") or tags.get("keel.trained_by")):
            raise ApprovalError(
                f"{actor} trained version {number} and may not approve it: another person must"
            )
        self._record("approve", actor, None, number, reason)

    def reject(self, version: str, actor: Identity | str, reason: str) -> VersionInfo:
        """Reject a version for good; the champion is rolled back, not rejected."""
        actor = self._authorize(actor, "reject", version)
        require_actor(actor)
        if not reason.strip():
            raise ApprovalError("a rejection needs a reason")
        with self._serialised():
            number = self.resolve(version)
            if number in (self.champion(), self.audited_champion()):
                raise ApprovalError(
                    f"version {number} is the champion: roll back first, then reject it"
                )
            if any(r.action == "reject" for r in self._version_records(number)):
                raise ApprovalError(f"version {number} is already rejected")
            self._record("reject", actor, None, number, reason)
        return self.info(number)

    def promote(self, version: str, actor: Identity | str, reason: str = "") -> VersionInfo:
        """Make an approved version the champion; the old champion is kept for rollback."""
        actor = self._authorize(actor, "promote", version)
        with self._serialised():
            number = self.resolve(version)
            self._promote(number, actor, reason)
        return self.info(number)

    def _promote(self, number: str, actor: str, reason: str) -> None:
        require_actor(actor)
        problem = self._approval_problem(number)
        if problem:
            raise ApprovalError(
                f"version {number}: {problem}; promotion to {CHAMPION} needs an approval by "
                "someone other than its trainer or the auto-approve policy"
            )
        # The audit log's champion, not an alias anyone with MLflow access may have moved.
        previous = self.audited_champion()
        if previous == number:
            raise ApprovalError(f"version {number} is already the champion")
        self._record("promote", actor, previous, number, reason)

    def rollback(self, actor: Identity | str, reason: str) -> VersionInfo:
        """Give the champion alias back to the version that held it before the current one."""
        actor = self._authorize(actor, "rollback", None)
        require_actor(actor)
        if not reason.strip():
            raise ApprovalError("a rollback needs a reason")
        with self._serialised():
            current = self.audited_champion()
            if current is None:
                raise RegistryError(f"{self.name} has no champion to roll back")
            # The audit log, not a tag anyone may set, says which version held it before.
            promotions = [r for r in self._version_records(current) if r.action == "promote"]
            previous = promotions[-1].from_version if promotions else None
            if not previous:
                raise RegistryError(
                    f"champion version {current} has no previous champion to roll back to"
                )
            self._record("rollback", actor, current, previous, reason)
        return self.info(previous)
