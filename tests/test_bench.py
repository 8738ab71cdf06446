"""Benchmarks fail loudly when the compared sides disagree."""

import pyarrow as pa
import pyarrow.feather as feather
import pytest

from bench.common import require_same_answers
from bench.pit_join import _same_rows


def test_a_disagreement_exits_non_zero_and_agreement_does_not(capsys):
    require_same_answers("demo", {"same_rows": True, "same_verdicts": True})
    with pytest.raises(SystemExit) as stopped:
        require_same_answers("demo", {"same_rows": True, "same_verdicts": False})
    assert stopped.value.code == 1
    assert "same_verdicts" in capsys.readouterr().err


def test_pit_join_rows_differing_in_one_value_are_not_the_same(tmp_path):
    table = pa.table(
        {
            "account_id": [2, 1, 3],
            "event_timestamp": pa.array([1, 2, 3], pa.timestamp("us", tz="UTC")),
            "spend_7d": [1.5, None, 3.0],
        }
    )
    shuffled = table.take([2, 0, 1])
    changed = table.set_column(2, "spend_7d", pa.array([1.5, None, 3.000001]))
    paths = {}
    for name, data in {"table": table, "shuffled": shuffled, "changed": changed}.items():
        paths[name] = str(tmp_path / f"{name}.arrow")
        feather.write_feather(data, paths[name])

    assert _same_rows(paths["table"], paths["shuffled"])  # row order and nulls do not matter
    assert not _same_rows(paths["table"], paths["changed"])


def _write_marts(root, features, labels, baseline: bool) -> None:
    """Marts in the pipeline's layout (a file per day) or the baseline's (hive folders)."""
    from keel import schema

    for frame, name, day_column in (
        (features, "features" if baseline else schema.FEATURES_MART, "feature_date"),
        (labels, "labels" if baseline else schema.LABELS_MART, "label_date"),
    ):
        for day, rows in frame.groupby(day_column):
            folder = root / name / (f"{day_column}={day}" if baseline else "")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / ("data_0.parquet" if baseline else f"{day}.parquet")
            rows.drop(columns=day_column).to_parquet(target, index=False)


def test_ingest_mart_comparison_finds_missing_rows_and_changed_values(tmp_path):
    import numpy as np
    import pandas as pd

    from bench.ingest import compare_marts
    from keel import schema

    rng = np.random.default_rng(0)
    days = ["2026-01-01", "2026-01-02"]
    features = pd.DataFrame(
        {
            schema.ENTITY_KEY: np.tile(np.arange(5), 2),
            "feature_date": np.repeat(days, 5),
            "event_timestamp": pd.to_datetime(np.repeat(["2026-01-02", "2026-01-03"], 5), utc=True),
            **{name: rng.random(10) for name in schema.DAILY_NUMERIC_FEATURES},
            "product": "classic",
            "main_channel_30d": "online",
        }
    )
    labels = pd.DataFrame(
        {
            schema.ENTITY_KEY: [1, 2],
            "label_date": days,
            "event_timestamp": pd.to_datetime(["2025-12-02", "2025-12-03"], utc=True),
            schema.LABEL_TIMESTAMP: pd.to_datetime(days, utc=True),
            schema.LABEL: [0, 1],
            "age_band": "26-35",
            "sex": "F",
            "region": "north",
        }
    )
    _write_marts(tmp_path / "pipeline", features, labels, baseline=False)
    # Without a time zone: the baseline's timestamps are UTC instants all the same.
    naive = features.assign(event_timestamp=features["event_timestamp"].dt.tz_localize(None))
    _write_marts(tmp_path / "same", naive, labels, baseline=True)
    same = compare_marts(tmp_path / "pipeline", tmp_path / "same")
    assert same["features"] == {
        "rows": 10,
        "only_pipeline": 0,
        "only_baseline": 0,
        "different_values": 0,
    }
    assert same["labels"]["rows"] == 2 and same["labels"]["different_values"] == 0

    changed = features.drop(index=3).copy()
    changed.loc[0, "spend_30d"] += 1e-6
    changed.loc[1, "spend_7d"] += 1e-13  # summation order, within the tolerance
    changed.loc[5, "product"] = "gold"
    _write_marts(tmp_path / "changed", changed, labels.assign(sex=["F", "M"]), baseline=True)
    different = compare_marts(tmp_path / "pipeline", tmp_path / "changed")
    assert different["features"] == {
        "rows": 10,
        "only_pipeline": 1,
        "only_baseline": 0,
        "different_values": 2,
    }
    assert different["labels"]["different_values"] == 1
