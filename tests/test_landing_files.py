"""Files partners drop into the landing folder: mixed JSON types and empty files."""

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.ingestion import INGESTION_CHECKS, LANDING_PARTITIONS, raw_landed_activity
from keel.ingestion import LANDED_ACTIVITY, load_partition
from keel.validation import EMPTY_FILE, blocked_partitions, validate_partition

ROW = {
    "activity_date": "2026-01-02",
    "n_transactions": 2,
    "spend_amount": 12.5,
    "payment_amount": 0,
    "balance": 300.25,
    "missed_payment": False,
    "channel": "pos",
}


def _write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_json_lines_with_numbers_and_strings_in_one_key_load_as_the_same_text(keel_home, tmp_path):
    rows = [
        {"account_id": 106, **ROW},
        {"account_id": "107", **ROW, "n_transactions": "3", "channel": "online"},
        {"account_id": 108, **ROW, "spend_amount": "7.25", "missed_payment": None},
    ]
    source = _write_lines(tmp_path / "partner.jsonl", rows)
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        assert load_partition(connection, LANDED_ACTIVITY, source.name, source) == 3
        verdict = validate_partition(connection, LANDED_ACTIVITY, source.name, 0.5)
        loaded = connection.execute(
            """select account_id, n_transactions, spend_amount, missed_payment, channel
               from raw.landed_activity order by _row_number"""
        ).fetchall()
    assert loaded == [
        ("106", "2", "12.5", "false", "pos"),
        ("107", "3", "12.5", "false", "online"),
        ("108", "2", "7.25", None, "pos"),
    ]
    # Only the row that really lacks a value is quarantined.
    assert verdict.quarantined_rows == 1 and verdict.reasons == {"missing_value": 1}


def test_a_key_first_seen_late_in_a_json_lines_file_is_kept_as_an_extra_column(keel_home, tmp_path):
    # Past DuckDB's default sample of 20,480 lines.
    rows = [{"account_id": i, **ROW} for i in range(1, 25_001)]
    rows[-1]["coupon"] = "X1"
    source = _write_lines(tmp_path / "late_key.jsonl", rows)
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        load_partition(connection, LANDED_ACTIVITY, source.name, source)
        last = connection.execute(
            "select account_id, _extra from raw.landed_activity order by _row_number desc limit 1"
        ).fetchone()
    assert last[0] == "25000" and json.loads(last[1]) == {"coupon": "X1"}


@pytest.mark.parametrize("name, content", [("empty.csv", ""), ("empty.jsonl", "")])
def test_an_empty_file_is_blocked_with_the_empty_file_reason(
    data_resources, small_sources, name, content
):
    landing = Path(small_sources.landing_dir)
    (landing / name).write_text(content)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LANDING_PARTITIONS.name, [name])
    check = next(
        c for c in INGESTION_CHECKS if next(iter(c.check_keys)).asset_key == raw_landed_activity.key
    )
    result = dg.materialize(
        [raw_landed_activity, check],
        resources=data_resources,
        partition_key=name,
        instance=instance,
        raise_on_error=False,
    )
    evaluation = result.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    assert evaluation.description == f"blocked partitions: {name} ({EMPTY_FILE})"
    assert evaluation.metadata["partition_reasons"].value == {name: EMPTY_FILE}
    assert "empty_file: the source file holds no rows" in evaluation.metadata["partitions"].value
    warehouse = data_resources["warehouse"]
    with warehouse.connect(read_only=True) as connection:
        why = blocked_partitions(connection, LANDED_ACTIVITY, [name])
        stored = connection.execute(
            "select failed_expectations from validation.partition_verdicts where _partition = ?",
            [name],
        ).fetchone()[0]
    assert why == {name: "failed validation: empty_file (the source file holds no rows)"}
    assert [f["reason"] for f in json.loads(stored)] == [EMPTY_FILE]
