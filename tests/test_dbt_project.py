"""The dbt project with its own CLI: key uniqueness over the whole table, the dbt executable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from keel.settings import DBT_PROJECT_DIR, PROJECT_ROOT

DBT = str(Path(sys.executable).with_name("dbt"))


def _dbt_test(warehouse: Path, target: Path, variables: dict) -> dict[str, str]:
    """Run the marts' uniqueness tests; returns each test's status by model."""
    result = subprocess.run(
        [
            DBT,
            "test",
            "--select",
            "fct_default_labels,test_name:unique_combination_of_columns "
            "fct_account_features_daily,test_name:unique_combination_of_columns",
            "--vars",
            json.dumps(variables),
            "--target-path",
            str(target),
            "--log-path",
            str(target),
        ],
        cwd=DBT_PROJECT_DIR,
        env={**os.environ, "KEEL_WAREHOUSE": str(warehouse), "KEEL_PROFILE": "local"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = json.loads((target / "run_results.json").read_text())["results"]
    statuses = {r["unique_id"].split(".")[2]: r["status"] for r in results}
    assert len(statuses) == 2, result.stdout + result.stderr
    return {
        name.split("_account_id")[0].removeprefix("unique_combination_of_columns_"): s
        for name, s in statuses.items()
    }


# dbt parses the project anew for each set of vars: 20-40 s on a busy two-core machine.
@pytest.mark.slow
def test_a_daily_run_fails_on_a_key_it_adds_that_the_table_already_holds(tmp_path):
    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute(
            """create table fct_default_labels as select * from (values
                   (1, date '2026-01-02', date '2026-01-03'),
                   (2, date '2026-01-02', date '2026-01-03'),
                   -- account 1's label of Jan 2 arrives again on Feb 1 (a second data world)
                   (1, date '2026-01-02', date '2026-02-01'),
                   (3, date '2026-01-31', date '2026-02-01')
               ) as t(account_id, observation_date, label_date)"""
        )
        connection.execute(
            """create table fct_account_features_daily as select * from (values
                   (1, date '2026-01-31'), (1, date '2026-02-01'), (2, date '2026-02-01')
               ) as t(account_id, feature_date)"""
        )
    new_day = {"start_date": "2026-02-01", "end_date": "2026-02-01"}
    statuses = _dbt_test(warehouse, tmp_path / "target", new_day)
    assert statuses == {"fct_default_labels": "fail", "fct_account_features_daily": "pass"}


@pytest.mark.slow
def test_dagster_dev_parses_the_dbt_project_without_the_venv_on_path(tmp_path):
    manifest = DBT_PROJECT_DIR / "target" / "manifest.json"
    before = manifest.stat().st_mtime_ns if manifest.exists() else 0
    result = subprocess.run(
        [sys.executable, "-c", "import orchestration.dbt"],
        cwd=PROJECT_ROOT,
        # What `dagster dev` sets; PATH holds only the system's folders, no dbt among them.
        env={
            "DAGSTER_IS_DEV_CLI": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "KEEL_HOME": str(tmp_path / "keel-home"),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert manifest.stat().st_mtime_ns > before
