import json
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.ingestion import (
    INGESTION_CHECKS,
    LANDING_PARTITIONS,
    raw_account_activity,
    raw_account_holders,
    raw_landed_activity,
)
from keel.generator import DriftScenario, GeneratorConfig, activity_table, write_landing_file
from keel.ingestion import (
    ACCOUNT_ACTIVITY,
    LANDED_ACTIVITY,
    IngestionError,
    load_partition,
    partition_row_count,
)
from keel.validation import blocked_partitions, validate_partition
from orchestration.resources import DriftScenarioConfig, SourcesResource
from orchestration.sensors import landing_file_sensor

DAY = "2026-01-05"


def _checks_for(*assets):
    keys = {a.key for a in assets}
    return [c for c in INGESTION_CHECKS if next(iter(c.check_keys)).asset_key in keys]


def _rows(warehouse: str, sql: str, *params):
    with duckdb.connect(warehouse, read_only=True) as connection:
        return connection.execute(sql, list(params)).fetchall()


def test_materialising_a_partition_twice_gives_the_same_rows(data_resources, keel_home):
    selection = [raw_account_activity, *_checks_for(raw_account_activity)]
    digests = []
    for _ in range(2):
        result = dg.materialize(selection, resources=data_resources, partition_key=DAY)
        assert result.success
        digests.append(
            _rows(
                str(keel_home.warehouse),
                """select count(*), sum(hash(account_id, spend_amount, _row_number))
                   from raw.account_activity where _partition = ?""",
                DAY,
            )
        )
    assert digests[0] == digests[1]
    assert digests[0][0][0] > 250
    verdicts = _rows(
        str(keel_home.warehouse),
        "select count(*) from validation.partition_verdicts where _partition = ?",
        DAY,
    )
    assert verdicts == [(1,)]


def test_a_failed_reload_keeps_the_previous_partition(tmp_path, keel_home):
    config = GeneratorConfig(accounts=200)
    good = write_landing_file(activity_table(config, date(2026, 1, 1)), tmp_path, "good", "parquet")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[:200])
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        load_partition(connection, ACCOUNT_ACTIVITY, "2026-01-01", good)
        with pytest.raises(IngestionError, match="cannot be read"):
            load_partition(connection, ACCOUNT_ACTIVITY, "2026-01-01", broken)
        assert partition_row_count(connection, ACCOUNT_ACTIVITY, "2026-01-01") == 200


def test_unknown_file_formats_are_refused_clearly(tmp_path, keel_home):
    odd = tmp_path / "export.xlsx"
    odd.write_text("not a table")
    with (
        duckdb.connect(str(keel_home.warehouse)) as connection,
        pytest.raises(IngestionError, match="unsupported format"),
    ):
        load_partition(connection, ACCOUNT_ACTIVITY, "2026-01-01", odd)


def test_quarantine_reconciles_with_raw_and_clean_rows(keel_home, tmp_path):
    start = date(2026, 1, 1)
    config = GeneratorConfig(accounts=1_000, scenarios=(DriftScenario("malformed", start, 0.04),))
    source = write_landing_file(activity_table(config, start), tmp_path, "day", "parquet")
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        load_partition(connection, ACCOUNT_ACTIVITY, start.isoformat(), source)
        verdict = validate_partition(connection, ACCOUNT_ACTIVITY, start.isoformat(), 0.05)
        quarantined = dict(
            connection.execute(
                "select reason_code, count(*) from quarantine.account_activity group by 1"
            ).fetchall()
        )
    assert verdict.passed
    assert verdict.raw_rows == 1_008
    assert verdict.raw_rows == verdict.clean_rows + verdict.quarantined_rows
    assert sum(quarantined.values()) == verdict.quarantined_rows == 40
    assert set(quarantined) == {
        "missing_key",
        "wrong_type",
        "duplicate",
        "out_of_range",
        "unknown_category",
    }


def test_a_partition_over_the_bad_share_limit_fails_its_check_and_stays_blocked(
    data_resources, small_sources, keel_home
):
    sources = SourcesResource(
        **{
            **small_sources.model_dump(),
            "scenarios": [DriftScenarioConfig(kind="malformed", start=DAY, strength=0.2)],
        }
    )
    resources = {**data_resources, "sources": sources}
    result = dg.materialize(
        [raw_account_activity, *_checks_for(raw_account_activity)],
        resources=resources,
        partition_key=DAY,
        raise_on_error=False,
    )
    evaluation = result.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    assert evaluation.metadata["failed_partitions"].value == [DAY]
    with duckdb.connect(str(keel_home.warehouse), read_only=True) as connection:
        blocked = blocked_partitions(connection, ACCOUNT_ACTIVITY, [DAY, "2026-01-06"])
        counts = connection.execute(
            """select raw_rows, clean_rows, quarantined_rows from validation.partition_verdicts
               where _partition = ?""",
            [DAY],
        ).fetchone()
    assert "failed validation" in blocked[DAY]
    assert "not validated" in blocked["2026-01-06"]
    assert counts[0] == counts[1] + counts[2]


def test_schema_change_quarantines_the_whole_partition_and_keeps_the_values(keel_home, tmp_path):
    start = date(2026, 1, 1)
    config = GeneratorConfig(accounts=100, scenarios=(DriftScenario("schema", start, 1.0),))
    source = write_landing_file(activity_table(config, start), tmp_path, "day", "csv")
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        load_partition(connection, ACCOUNT_ACTIVITY, start.isoformat(), source)
        verdict = validate_partition(connection, ACCOUNT_ACTIVITY, start.isoformat(), 0.05)
        kept = connection.execute(
            "select json_extract_string(_extra, '$.spend_amt') from quarantine.account_activity"
        ).fetchall()
    assert not verdict.passed and verdict.reasons == {"unexpected_column": 100}
    assert all(value is not None for (value,) in kept) and len(kept) == 100


@pytest.mark.parametrize("file_format", ["csv", "parquet", "jsonl"])
def test_landing_formats_load_the_same_values(keel_home, tmp_path, file_format):
    table = activity_table(GeneratorConfig(accounts=50), date(2026, 1, 2))
    source = write_landing_file(table, tmp_path, "drop", file_format)
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        load_partition(connection, LANDED_ACTIVITY, source.name, source)
        verdict = validate_partition(connection, LANDED_ACTIVITY, source.name, 0.0)
        loaded = connection.execute(
            """select account_id, activity_date, spend_amount, missed_payment, channel
               from raw.landed_activity order by _row_number"""
        ).fetchall()
    expected = table.to_pandas()
    assert verdict.passed, verdict.failed_expectations
    assert [row[0] for row in loaded] == [str(v) for v in expected["account_id"]]
    assert {row[1] for row in loaded} == {"2026-01-02"}
    assert [float(row[2]) for row in loaded] == pytest.approx(list(expected["spend_amount"]))
    assert {row[4] for row in loaded} <= {"online", "pos", "atm", "branch"}


def test_landing_sensor_loads_each_file_exactly_once(data_resources, small_sources):
    landing = Path(small_sources.landing_dir)
    table = activity_table(GeneratorConfig(accounts=20), date(2026, 1, 3))
    write_landing_file(table, landing, "partner_a", "csv")
    write_landing_file(table, landing, ".partner_b.csv", "csv")  # a writer's temporary file
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"sources": small_sources}
        )
        return landing_file_sensor(context), context

    first, _ = tick(None)
    assert [r.partition_key for r in first.run_requests] == ["partner_a.csv"]
    # A tick that crashed before saving its cursor asks again with the same run key,
    # which Dagster refuses to launch twice.
    again, _ = tick(None)
    assert again.run_requests[0].run_key == first.run_requests[0].run_key
    instance.add_dynamic_partitions(LANDING_PARTITIONS.name, ["partner_a.csv"])
    quiet, _ = tick(first.cursor)
    assert isinstance(quiet, dg.SkipReason)
    write_landing_file(table.slice(0, 5), landing, "partner_a", "csv")
    rewritten, _ = tick(first.cursor)
    assert len(rewritten.run_requests) == 1
    assert rewritten.run_requests[0].run_key != first.run_requests[0].run_key
    assert json.loads(rewritten.cursor).keys() == {"partner_a.csv"}

    result = dg.materialize(
        [raw_landed_activity, *_checks_for(raw_landed_activity)],
        resources=data_resources,
        partition_key="partner_a.csv",
        instance=instance,
    )
    assert result.success
    assert (
        result.asset_materializations_for_node("raw_landed_activity")[0].metadata["rows"].value == 5
    )


def test_holders_snapshot_loads_and_passes(data_resources):
    result = dg.materialize(
        [raw_account_holders, *_checks_for(raw_account_holders)], resources=data_resources
    )
    assert result.success
    evaluation = result.get_asset_check_evaluations()[0]
    assert evaluation.passed and evaluation.metadata["raw_rows"].value == 300


def test_a_ninety_day_backfill_runs_as_one_range(data_resources, keel_home):
    first, last = date(2026, 1, 1), date(2026, 1, 1) + timedelta(days=89)
    defs = dg.Definitions(
        assets=[raw_account_activity],
        asset_checks=_checks_for(raw_account_activity),
        jobs=[dg.define_asset_job("ingest", selection=[raw_account_activity])],
        resources=data_resources,
    )
    result = defs.resolve_job_def("ingest").execute_in_process(
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        }
    )
    assert result.success
    days = _rows(
        str(keel_home.warehouse),
        "select count(distinct _partition) from validation.partition_verdicts where passed",
    )
    assert days == [(90,)]


def test_batches_validated_in_parallel_match_one_at_a_time(keel_home, tmp_path, monkeypatch):
    import keel.validation as validation

    start = date(2026, 1, 1)
    config = GeneratorConfig(accounts=500, scenarios=(DriftScenario("malformed", start, 0.04),))
    days = [(start + timedelta(days=i)).isoformat() for i in range(4)]
    monkeypatch.setattr(validation, "BATCH_ROWS", 1)  # one partition per batch

    def quarantine_after_validation(threads: int) -> tuple[list, list]:
        monkeypatch.setattr(validation, "VALIDATION_THREADS", threads)
        with duckdb.connect(str(keel_home.warehouse)) as connection:
            for day in days:
                table = activity_table(config, date.fromisoformat(day))
                source = write_landing_file(table, tmp_path / day, "day", "parquet")
                load_partition(connection, ACCOUNT_ACTIVITY, day, source)
            verdicts = validation.validate_partitions(connection, ACCOUNT_ACTIVITY, days, 0.05)
            rows = connection.execute(
                """select _partition, _row_number, reason_code, reasons
                   from quarantine.account_activity order by all"""
            ).fetchall()
        return [(v.partition, v.quarantined_rows, v.reasons) for v in verdicts], rows

    serial = quarantine_after_validation(1)
    parallel = quarantine_after_validation(2)
    assert [v[0] for v in serial[0]] == days
    assert all(quarantined > 0 for _, quarantined, _ in serial[0])
    assert parallel == serial
