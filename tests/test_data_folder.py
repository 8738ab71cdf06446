"""One generated world per data folder: every entry point continues the folder's settings."""

import json
from datetime import date, timedelta

import dagster as dg
import duckdb
import pytest

from assets.ingestion import raw_default_labels
from keel.generator import (
    SETTINGS_FILE,
    GeneratorConfig,
    GeneratorConfigError,
    generate_account_holders,
)
from orchestration.profiles import resources_for
from orchestration.resources import SourcesResource
from orchestration.scenario import Scenario


def _load_labels(sources: SourcesResource, warehouse, days: list[date]) -> None:
    for day in days:
        result = dg.materialize(
            [raw_default_labels],
            resources={"sources": sources, "warehouse": warehouse},
            partition_key=day.isoformat(),
        )
        assert result.success


def test_the_ui_continues_the_demo_world_and_other_settings_are_refused(keel_home):
    profile = resources_for("local")
    ui_sources, warehouse = profile["sources"], profile["warehouse"]
    new_world = ui_sources.generator_config()
    assert (new_world.accounts, new_world.label_delay_days, new_world.late_share) == (
        2_000,
        30,
        0.02,
    )
    # The demo's world (next-day labels, no late rows), smaller.
    demo = Scenario(accounts=300, history_days=2, days=1, drift_day=None)
    demo_sources = demo.sources(ui_sources)
    first = date(2026, 2, 10)
    _load_labels(demo_sources, warehouse, [first, first + timedelta(days=1)])
    recorded = json.loads((keel_home.generated / SETTINGS_FILE).read_text())
    assert (recorded["accounts"], recorded["label_delay_days"]) == (300, 1)

    # A UI backfill or the daily schedule: the profile's sources, with nothing set.
    assert ui_sources.generator_config() == demo_sources.generator_config()
    # Thirty days on: with the old 30-day default this day's labels would repeat Feb 10's.
    _load_labels(ui_sources, warehouse, [first + timedelta(days=30)])

    other = SourcesResource(
        **{**ui_sources.model_dump(), "accounts": 2_000, "label_delay_days": 30}
    )
    with pytest.raises(GeneratorConfigError) as refused:
        other.generator_config()
    message = str(refused.value)
    assert "accounts: folder 300, requested 2000" in message
    assert "label_delay_days: folder 1, requested 30" in message
    assert str(keel_home.generated / SETTINGS_FILE) in message
    failed = dg.materialize(
        [raw_default_labels],
        resources={"sources": other, "warehouse": warehouse},
        partition_key=(first + timedelta(days=31)).isoformat(),
        raise_on_error=False,
    )
    assert not failed.success

    with duckdb.connect(str(keel_home.warehouse), read_only=True) as connection:
        labels, duplicates = connection.execute(
            """select count(*), count(*) - count(distinct (account_id, observation_date))
               from raw.default_labels"""
        ).fetchone()
        partitions = connection.execute(
            "select distinct _partition from raw.default_labels order by 1"
        ).fetchall()
    assert labels == 30 and duplicates == 0
    assert [p for (p,) in partitions] == ["2026-02-10", "2026-02-11", "2026-03-12"]


def test_a_folder_generated_before_settings_were_recorded_is_not_continued(tmp_path):
    folder = tmp_path / "generated"
    older = GeneratorConfig(accounts=500, label_delay_days=1)
    (folder / older.fingerprint()).mkdir(parents=True)
    with pytest.raises(GeneratorConfigError, match="unrecorded generator settings"):
        generate_account_holders(GeneratorConfig(accounts=100), folder)
    assert not (folder / SETTINGS_FILE).exists()
    # The same settings as the extracts continue, and are recorded from then on.
    generate_account_holders(older, folder)
    assert json.loads((folder / SETTINGS_FILE).read_text())["accounts"] == 500
