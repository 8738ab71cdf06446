"""Memory bounds: the training set's labels, the evaluation's windows, the landing cursor."""

import json
import os
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from keel import schema
from keel.features import read_label_window
from keel.training import time_split
from keel.training.data import read_held_out_windows

FIRST_DAY = pd.Timestamp("2025-06-01", tz="UTC")


def _training_frame(days: int, accounts: int, seed: int = 5) -> pd.DataFrame:
    """Training-set rows as the feature store writes them: one per account and day."""
    rng = np.random.default_rng(seed)
    rows = days * accounts
    events = FIRST_DAY + pd.to_timedelta(np.repeat(np.arange(days), accounts), unit="D")
    frame = pd.DataFrame(
        {
            schema.ENTITY_KEY: np.tile(np.arange(accounts), days),
            schema.EVENT_TIMESTAMP: events,
            schema.LABEL_TIMESTAMP: events + pd.Timedelta(days=30),
            schema.LABEL: rng.integers(0, 2, rows),
        }
    )
    for name in schema.NUMERIC_FEATURES:
        frame[name] = rng.normal(size=rows)
    frame["product"] = rng.choice(list(schema.PRODUCTS), rows)
    frame["main_channel_30d"] = rng.choice(list(schema.CHANNELS), rows)
    return frame


def test_evaluation_reads_only_its_two_windows(tmp_path: Path):
    frame = _training_frame(days=120, accounts=40)
    path = tmp_path / "training_set.parquet"
    frame.to_parquet(path, row_group_size=40 * 5)  # five days a row group, as written daily
    validation, test = read_held_out_windows(path, validation_days=7, test_days=7)
    expected = time_split(frame, 7, 7)
    pd.testing.assert_frame_equal(validation, expected.validation)
    pd.testing.assert_frame_equal(test, expected.test)

    # Rows before the windows are never loaded: unreadable labels there change nothing.
    poisoned = frame.copy()
    old = poisoned[schema.EVENT_TIMESTAMP] < FIRST_DAY + pd.Timedelta(days=100)
    poisoned.loc[old, schema.LABEL] = 7
    poisoned.to_parquet(path, row_group_size=40 * 5)
    windowed = read_held_out_windows(path, validation_days=7, test_days=7)
    assert sum(len(part) for part in windowed) == 14 * 40
    from assets.evaluation import _held_out_windows

    assert sum(len(part) for part in _held_out_windows(str(path), 7, 7)) == 14 * 40


def test_a_training_set_reads_labels_of_its_lookback_only(tmp_path: Path):
    marts = tmp_path / schema.LABELS_MART
    marts.mkdir()
    days = 400
    for offset in range(0, days, 10):  # a labels mart of daily files, ten days each here
        stamps = FIRST_DAY + pd.to_timedelta(np.repeat(np.arange(offset, offset + 10), 3), unit="D")
        table = pa.table(
            {
                schema.ENTITY_KEY: np.tile(np.arange(3), 10),
                schema.EVENT_TIMESTAMP: pa.array(stamps, pa.timestamp("us", tz="UTC")),
                schema.LABEL: np.ones(30, dtype="int64"),
            }
        )
        pq.write_table(table, marts / f"{(FIRST_DAY + timedelta(days=offset)).date()}.parquet")
    labels = read_label_window(marts, lookback_days=90)
    newest = FIRST_DAY + pd.Timedelta(days=days - 1)
    events = labels.column(schema.EVENT_TIMESTAMP).to_pandas()
    assert labels.num_rows == 90 * 3
    assert events.min() == newest - pd.Timedelta(days=89) and events.max() == newest
    assert read_label_window(marts, lookback_days=10_000).num_rows == days * 3


def test_the_landing_cursor_holds_only_the_files_in_the_folder(tmp_path: Path):
    from orchestration.resources import SourcesResource
    from orchestration.sensors import landing_file_sensor

    landing = tmp_path / "landing"
    landing.mkdir()
    sources = SourcesResource(
        generated_dir=str(tmp_path / "generated"),
        landing_dir=str(landing),
    )
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"sources": sources}
        )
        return landing_file_sensor(context)

    cursor, keys = None, {}
    for day in range(10):  # daily files, each archived after the next one lands
        name = f"{date(2026, 3, 1) + timedelta(days=day)}.csv"
        (landing / name).write_text("account_id\n1\n")
        result = tick(cursor)
        assert [request.partition_key for request in result.run_requests] == [name]
        keys[name] = result.run_requests[0].run_key
        cursor = result.cursor
        for older in sorted(landing.iterdir())[:-1]:
            os.replace(older, tmp_path / older.name)
    # The cursor names the files of the last tick, not the ten seen.
    assert json.loads(cursor).keys() == {"2026-03-09.csv", "2026-03-10.csv"}
    # An archived file put back unchanged asks with the run key it had: Dagster skips it.
    os.replace(tmp_path / "2026-03-02.csv", landing / "2026-03-02.csv")
    again = tick(cursor)
    assert [request.run_key for request in again.run_requests] == [keys["2026-03-02.csv"]]
    os.replace(landing / "2026-03-02.csv", tmp_path / "2026-03-02.csv")
    emptied = tick(again.cursor)
    assert json.loads(emptied.cursor).keys() == {"2026-03-10.csv"}
    quiet = tick(emptied.cursor)
    assert isinstance(quiet, dg.SkipReason)
