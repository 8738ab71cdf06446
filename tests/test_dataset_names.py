"""Pipeline code names no dataset: every name a dataset goes by lives in its own folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from keel.datasets.spec import (
    DATASETS_DIR,
    SPEC_FILE,
    DatasetSpec,
    SpecError,
    all_datasets,
    discover,
    load_spec,
    loop_dataset,
)
from keel.settings import DBT_PROJECT_DIR
from tests.conftest import REPO_ROOT

GENERIC_CODE = ("keel", "orchestration")


def identifying_names(spec: DatasetSpec) -> set[str]:
    """The names that say which dataset a line of code is about."""
    names = {
        spec.name,
        spec.feature_service,
        spec.registered_model,
        spec.experiment,
        spec.feature_view,
        *spec.dbt_models,
    }
    if spec.on_demand_view:
        names.add(spec.on_demand_view)
    # Its raw tables, and the raw assets that load them.
    tables = {spec.raw_table, *spec.raw_tables}
    return names | tables | {f"raw_{table}" for table in tables}


def test_every_shipped_dataset_names_itself_and_the_loop_has_one():
    specs = all_datasets(DATASETS_DIR)
    assert len(specs) >= 2, [spec.name for spec in specs]
    for spec in specs:
        # The dbt models, found in the folder's dbt/ (subfolders too), include the marts.
        assert {spec.features_model, spec.labels_model} <= set(spec.dbt_models), spec.name
    loop = loop_dataset()
    assert [spec.name for spec in specs if spec.loop == "daily"] == [loop.name]


def test_no_dataset_is_named_in_keel_or_orchestration():
    names = set().union(*(identifying_names(spec) for spec in all_datasets(DATASETS_DIR)))
    # Whole names only: ``x_credit_default`` is not ``credit_default``.
    pattern = re.compile(
        r"(?<![\w-])("
        + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        + r")(?![\w-])"
    )
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {match.group(1)}"
        for folder in GENERIC_CODE
        for path in sorted((REPO_ROOT / folder).rglob("*"))
        if path.is_file() and path.suffix in (".py", ".yaml", ".yml", ".sql", ".toml", ".md")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in pattern.finditer(line)
    ]
    assert not found, "\n".join(found)


def loop_copy(root: Path, name: str, edit=lambda data: None) -> Path:
    """The loop dataset's spec (not its dbt models or code) in ``root/name``, edited."""
    data = yaml.safe_load((loop_dataset().folder / SPEC_FILE).read_text())
    data["name"] = name
    edit(data)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def test_one_loop_dataset_per_folder_and_a_moved_folder_without_one_keeps_the_shipped(
    tmp_path, monkeypatch
):
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("KEEL_DATASETS_DIR", os.path.relpath(root, DBT_PROJECT_DIR))
    assert loop_dataset().folder == DATASETS_DIR / loop_dataset().folder.name
    loop_copy(root, "book_a")
    assert loop_dataset().name == "book_a"
    assert [spec.name for spec in discover()] == []
    loop_copy(root, "book_b")
    with pytest.raises(SpecError, match="book_a, book_b each say loop: daily"):
        loop_dataset()


def first_rule(data, table):
    """The first rule of a raw table, copied so that an edit leaves the tables it shares with."""
    declared = data["raw_tables"][table]
    declared["rules"] = [dict(rule) for rule in declared["rules"]]
    return declared["rules"][0]


def edit_ratio(data, **changes):
    data["features"]["on_demand"]["ratios"][0].update(changes)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: edit_ratio(d, numerator="nowhere"), r"on_demand\.\w+: nowhere is not a numeric"),
        (lambda d: edit_ratio(d, divisor=0), r"ratios\[0\]\.divisor: must not be 0"),
        (lambda d: edit_ratio(d, scale=2), r"ratios\[0\]: unknown keys scale"),
        (lambda d: d["features"]["on_demand"].pop("view"), r"on_demand\.view: is required"),
        (lambda d: d["model"].update(experiment="Risk Model"), r"model\.experiment: 'Risk Model'"),
        (lambda d: d.update(first_day="2026-02-30"), r"first_day: '2026-02-30' is not an ISO"),
        (lambda d: d.pop("first_day"), r"first_day: is required for daily partitions"),
        (lambda d: d.update(loop="hourly"), r"\.loop: 'hourly' is not one of daily"),
        (lambda d: d["marts"]["paths"].update(scores="x"), r"marts\.paths: \['scores'\] are not"),
        (
            lambda d: first_rule(d, "landed_activity").update(check="between"),
            r"raw_tables\.landed_activity\.rules\[0\]: a between rule needs min or max",
        ),
        (
            lambda d: first_rule(d, "default_labels").update(reason="typo"),
            r"raw_tables\.default_labels\.rules\[0\]\.reason: 'typo' is not one of",
        ),
        (
            lambda d: first_rule(d, "account_holders").update(column="nowhere"),
            r"raw_tables\.account_holders\.rules\[0\]\.column: 'nowhere' is not a declared",
        ),
        (
            lambda d: first_rule(d, "account_holders").update(check="in_set", column="age"),
            r"account_holders\.rules\[0\]\.values: 'age' has no vocabulary",
        ),
        (
            lambda d: d["raw_tables"]["default_labels"].update(partition_column="label_day"),
            r"raw_tables\.default_labels: 'label_day' \(key or partition column\) is not",
        ),
        (
            lambda d: d["raw_tables"]["account_holders"]["columns"].update(age="int"),
            r"account_holders\.columns\.age: 'int' is not one of",
        ),
        (
            lambda d: d["raw_tables"]["account_holders"].update(role="labels"),
            r"raw_tables: role labels is given to more than one table",
        ),
        (lambda d: d["raw_tables"].pop("account_holders"), r"needs a table for entities"),
    ],
)
def test_a_bad_loop_spec_is_refused_naming_the_key(tmp_path, edit, message):
    with pytest.raises(SpecError, match=message):
        load_spec(loop_copy(tmp_path, "book", edit))


def test_the_on_demand_ratios_are_the_declared_formulas():
    """The feature store's ratios follow dataset.yaml: numerator / max(den * mul / div, floor)."""
    from keel.features import account_ratios

    declared = yaml.safe_load((loop_dataset().folder / SPEC_FILE).read_text())
    ratios = declared["features"]["on_demand"]["ratios"]
    rng = np.random.default_rng(5)
    columns = {
        name: rng.normal(40.0, 60.0, 500)
        for ratio in ratios
        for name in (ratio["numerator"], ratio["denominator"])
    }
    computed = account_ratios(columns)
    assert list(computed) == [ratio["name"] for ratio in ratios]
    for ratio in ratios:
        scaled = (
            columns[ratio["denominator"]] * ratio.get("multiplier", 1) / ratio.get("divisor", 1)
        )
        expected = columns[ratio["numerator"]] / np.maximum(scaled, 1.0)
        np.testing.assert_array_equal(computed[ratio["name"]], expected)


def test_the_loop_tables_keep_the_rules_their_dataset_yaml_declares(
    tmp_path, keel_home, monkeypatch
):
    """A rule edited in dataset.yaml changes which rows are quarantined, and under what reason."""
    import duckdb

    from keel.ingestion import ACCOUNT_HOLDERS, load_partition
    from keel.validation import validate_partition

    assert ACCOUNT_HOLDERS.name in loop_dataset().raw_tables
    source = tmp_path / "holders.csv"
    rows = [
        "1,2025-01-01,30,F,north,classic,5000",
        "2,2025-01-01,70,M,south,gold,5000",
        "3,2025-01-01,70,X,south,gold,5000",
        # Past 32 bits: a wrong type (and so no value), not merely out of range.
        "4,2025-01-01,4000000000,M,east,gold,5000",
        "4,2025-01-01,40,M,east,platinum,5000",
    ]
    source.write_text("\n".join([",".join(ACCOUNT_HOLDERS.columns), *rows]) + "\n")

    def quarantined() -> list[tuple]:
        with duckdb.connect(str(keel_home.warehouse)) as connection:
            load_partition(connection, ACCOUNT_HOLDERS, "snapshot", source)
            verdict = validate_partition(connection, ACCOUNT_HOLDERS, "snapshot", 1.0)
            found = connection.execute(
                f"""select account_id, reason_code, reasons from {ACCOUNT_HOLDERS.quarantine}
                    order by _row_number"""
            ).fetchall()
        assert verdict.quarantined_rows == len(found)
        return found

    assert quarantined() == [
        ("3", "unknown_category", "unknown_category"),
        ("4", "wrong_type", "wrong_type,missing_value"),
        ("4", "duplicate", "duplicate"),
    ]

    def older_than_65(data):
        for rule in data["raw_tables"][ACCOUNT_HOLDERS.name]["rules"]:
            if rule["check"] == "between" and rule["column"] == "age":
                rule["max"] = 65

    root = tmp_path / "datasets"
    loop_copy(root, "book", older_than_65)
    monkeypatch.setenv("KEEL_DATASETS_DIR", os.path.relpath(root, DBT_PROJECT_DIR))
    assert quarantined() == [
        ("2", "out_of_range", "out_of_range"),
        ("3", "out_of_range", "out_of_range,unknown_category"),
        ("4", "wrong_type", "wrong_type,missing_value"),
        ("4", "duplicate", "duplicate"),
    ]
