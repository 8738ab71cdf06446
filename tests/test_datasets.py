"""Datasets as configuration: the spec loader, its errors, and code that names no dataset."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from keel.datasets.spec import DATASETS_DIR, SpecError, discover, load_spec
from tests.conftest import REPO_ROOT

TAIWAN_DIR = DATASETS_DIR / "taiwan_credit"


def spec_copy(tmp_path: Path, edit) -> Path:
    """A copy of the Taiwan spec (without its data) in a folder of the same name, edited."""
    folder = tmp_path / "taiwan_credit"
    folder.mkdir()
    data = yaml.safe_load((TAIWAN_DIR / "dataset.yaml").read_text())
    edit(data)
    (folder / "dataset.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def test_the_shipped_datasets_load_with_their_checked_source():
    specs = {spec.name: spec for spec in discover()}
    taiwan = specs["taiwan_credit"]
    assert taiwan.source_file().stat().st_size > 2_000_000
    assert taiwan.label.timing == "retrospective" and taiwan.label.outcome_window_days == 31
    assert set(taiwan.protected_attributes) == {"sex", "age_band", "marriage", "education"}
    assert not set(taiwan.features) & set(taiwan.protected_attributes)
    assert taiwan.gate_policy().min_roc_auc == 0.70


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["label"].update(timing="eventually"), r"label\.timing: 'eventually' is not"),
        (lambda d: d["label"].pop("outcome_window_days"), r"outcome_window_days: a positive"),
        (lambda d: d.update(colour="blue"), r"unknown keys colour"),
        (lambda d: d["features"]["numeric"].append("default_payment"), r"is the label or leak"),
        (lambda d: d["features"]["numeric"].append("sex"), r"sex is protected"),
        (lambda d: d["gates"].update(min_auc=0.9), r"gates\.min_auc: is not a gate bound"),
        (lambda d: d["gates"].update(fixed_threshold=2.0), r"fixed_threshold must lie in"),
        (lambda d: d["columns"].update(age="years"), r"columns\.age: 'years' is not one of"),
        (
            lambda d: d["rules"].append({"column": "nope", "check": "not_null", "reason": "x"}),
            r"rules\[\d+\]\.column: 'nope' is not a declared column",
        ),
        (lambda d: d["features"]["monotone"].update(limit_bal=2), r"must be 1 or -1"),
        (lambda d: d["marts"].update(labels="fct_other"), r"'fct_other' is not one of marts"),
        (lambda d: d.update(name="other"), r"must match the folder name"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_file_and_key(tmp_path, edit, message):
    folder = spec_copy(tmp_path, edit)
    with pytest.raises(SpecError, match=message) as error:
        load_spec(folder)
    assert str(folder / "dataset.yaml") in str(error.value)


def test_a_source_file_with_another_checksum_is_refused_and_loads_nothing(tmp_path):
    from keel.ingestion import load_dataset_file

    folder = spec_copy(tmp_path, lambda d: None)
    (folder / "data").mkdir()
    csv = folder / "data" / "credit-card-clients.csv"
    shutil.copyfile(TAIWAN_DIR / "data" / "credit-card-clients.csv", csv)
    with csv.open("a") as handle:
        handle.write("20000,2,2,1,24,2,2,-1,-1,-2,-2,3913,3102,689,0,0,0,0,689,0,0,0,0,1\n")
    spec = load_spec(folder)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as connection:
        with pytest.raises(SpecError, match=r"has sha256 .* the spec records"):
            load_dataset_file(connection, spec)
        # Refused before anything is written: no raw table was created, let alone filled.
        tables = connection.execute(
            "select count(*) from information_schema.tables where table_schema = 'raw'"
        ).fetchone()[0]
    assert tables == 0


def test_the_core_names_no_dataset():
    """Pipeline code is generic: a dataset's names live in its folder and its dbt models."""
    names = set()
    for spec in discover():
        names |= {spec.name, spec.raw_table, spec.feature_service, spec.registered_model}
        names |= set(spec.dbt_models)
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names)))
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for folder in ("keel", "orchestration")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
