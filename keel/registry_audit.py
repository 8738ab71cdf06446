"""The registry's audit log: append-only, chained with a key that the database never holds.

Each record carries an HMAC-SHA256 of the previous record's hash and its own fields, so
rewriting a record means recomputing every later hash, which needs the key; the key lives
outside the database (a ``0600`` file under the Keel home locally, a secret in shared
profiles). A head (the newest record's id and hash, itself keyed) is kept apart from the
table, in the MLflow registry, so deleting the newest records is seen as well.

A record is written before the registry change it describes, together with a row of the
pending table in the same transaction; the change is then applied and the pending row
deleted. A writer that dies in between leaves a pending row, and the next writer applies the
recorded change before anything else (see ``ModelRegistry``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

AUDIT_TABLE = "keel_registry_audit"
PENDING_TABLE = "keel_registry_pending"
HEAD_TAG = "keel.audit_head"
GENESIS_HASH = "0" * 64
KEY_FILE_NAME = "registry-audit.key"
MIN_KEY_CHARS = 32

HASHED_FIELDS = (
    "recorded_at",
    "model_name",
    "action",
    "actor",
    "from_version",
    "to_version",
    "reason",
    "details",
)


class AuditKeyError(RuntimeError):
    """The audit key is missing, too short or readable by others."""


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


class AuditVerdict(NamedTuple):
    """Whether the audit log is intact; if not, the first bad record (when one is) and why."""

    intact: bool
    broken_at: int | None = None
    problem: str = ""


@dataclass(frozen=True)
class AuditHead:
    """The newest record of one model as the last writer left it, keyed against forgery."""

    record_id: int
    record_hash: str
    mac: str

    def to_json(self) -> str:
        return json.dumps({"id": self.record_id, "hash": self.record_hash, "mac": self.mac})

    @classmethod
    def from_json(cls, text: str) -> AuditHead:
        value = json.loads(text)
        return cls(int(value["id"]), str(value["hash"]), str(value["mac"]))


# -- the key ----------------------------------------------------------------------------------


def load_key(secret: str = "", key_file: str | Path = "") -> bytes:
    """The audit key: ``secret`` when given, else the key file, created on first use (0600).

    A key file that others may read is refused: whoever reads it can rewrite the history.
    """
    if secret:
        if len(secret.strip()) < MIN_KEY_CHARS:
            raise AuditKeyError(
                f"the registry audit key must hold at least {MIN_KEY_CHARS} characters "
                "(e.g. the output of `openssl rand -hex 32`)"
            )
        return secret.strip().encode()
    if not key_file:
        raise AuditKeyError(
            "the registry audit log needs a key kept outside its database: set "
            "KEEL_REGISTRY_AUDIT_KEY (governance audit_key) or an audit key file"
        )
    from keel.files import create_exclusive

    path = Path(key_file)
    create_exclusive(path, secrets.token_hex(32) + "\n", mode=0o600)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AuditKeyError(
            f"the registry audit key {path} is open to other users (mode {mode:o}): "
            f"run `chmod 600 {path}`"
        )
    text = path.read_text().strip()
    if len(text) < MIN_KEY_CHARS:
        raise AuditKeyError(f"the registry audit key {path} is shorter than {MIN_KEY_CHARS} chars")
    return text.encode()


def record_hash(key: bytes, previous_hash: str, fields: Mapping[str, Any]) -> str:
    """HMAC-SHA256 of the previous record's hash and this record's fields (canonical JSON)."""
    canonical = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, (previous_hash + canonical).encode(), hashlib.sha256).hexdigest()


def head_for(key: bytes, model_name: str, record_id: int, record_hash_: str) -> AuditHead:
    """The keyed head naming ``record_id`` as the newest record of ``model_name``."""
    message = f"head\0{model_name}\0{record_id}\0{record_hash_}".encode()
    mac = hmac.new(key, message, hashlib.sha256).hexdigest()
    return AuditHead(record_id, record_hash_, mac)


# -- the tables -------------------------------------------------------------------------------


def audit_tables(metadata):  # -> (audit, pending) sqlalchemy Tables
    """The audit table and the table of records whose change may not be applied yet."""
    import sqlalchemy as sa

    audit = sa.Table(
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
        # Ids never come back after a delete, so a deleted newest record stays missing.
        sqlite_autoincrement=True,
    )
    pending = sa.Table(
        PENDING_TABLE,
        metadata,
        sa.Column("record_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("model_name", sa.String(256), nullable=False),
    )
    return audit, pending


def _owns_the_tables(connection) -> bool:
    """Whether this Postgres role owns the audit table (a writer role only inserts and reads)."""
    import sqlalchemy as sa

    owner = connection.execute(
        sa.text("select tableowner from pg_tables where tablename = :name"), {"name": AUDIT_TABLE}
    ).scalar()
    if owner is None:
        return True
    return bool(
        connection.execute(
            sa.text("select pg_has_role(current_user, :owner, 'USAGE')"), {"owner": owner}
        ).scalar()
    )


def create_tables(engine, audit) -> None:
    """Create the tables, with triggers that refuse UPDATE and DELETE on the audit table.

    On Postgres a role that does not own the tables (the writer role of
    :func:`grant_writer`) finds them made and leaves them as they are.
    """
    import sqlalchemy as sa

    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            if not _owns_the_tables(connection):
                return
    audit.metadata.create_all(engine, checkfirst=True)
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


def grant_writer(engine, role: str) -> None:
    """Let Postgres ``role`` append to and read the audit log, and nothing more.

    Run by the tables' owner. The role may INSERT and SELECT the audit table (and draw its ids);
    UPDATE, DELETE and TRUNCATE are not granted, so the database refuses them before any
    trigger runs, and a role that owns nothing cannot drop the triggers either. The pending
    table, whose rows are deleted once their change is applied, is a separate grant.
    """
    import sqlalchemy as sa

    create_tables(engine, audit_tables(sa.MetaData())[0])
    quoted = engine.dialect.identifier_preparer.quote(role)
    with engine.begin() as connection:
        sequence = connection.execute(
            sa.text("select pg_get_serial_sequence(:table, 'id')"), {"table": AUDIT_TABLE}
        ).scalar()
        for statement in (
            f"REVOKE ALL ON {AUDIT_TABLE}, {PENDING_TABLE} FROM PUBLIC, {quoted}",
            f"GRANT SELECT, INSERT ON {AUDIT_TABLE} TO {quoted}",
            f"GRANT USAGE ON SEQUENCE {sequence} TO {quoted}",
            f"GRANT SELECT, INSERT, DELETE ON {PENDING_TABLE} TO {quoted}",
        ):
            connection.execute(sa.text(statement))


def _to_record(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(**{**row, "details": json.loads(row["details"])})


class AuditLog:
    """The audit and pending tables of one model, and the key that chains them."""

    def __init__(self, engine, key: bytes, model_name: str):
        import sqlalchemy

        self.engine = engine
        self.key = key
        self.model_name = model_name
        self.audit, self.pending_table = audit_tables(sqlalchemy.MetaData())

    def create(self) -> None:
        create_tables(self.engine, self.audit)

    def records(self, limit: int | None = None) -> list[AuditRecord]:
        """This model's records, oldest first (the last ``limit`` when given)."""
        import sqlalchemy

        table = self.audit
        query = sqlalchemy.select(table).where(table.c.model_name == self.model_name)
        if limit:
            query = query.order_by(table.c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        rows.sort(key=lambda row: row["id"])
        return [_to_record(row) for row in rows]

    def append(
        self,
        recorded_at: str,
        action: str,
        actor: str,
        from_version: str | None,
        to_version: str | None,
        reason: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one record and mark it pending, in one transaction (callers hold the lock)."""
        import sqlalchemy

        table = self.audit
        fields = {
            "recorded_at": recorded_at,
            "model_name": self.model_name,
            "action": action,
            "actor": actor,
            "from_version": from_version,
            "to_version": to_version,
            "reason": reason,
            "details": json.dumps(dict(details or {}), sort_keys=True, default=str),
        }
        with self.engine.begin() as connection:
            last = connection.execute(
                sqlalchemy.select(table.c.record_hash).order_by(table.c.id.desc()).limit(1)
            ).scalar()
            previous = last or GENESIS_HASH
            digest = record_hash(self.key, previous, fields)
            result = connection.execute(
                table.insert().values(**fields, previous_hash=previous, record_hash=digest)
            )
            record_id = int(result.inserted_primary_key[0])
            connection.execute(
                self.pending_table.insert().values(record_id=record_id, model_name=self.model_name)
            )
        return _to_record(
            {**fields, "id": record_id, "previous_hash": previous, "record_hash": digest}
        )

    def pending(self) -> list[AuditRecord]:
        """This model's records whose registry change may not have been applied yet."""
        import sqlalchemy

        audit, pending = self.audit, self.pending_table
        query = (
            sqlalchemy.select(audit)
            .join(pending, pending.c.record_id == audit.c.id)
            .where(pending.c.model_name == self.model_name)
            .order_by(audit.c.id)
        )
        with self.engine.connect() as connection:
            return [_to_record(dict(row._mapping)) for row in connection.execute(query)]

    def settle(self, record_id: int) -> None:
        """The record's change is applied: it is no longer pending."""
        with self.engine.begin() as connection:
            connection.execute(
                self.pending_table.delete().where(self.pending_table.c.record_id == record_id)
            )

    def head(self, record: AuditRecord) -> AuditHead:
        return head_for(self.key, self.model_name, record.id, record.record_hash)

    def verify(self, head: AuditHead | None) -> AuditVerdict:
        """Check every record's keyed hash and link, and that nothing after ``head`` is gone."""
        import sqlalchemy

        with self.engine.connect() as connection:
            rows = [
                dict(row._mapping)
                for row in connection.execute(
                    sqlalchemy.select(self.audit).order_by(self.audit.c.id)
                )
            ]
            pending = {
                row.record_id
                for row in connection.execute(sqlalchemy.select(self.pending_table.c.record_id))
            }
        previous = GENESIS_HASH
        for row in rows:
            if row["previous_hash"] != previous:
                return AuditVerdict(
                    False, row["id"], f"record {row['id']} does not follow the record before it"
                )
            if not hmac.compare_digest(
                row["record_hash"],
                record_hash(self.key, previous, {k: row[k] for k in HASHED_FIELDS}),
            ):
                return AuditVerdict(
                    False, row["id"], f"record {row['id']} does not match its keyed hash"
                )
            previous = row["record_hash"]
        mine = [row for row in rows if row["model_name"] == self.model_name]
        if head is None:
            settled = [row["id"] for row in mine if row["id"] not in pending]
            if settled:
                return AuditVerdict(False, None, f"the audit head of {self.model_name} is missing")
            return AuditVerdict(True)
        expected = head_for(self.key, self.model_name, head.record_id, head.record_hash)
        if not hmac.compare_digest(expected.mac, head.mac):
            return AuditVerdict(False, None, "the audit head was not written with the audit key")
        by_id = {row["id"]: row for row in mine}
        if head.record_id not in by_id:
            newest = max(by_id, default=0)
            return AuditVerdict(
                False,
                None,
                f"records were deleted: the head names record {head.record_id}, the newest "
                f"left is {newest or 'none'}",
            )
        if by_id[head.record_id]["record_hash"] != head.record_hash:
            return AuditVerdict(
                False, head.record_id, f"record {head.record_id} is not the one the head names"
            )
        unsettled = [i for i in by_id if i > head.record_id and i not in pending]
        if unsettled:
            return AuditVerdict(
                False, unsettled[0], f"record {unsettled[0]} lies past the head and is not pending"
            )
        return AuditVerdict(True)
