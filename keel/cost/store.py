"""The cost file: one row per step run, with its measured usage, prices and money.

Rows are written by the step that ran (`keel.cost.dagster.StepCostHandler`) in SQLite under
``$KEEL_HOME/cost/costs.db``. Totals per run, asset, day and registered model version are
sums of these rows: a step that materialised several assets (a dbt build) splits its cost
evenly between them, and a model version costs every step of the Dagster runs that trained it
(the run that logged its MLflow run, with its retries and re-executions).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

COLUMNS = (
    "run_id",
    "root_run_id",
    "job_name",
    "step_key",
    "status",
    "partition",
    "assets",
    "started_at",
    "ended_at",
    "wall_s",
    "cpu_s",
    "peak_memory_bytes",
    "gpu_s",
    "bytes_written",
    "peak_scope",
    "profile",
    "prices",
    "cost_cpu",
    "cost_memory",
    "cost_gpu",
    "cost_written",
    "cost",
    "currency",
    "mlflow_run_id",
    "saved",
)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS step_costs (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "run_id TEXT NOT NULL, root_run_id TEXT NOT NULL, job_name TEXT NOT NULL, step_key TEXT "
    "NOT NULL, status TEXT NOT NULL, partition TEXT, assets TEXT NOT NULL, started_at TEXT NOT "
    "NULL, ended_at TEXT NOT NULL, wall_s REAL NOT NULL, cpu_s REAL NOT NULL, "
    "peak_memory_bytes INTEGER NOT NULL, gpu_s REAL NOT NULL, bytes_written INTEGER NOT NULL, "
    "peak_scope TEXT NOT NULL, profile TEXT NOT NULL, prices TEXT NOT NULL, cost_cpu REAL NOT "
    "NULL, cost_memory REAL NOT NULL, cost_gpu REAL NOT NULL, cost_written REAL NOT NULL, "
    "cost REAL NOT NULL, currency TEXT NOT NULL, mlflow_run_id TEXT, saved REAL NOT NULL)"
)
_SINCE = re.compile(r"^(\d+)([hdw])$")


class CostError(ValueError):
    """A cost query that cannot be answered as asked."""


def default_cost_file() -> Path:
    """``$KEEL_HOME/cost/costs.db``."""
    from keel.settings import KeelPaths

    return KeelPaths.current().home / "cost" / "costs.db"


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``2w`` or an ISO date, as a UTC datetime."""
    now = now or datetime.now(UTC)
    match = _SINCE.match(text.strip())
    if match:
        amount, unit = int(match[1]), match[2]
        return now - timedelta(**{{"h": "hours", "d": "days", "w": "weeks"}[unit]: amount})
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise CostError(f"--since takes 30d, 12h, 2w or an ISO date, not {text!r}") from error
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class Total:
    """Sums over steps."""

    steps: int = 0
    cost: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    bytes_written: int = 0
    peak_memory_bytes: int = 0
    saved: float = 0.0

    def add(self, row: Mapping[str, Any], share: float = 1.0) -> None:
        self.steps += 1
        self.cost += row["cost"] * share
        self.cpu_s += row["cpu_s"] * share
        self.gpu_s += row["gpu_s"] * share
        self.bytes_written += int(row["bytes_written"] * share)
        self.peak_memory_bytes = max(self.peak_memory_bytes, row["peak_memory_bytes"])
        self.saved += row["saved"] * share

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CostStore:
    """Append step costs; sum them per run, asset, day or model version."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_cost_file()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=60)
        connection.row_factory = sqlite3.Row
        connection.execute(_SCHEMA)
        return connection

    def record(self, row: Mapping[str, Any]) -> int:
        values = {
            **row,
            "assets": json.dumps(list(row["assets"])),
            "prices": json.dumps(row["prices"]),
        }
        missing = [name for name in COLUMNS if name not in values]
        if missing:
            raise CostError(f"a cost row lacks {missing}")
        connection = self._connect()
        try:
            with connection:
                cursor = connection.execute(
                    f"INSERT INTO step_costs ({', '.join(COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in COLUMNS)})",
                    [values[name] for name in COLUMNS],
                )
            return int(cursor.lastrowid)
        finally:
            connection.close()

    def rows(self, since: datetime | None = None, after_id: int = 0) -> list[dict[str, Any]]:
        """Rows ended at or after ``since`` (all when None) with an id above ``after_id``."""
        if not self.path.exists():
            return []
        query = "SELECT * FROM step_costs WHERE id > ?"
        params: list[Any] = [after_id]
        if since is not None:
            query += " AND ended_at >= ?"
            params.append(since.astimezone(UTC).isoformat())
        connection = self._connect()
        try:
            found = connection.execute(query + " ORDER BY id", params).fetchall()
        finally:
            connection.close()
        return [
            {**dict(row), "assets": json.loads(row["assets"]), "prices": json.loads(row["prices"])}
            for row in found
        ]

    def by_run(self, since: datetime | None = None) -> dict[str, Total]:
        return _group(self.rows(since), lambda row: [(row["run_id"], 1.0)])

    def by_day(self, since: datetime | None = None) -> dict[str, Total]:
        return _group(self.rows(since), lambda row: [(row["ended_at"][:10], 1.0)])

    def by_asset(self, since: datetime | None = None) -> dict[str, Total]:
        def shares(row):
            assets = row["assets"] or [row["step_key"]]
            return [(asset, 1.0 / len(assets)) for asset in assets]

        return _group(self.rows(since), shares)

    def by_model(
        self, versions: Mapping[str, Iterable[str]], since: datetime | None = None
    ) -> dict[str, Total]:
        """Cost per version: every step of the Dagster runs that logged its MLflow run(s).

        Args:
            versions: Version label -> the MLflow run ids of its lineage (its training run).
            since: Only steps ended at or after it.
        """
        rows = self.rows(since)
        roots_of: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            for run_id in run_ids_of(row):
                roots_of[run_id].add(row["root_run_id"])
        totals = {}
        for label, run_ids in versions.items():
            roots = set().union(*(roots_of.get(run_id, set()) for run_id in run_ids))
            total = Total()
            for row in rows:
                if row["root_run_id"] in roots:
                    total.add(row)
            totals[label] = total
        return totals


def run_ids_of(row: Mapping[str, Any]) -> list[str]:
    """The MLflow runs a step logged (a step training several families logs one each)."""
    return [run for run in (row.get("mlflow_run_id") or "").split(",") if run]


def _group(rows: list[dict[str, Any]], keys) -> dict[str, Total]:
    totals: dict[str, Total] = defaultdict(Total)
    for row in rows:
        for key, share in keys(row):
            totals[key].add(row, share)
    return dict(sorted(totals.items()))
