"""Feast's own CLI on the repo's feature_repo: a plan after apply and materialise is a no-op."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keel.settings import FEATURE_REPO_DIR

FEAST = str(Path(sys.executable).with_name("feast"))

# One process pays Feast's import once for the first plan, the apply and the materialisation.
PLAN_APPLY_MATERIALIZE = """
from feast.cli.cli import cli

for command in (
    ["plan"],
    ["apply"],
    ["materialize", "2026-01-01T00:00:00", "2026-01-04T00:00:00", "--views", "account_daily_fv"],
):
    print(f"$ feast {' '.join(command)}", flush=True)
    cli.main(command, prog_name="feast", standalone_mode=False)
"""


def _run(command: list[str], env: dict) -> str:
    result = subprocess.run(
        command, cwd=FEATURE_REPO_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


# Two Feast processes: 60-90 s on a busy two-core machine.
@pytest.mark.slow
def test_feast_plan_after_apply_and_materialize_reports_no_changes(keel_home):
    from tests.test_features import write_synthetic_marts

    write_synthetic_marts(keel_home.marts, accounts=30, days=4, label_rows=40)
    env = {**os.environ, "KEEL_HOME": str(keel_home.home), "KEEL_PROFILE": "local"}
    first = _run([sys.executable, "-c", PLAN_APPLY_MATERIALIZE], env)
    before_apply = first.split("$ feast apply")[0]
    assert "Created feature view account_daily_fv" in before_apply
    assert "Created sqlite table keel_account_daily_fv" in before_apply

    # A fresh process, as a user runs it: the repo's objects are built anew.
    plan = _run([FEAST, "plan"], env)
    assert "No changes to registry" in plan and "No changes to infrastructure" in plan
    assert "Created" not in plan and "Updated" not in plan
