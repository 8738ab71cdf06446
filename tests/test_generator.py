import hashlib
from datetime import date, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest

from keel.generator import (
    LABEL_DELAY_DAYS,
    DriftScenario,
    GeneratorConfig,
    GeneratorConfigError,
    activity_table,
    age_band,
    build_accounts,
    generate_account_holders,
    generate_day,
    labels_table,
)

START = date(2026, 1, 1)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_and_scale_give_the_same_bytes(tmp_path):
    config = GeneratorConfig(seed=11, accounts=500, late_share=0.05)
    first = generate_day(config, START + timedelta(days=40), tmp_path / "a", tmp_path / "la")
    second = generate_day(config, START + timedelta(days=40), tmp_path / "b", tmp_path / "lb")
    assert _digest(first.activity) == _digest(second.activity)
    assert _digest(first.labels) == _digest(second.labels)
    assert _digest(first.landing) == _digest(second.landing)
    holders = [generate_account_holders(config, tmp_path / name) for name in ("a", "b")]
    assert _digest(holders[0]) == _digest(holders[1])


def test_another_seed_gives_other_data():
    day = START + timedelta(days=3)
    one = activity_table(GeneratorConfig(seed=1, accounts=300), day)
    two = activity_table(GeneratorConfig(seed=2, accounts=300), day)
    assert one.column("spend_amount") != two.column("spend_amount")


def test_a_day_does_not_depend_on_which_days_were_generated_before():
    config = GeneratorConfig(accounts=300)
    late_day = START + timedelta(days=75)
    alone = activity_table(config, late_day)
    for offset in range(3):
        activity_table(config, START + timedelta(days=offset))
    assert activity_table(config, late_day).equals(alone)


def test_labels_arrive_thirty_days_after_the_observation():
    config = GeneratorConfig(accounts=3_000)
    assert labels_table(config, START + timedelta(days=LABEL_DELAY_DAYS - 1)).num_rows == 0
    arrival = START + timedelta(days=45)
    labels = labels_table(config, arrival).to_pandas()
    assert len(labels) == 100  # one statement cycle in thirty accounts
    delays = labels["label_date"] - labels["observation_date"]
    assert (delays == timedelta(days=LABEL_DELAY_DAYS)).all()
    assert 0.02 < labels["defaulted"].mean() < 0.25
    quick = GeneratorConfig(accounts=3_000, label_delay_days=2)
    quick_labels = labels_table(quick, START + timedelta(days=45)).to_pandas()
    assert (quick_labels["observation_date"] == START + timedelta(days=43)).all()


def test_outcomes_differ_between_protected_groups():
    config = GeneratorConfig(accounts=30_000)
    accounts = build_accounts(config)
    frames = [labels_table(config, START + timedelta(days=d), accounts) for d in range(40, 70)]
    outcomes = np.concatenate([f.column("defaulted").to_numpy() for f in frames])
    ids = np.concatenate([f.column("account_id").to_numpy() for f in frames]) - 1
    by_sex = {s: outcomes[accounts.sex[ids] == s].mean() for s in ("F", "M")}
    assert by_sex["M"] > by_sex["F"] + 0.005
    bands = age_band(accounts.age[ids])
    assert outcomes[bands == "18-25"].mean() > outcomes[bands == "36-50"].mean()


def test_covariate_shift_starts_on_its_day():
    drift_day = START + timedelta(days=20)
    config = GeneratorConfig(
        accounts=2_000, scenarios=(DriftScenario("covariate", drift_day, 0.8),)
    )
    plain = GeneratorConfig(accounts=2_000)
    before = START + timedelta(days=19)
    assert activity_table(config, before).equals(activity_table(plain, before))
    drifted = activity_table(config, drift_day).column("spend_amount").to_numpy().mean()
    baseline = activity_table(plain, drift_day).column("spend_amount").to_numpy().mean()
    assert drifted > 1.5 * baseline


def test_label_and_concept_drift_change_the_outcome():
    arrival = START + timedelta(days=70)
    observed = arrival - timedelta(days=LABEL_DELAY_DAYS)
    plain = labels_table(GeneratorConfig(accounts=30_000), arrival)
    shifted = labels_table(
        GeneratorConfig(accounts=30_000, scenarios=(DriftScenario("label", observed, 1.0),)),
        arrival,
    )
    concept = labels_table(
        GeneratorConfig(accounts=30_000, scenarios=(DriftScenario("concept", observed, 1.0),)),
        arrival,
    )
    base_rate = plain.column("defaulted").to_numpy().mean()
    assert shifted.column("defaulted").to_numpy().mean() > 1.5 * base_rate
    assert concept.column("defaulted") != plain.column("defaulted")


def test_malformed_rows_hold_every_kind_of_damage():
    config = GeneratorConfig(accounts=1_000, scenarios=(DriftScenario("malformed", START, 0.1),))
    frame = activity_table(config, START).to_pandas()
    assert len(frame) == 1_000 + 20  # 20 duplicated rows appended
    assert frame["account_id"].isna().sum() == 20
    assert (frame["payment_amount"] == "n/a").sum() == 20
    assert (frame["spend_amount"] == "-250.0").sum() == 20
    assert (frame["channel"] == "crypto").sum() == 20
    assert frame.duplicated(subset=["account_id", "activity_date"]).sum() >= 20


def test_schema_change_renames_a_column_and_adds_another():
    config = GeneratorConfig(accounts=100, scenarios=(DriftScenario("schema", START, 1.0),))
    columns = activity_table(config, START).column_names
    assert "spend_amount" not in columns
    assert {"spend_amt", "currency"} <= set(columns)


def test_late_rows_go_to_the_landing_folder(tmp_path):
    config = GeneratorConfig(accounts=2_000, late_share=0.05)
    day = generate_day(config, START, tmp_path / "generated", tmp_path / "landing")
    on_time, late = pq.read_table(day.activity), day.landing
    assert late is not None and late.parent == tmp_path / "landing"
    assert 1_850 < on_time.num_rows < 1_950


@pytest.mark.parametrize(
    "bad",
    [
        {"accounts": 0},
        {"late_share": 1.0},
    ],
)
def test_impossible_settings_are_refused(bad):
    with pytest.raises(GeneratorConfigError):
        GeneratorConfig(**bad)


def test_unknown_drift_kind_and_days_before_the_start_are_refused():
    with pytest.raises(GeneratorConfigError, match="unknown drift kind"):
        DriftScenario("seasonal", START)
    with pytest.raises(GeneratorConfigError, match="before the generator's first day"):
        activity_table(GeneratorConfig(accounts=10), START - timedelta(days=1))
