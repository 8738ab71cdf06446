"""Datasets as configuration: the spec loader, its errors, and code that names no dataset."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml

from keel.datasets.spec import DATASETS_DIR, SpecError, discover, load_spec, loop_dataset
from keel.settings import DBT_PROJECT_DIR
from tests.conftest import REPO_ROOT

TAIWAN_DIR = DATASETS_DIR / "taiwan_credit"


def relative_to_dbt(folder: Path) -> str:
    """A datasets folder as KEEL_DATASETS_DIR takes it: relative to the dbt project."""
    return os.path.relpath(folder, DBT_PROJECT_DIR)


def spec_copy(tmp_path: Path, edit) -> Path:
    """A copy of the Taiwan spec and dbt models (not its data) in a like-named folder, edited."""
    folder = tmp_path / "taiwan_credit"
    folder.mkdir()
    shutil.copytree(TAIWAN_DIR / "dbt", folder / "dbt")
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
        (lambda d: d.update(schedule="daily"), r"schedule: 'daily' is not a five-field cron"),
        (
            lambda d: d["model"].update(families=["lightgbm", "xgboost"]),
            r"model\.families: \['lightgbm', 'xgboost'\] must list some of lightgbm, torch",
        ),
        (lambda d: d["model"].update(families=["torch", "torch"]), r"torch, each once"),
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


def taiwan_rows(rows: int = 4_000, seed: int = 3) -> pd.DataFrame:
    """Training rows shaped as the Taiwan training set: labelled a month after observation."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "client_id": np.arange(1, rows + 1),
            "event_timestamp": pd.Timestamp("2005-10-31", tz="UTC"),
            "observation_date": pd.Timestamp("2005-09-30", tz="UTC"),
            "defaulted": (rng.random(rows) < 0.22).astype("int64"),
            "limit_bal": rng.normal(167_000, 30_000, rows),
            "utilisation": rng.uniform(0.1, 0.7, rows),
        }
    )


def test_leakage_guard_fails_a_leakage_column_and_a_feature_stamped_after_observation():
    from keel.datasets.guards import leakage_failures

    spec = load_spec(TAIWAN_DIR)
    rows = taiwan_rows(100)
    months = pd.to_datetime(["2005-08-31", "2005-09-30"], utc=True)
    stamps = pd.DataFrame(
        {"client_id": np.repeat(rows["client_id"], 2), "event_timestamp": np.tile(months, 100)}
    )
    assert leakage_failures(spec, rows, ["limit_bal", "utilisation"], stamps) == []
    assert "default_payment" in leakage_failures(spec, rows, ["limit_bal", "default_payment"])[0]
    # An October statement of client 7: the join as of 2005-10-31 would read it, a month after
    # the outcome window opened.
    late = pd.concat(
        [
            stamps,
            pd.DataFrame(
                {"client_id": [7], "event_timestamp": [pd.Timestamp("2005-10-15", tz="UTC")]}
            ),
        ]
    )
    failures = leakage_failures(spec, rows, ["limit_bal"], late)
    assert len(failures) == 1 and "1 of 100 rows" in failures[0] and "client_id=7" in failures[0]


def test_incomplete_outcome_windows_are_left_out_not_counted_as_negatives():
    from keel.datasets.guards import complete_outcomes

    spec = load_spec(TAIWAN_DIR)
    rows = taiwan_rows(300)
    # Observed weekly: the last rows' 31-day windows are still open on 2005-10-31.
    rows["observation_date"] = pd.Timestamp("2005-08-01", tz="UTC") + pd.to_timedelta(
        np.arange(300) // 30 * 7, unit="D"
    )
    now = pd.Timestamp("2005-10-31", tz="UTC")
    kept = complete_outcomes(spec, rows, now)
    closed = rows["observation_date"] + pd.Timedelta(days=31) <= now
    assert 0 < len(kept) == closed.sum() < len(rows)
    assert kept["defaulted"].sum() == rows.loc[closed, "defaulted"].sum()
    # Stream labels: only those that have arrived.
    stream = dataclasses.replace(
        spec, label=dataclasses.replace(spec.label, timing="stream", known_at="label_timestamp")
    )
    rows["label_timestamp"] = rows["observation_date"] + pd.Timedelta(days=30)
    assert len(complete_outcomes(stream, rows, now)) == (rows["label_timestamp"] <= now).sum()


def test_a_source_that_silently_keeps_only_defaulters_fails_its_period():
    from keel.datasets.guards import composition_failures

    spec = load_spec(TAIWAN_DIR)
    monthly = dataclasses.replace(
        spec,
        dataset_checks=dataclasses.replace(
            spec.dataset_checks, period="month", period_column="observation_date"
        ),
    )
    rows = pd.concat([taiwan_rows(2_000, seed=1), taiwan_rows(2_000, seed=2)], ignore_index=True)
    rows.loc[2_000:, "observation_date"] = pd.Timestamp("2005-10-31", tz="UTC")
    assert composition_failures(monthly, rows).passed
    # From October on the source keeps only defaulters (same row count, same features).
    rows.loc[2_000:, "defaulted"] = 1
    result = composition_failures(monthly, rows)
    assert result.failures == ["2005-10: label rate 1.000 outside [0.15, 0.3]"]
    assert [p["period"] for p in result.periods] == ["2005-09", "2005-10"]


def write_screening_file(path: Path, rows: int = 3_000, seed: int = 11) -> pd.DataFrame:
    """Loan applications as a lender might export them: screened over two years, repaid or not."""
    rng = np.random.default_rng(seed)
    debt_ratio = rng.beta(2, 5, rows)
    gender = rng.choice(["F", "M"], rows)
    income = rng.lognormal(10.5, 0.4, rows)
    risk = -3.0 + 8.0 * debt_ratio - 0.8 * (np.log(income) - 10.5) / 0.4 + 0.2 * (gender == "M")
    frame = pd.DataFrame(
        {
            "Applicant ID": np.arange(10_001, 10_001 + rows),
            "screening_date": pd.Timestamp("2024-01-01")
            + pd.to_timedelta(rng.integers(0, 730, rows), unit="D"),
            "Income": income.round(2),
            "debt_ratio": debt_ratio.round(4),
            "years_employed": rng.integers(0, 30, rows),
            "region": rng.choice(["north", "south", "east", "west"], rows),
            "gender": gender,
            "defaulted": (rng.random(rows) < 1 / (1 + np.exp(-risk))).astype(int),
        }
    )
    frame.to_csv(path, index=False)
    return frame


def test_dataset_new_scaffolds_a_folder_that_loads_with_its_choices_to_confirm(
    tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from keel.cli import cli

    monkeypatch.setenv("KEEL_DATASETS_DIR", relative_to_dbt(tmp_path / "datasets"))
    source = tmp_path / "applications.csv"
    write_screening_file(source)
    result = CliRunner().invoke(cli, ["dataset", "new", "loans", "--from", str(source)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "datasets" / "loans"
    spec = load_spec(folder)
    assert spec.entity_key == "applicant_id"
    assert spec.source.rename == {"Applicant ID": "applicant_id", "Income": "income"}
    assert spec.columns["screening_date"] == "date" and spec.columns["income"] == "number"
    assert spec.label.column == "defaulted" and spec.label.timing == "retrospective"
    assert spec.protected_attributes == ("gender",)
    assert set(spec.numeric_features) == {"income", "debt_ratio", "years_employed"}
    assert spec.categorical_features == {"region": ("east", "north", "south", "west")}
    readme = (folder / "README.md").read_text()
    for choice in ("Entity key: `applicant_id`", "Label: `defaulted`", "`gender`", "Leakage"):
        assert choice in readme
    assert spec.source_file().read_bytes() == source.read_bytes()
    # The folder is small enough to review: configuration and SQL, the data file aside.
    written = [p for p in folder.rglob("*") if p.is_file() and "data" not in p.parts]
    lines = sum(len(p.read_text().splitlines()) for p in written if p.name != "README.md")
    assert len(written) == 6 and lines < 200, (len(written), lines)
    again = CliRunner().invoke(cli, ["dataset", "new", "loans", "--from", str(source)])
    assert again.exit_code != 0 and "already exists" in again.output


def test_dataset_new_refuses_a_file_without_a_key_and_leaves_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from keel.cli import cli

    monkeypatch.setenv("KEEL_DATASETS_DIR", relative_to_dbt(tmp_path / "datasets"))
    source = tmp_path / "no_key.csv"
    pd.DataFrame({"day": ["2024-01-01"] * 4, "x": [1, 1, 2, 2], "y": [0, 1, 0, 1]}).to_csv(
        source, index=False
    )
    result = CliRunner().invoke(cli, ["dataset", "new", "nokey", "--from", str(source)])
    assert result.exit_code != 0 and "entity key" in result.output
    assert not (tmp_path / "datasets" / "nokey").exists()
    # A file that is not what its name says: an error naming it, not a reader's traceback.
    broken = tmp_path / "broken.parquet"
    broken.write_text("day,x,y\n")
    result = CliRunner().invoke(cli, ["dataset", "new", "broken", "--from", str(broken)])
    assert result.exit_code == 1 and f"{broken}: cannot be read as PARQUET" in result.output
    assert not (tmp_path / "datasets" / "broken").exists()


THIRD_DATASET_RUN = """
import json
import dagster as dg
from orchestration.definitions import defs

instance = dg.DagsterInstance.ephemeral()
# A fresh data folder: the dataset's job applies its Feast objects itself.
run = defs.resolve_job_def("loans").execute_in_process(instance=instance, raise_on_error=False)
checks = {
    f"{e.asset_key.to_user_string()} {e.check_name}": e.passed
    for e in run.get_asset_check_evaluations()
}
built = {
    e.asset_key.to_user_string(): {
        k: v.value for k, v in e.event_specific_data.materialization.metadata.items()
        if isinstance(v.value, (int, float, str))
    }
    for e in run.get_asset_materialization_events()
}
graph = defs.resolve_asset_graph()
groups = sorted({graph.get(key).group_name for key in graph.get_all_asset_keys()})
print(json.dumps({"success": run.success, "checks": checks, "built": built, "groups": groups}))
"""


@pytest.mark.slow
def test_a_third_dataset_from_a_file_reaches_a_registered_model(tmp_path, venv_bin):
    """The guide's steps, in a fresh process each: scaffold, prepare, run the dataset's job."""
    import json
    import subprocess

    source = tmp_path / "applications.csv"
    frame = write_screening_file(source)
    # dbt reads one datasets folder: the daily loop's dataset comes along, as in datasets/.
    loop = loop_dataset().folder
    shutil.copytree(loop, tmp_path / "datasets" / loop.name, ignore=shutil.ignore_patterns("data"))
    env = {
        **os.environ,
        "KEEL_DATASETS_DIR": relative_to_dbt(tmp_path / "datasets"),
        "DBT_TARGET_PATH": str(tmp_path / "dbt-target"),
        "KEEL_HOME": str(tmp_path / "home"),
        "KEEL_PROFILE": "local",
        "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
    }
    for command in (
        [str(venv_bin / "keel"), "dataset", "new", "loans", "--from", str(source)],
        [str(venv_bin / "keel"), "prepare"],
    ):
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [str(venv_bin / "python"), "-c", THIRD_DATASET_RUN],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["success"], result
    assert result["checks"]["loans/raw great_expectations"]
    assert result["checks"]["loans/training_set dataset_guards"]
    assert result["checks"]["loans/model gates"]
    registered = result["built"]["loans/registered_model"]
    assert registered["registered_model"] == "loans" and registered["version"] == "1"
    # Both families trained and judged; the registered one is the better of those that passed.
    model = result["built"]["loans/model"]
    aucs = {family: model[f"roc_auc_{family}"] for family in ("lightgbm", "torch")}
    assert min(aucs.values()) > 0.7, aucs
    passed = [family for family in aucs if model[f"gates_passed_{family}"]]
    assert registered["family"] == model["champion"] == max(passed, key=aucs.get)
    assert result["built"]["loans/scores"]["family"] == registered["family"]
    # Scoring needs no label: every applicant of the load is scored, the unlabelled ones too.
    scores = result["built"]["loans/scores"]
    assert scores["rows"] == len(frame) and scores["version"] == "1"
    assert 0 < scores["flagged_share"] < 1
    # The load is the population the model was trained on: no feature drifts.
    assert result["built"]["loans/drift"]["drifted_features"] == 0
    assert "loans" in result["groups"]
    training = result["built"]["loans/training_set"]
    # A year's outcome window: applications screened within the last year are not yet labelled.
    now = pd.Timestamp.now()
    open_windows = int((frame["screening_date"] + pd.Timedelta(days=365) > now).sum())
    assert training["incomplete_outcomes_excluded"] == open_windows
    assert training["rows"] == len(frame) - open_windows
    assert training["feature_service"] == "loans_v1" and training["features"] == 4


# In `make test`: the shipped Taiwan file goes the whole way on every fresh clone (about a minute).
def test_taiwan_goes_from_its_csv_to_a_registered_model_with_a_fairness_report(
    data_resources, keel_home
):
    import dagster as dg

    from orchestration.definitions import defs

    spec = load_spec(TAIWAN_DIR)
    instance = dg.DagsterInstance.ephemeral()
    here = dg.Definitions(
        assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, resources=data_resources
    )
    run = here.resolve_job_def(spec.name).execute_in_process(instance=instance)
    assert run.success
    checks = {
        f"{e.asset_key.to_user_string()} {e.check_name}": e.passed
        for e in run.get_asset_check_evaluations()
    }
    assert checks["taiwan_credit/raw great_expectations"]
    assert checks["taiwan_credit/training_set dataset_guards"]
    assert checks["taiwan_credit/model gates"]
    built = {
        e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in run.get_asset_materialization_events()
    }
    training = built["taiwan_credit/training_set"]
    assert training["rows"].value == 30_000 and training["incomplete_outcomes_excluded"].value == 0
    model = built["taiwan_credit/model"]
    assert 0.70 <= model["roc_auc"].value < 0.9
    report = model["fairness"].value
    for family in ("lightgbm", "torch"):
        assert 0.70 <= model[f"roc_auc_{family}"].value < 0.9
        assert f"## {family} (" in report
    for attribute in spec.protected_attributes:
        assert f"### {attribute}: " in report
    for group in ("| F |", "| M |", "| university |", "| married |", "| 26-35 |"):
        assert group in report
    registered = built["taiwan_credit/registered_model"]
    assert registered["registered_model"].value == spec.registered_model
    assert registered["version"].value == "1"
    assert registered["family"].value == model["champion"].value
    assert built["taiwan_credit/scores"]["rows"].value == 30_000
    assert built["taiwan_credit/drift"]["drifted_features"].value == 0


def test_the_split_leaves_rows_to_train_on_for_snapshot_and_for_dated_outcomes():
    from keel.datasets.modeling import split

    spec = load_spec(TAIWAN_DIR)
    # Taiwan: every outcome known on one day; entities split by a stable hash of their key.
    snapshot = taiwan_rows(4_000)
    parts = split(spec, snapshot)
    shares = {name: len(part) / len(snapshot) for name, part in parts.items()}
    assert 0.65 < shares["train"] < 0.75 and min(shares.values()) > 0.12
    # The same client lands in the same part whatever the order of the load.
    shuffled = split(spec, snapshot.sample(frac=1, random_state=2))
    assert set(shuffled["test"]["client_id"]) == set(parts["test"]["client_id"])
    # Outcomes known over two years: the earliest known train, the latest are held out.
    dated = snapshot.assign(
        event_timestamp=pd.Timestamp("2024-01-01", tz="UTC")
        + pd.to_timedelta(np.arange(4_000) % 730, unit="D")
    )
    parts = split(spec, dated)
    assert len(parts["train"]) > 2_500
    assert parts["train"]["event_timestamp"].max() < parts["validation"]["event_timestamp"].min()
    assert parts["validation"]["event_timestamp"].max() < parts["test"]["event_timestamp"].min()


def test_population_stability_is_near_zero_for_the_same_population_and_large_for_a_shift():
    from keel.datasets.modeling import population_stability

    rng = np.random.default_rng(5)
    reference = pd.Series(rng.normal(0, 1, 5_000))
    assert population_stability(reference, pd.Series(rng.normal(0, 1, 5_000))) < 0.02
    assert population_stability(reference, pd.Series(rng.normal(1, 1, 5_000))) > 0.2
    regions = pd.Series(rng.choice(["north", "south"], 5_000))
    assert population_stability(regions, pd.Series(["north"] * 4_000 + ["south"] * 1_000)) > 0.2


def test_a_dataset_with_a_schedule_runs_its_job_on_it(tmp_path):
    import dagster as dg

    from orchestration.jobs import dataset_job
    from orchestration.schedules import dataset_schedule

    spec = load_spec(spec_copy(tmp_path, lambda d: d.update(schedule="0 3 * * *")))
    schedule = dataset_schedule(spec, dataset_job(spec))
    assert schedule.name == "taiwan_credit_schedule" and schedule.cron_schedule == "0 3 * * *"
    assert isinstance(schedule, dg.ScheduleDefinition) and schedule.job_name == spec.name


def test_an_absolute_datasets_folder_is_refused_before_dbt_can_overwrite_its_models(
    monkeypatch, tmp_path
):
    from keel.settings import SettingsError, datasets_dir

    monkeypatch.setenv("KEEL_DATASETS_DIR", str(tmp_path))
    with pytest.raises(SettingsError, match="must be relative to"):
        datasets_dir()
    monkeypatch.setenv("KEEL_DATASETS_DIR", relative_to_dbt(tmp_path))
    assert datasets_dir() == tmp_path.resolve()


def test_dataset_list_names_each_folder_and_reports_a_broken_one(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from keel.cli import cli

    spec_copy(tmp_path, lambda d: None)
    monkeypatch.setenv("KEEL_DATASETS_DIR", relative_to_dbt(tmp_path))
    listed = CliRunner().invoke(cli, ["dataset", "list"])
    assert listed.exit_code == 0 and "taiwan_credit" in listed.output
    assert "taiwan_credit_default" in listed.output
    spec_file = tmp_path / "taiwan_credit" / "dataset.yaml"
    spec_file.write_text(spec_file.read_text().replace("timing: retrospective", "timing: later"))
    broken = CliRunner().invoke(cli, ["dataset", "list"])
    assert broken.exit_code != 0 and "label.timing: 'later' is not one of" in broken.output


def credit_rows(rows: int = 3_000, seed: int = 4) -> pd.DataFrame:
    """Taiwan-shaped training rows whose default risk rises with delays and falls with limit."""
    rng = np.random.default_rng(seed)
    spec = load_spec(TAIWAN_DIR)
    features = {name: rng.normal(0, 1, rows) for name in spec.numeric_features}
    risk = -1.3 + 1.2 * features["max_delay_3m"] + 0.6 * features["utilisation"]
    risk -= 0.5 * features["limit_bal"]
    return pd.DataFrame(
        {
            "client_id": np.arange(rows),
            "event_timestamp": pd.Timestamp("2005-10-31", tz="UTC"),
            "observation_date": pd.Timestamp("2005-09-30", tz="UTC"),
            "defaulted": (rng.random(rows) < 1 / (1 + np.exp(-risk))).astype("int64"),
            **features,
            "sex": rng.choice(["F", "M"], rows),
            "age_band": rng.choice(["26-35", "36-45"], rows),
            "marriage": rng.choice(["married", "single"], rows),
            "education": rng.choice(["university", "graduate school"], rows),
        }
    )


@pytest.fixture(scope="module")
def two_families():
    """Both families fitted on the same parts and judged alike; limit_bal may never raise risk."""
    from keel.datasets.families import fit_lightgbm, fit_torch
    from keel.datasets.modeling import judge, split

    spec = load_spec(TAIWAN_DIR)
    spec = dataclasses.replace(
        spec,
        monotone={**spec.monotone, "limit_bal": -1},
        gates={**spec.gates, "bootstrap_samples": 100},
    )
    parts = split(spec, credit_rows(2_000))
    fitted = {
        "lightgbm": fit_lightgbm(spec, parts),
        "torch": fit_torch(spec, parts, device="cpu", max_epochs=6),
    }
    judged = {family: judge(spec, model, parts) for family, model in fitted.items()}
    return spec, parts, fitted, judged


def test_both_families_keep_the_monotone_directions_and_the_champion_is_the_best_that_passed(
    two_families,
):
    from keel.datasets.families import champion, model_files, model_from_files
    from keel.datasets.modeling import families_markdown

    spec, parts, fitted, judgements = two_families
    test = parts["test"].head(200)
    for family, model in fitted.items():
        assert judgements[family].passed, (family, judgements[family].gates)
        assert judgements[family].metrics["roc_auc"] > 0.68
        # More months in arrears never lowers the score; a higher limit never raises it.
        for feature, direction in (("max_delay_3m", 1), ("limit_bal", -1)):
            scores = np.array(
                [model.predict(test.assign(**{feature: value})) for value in (-2.0, 0.0, 2.0)]
            )
            assert (direction * np.diff(scores, axis=0) >= -1e-9).all(), (family, feature)
        # The files written are the model judged: the same scores read back.
        again = model_from_files(model_files(model))
        assert again.family == family
        np.testing.assert_allclose(again.predict(test), model.predict(test), rtol=1e-6)
    aucs = {family: j.metrics["roc_auc"] for family, j in judgements.items()}
    assert champion(judgements) == max(aucs, key=aucs.get)
    report = families_markdown(judgements, champion(judgements))
    assert f"## {champion(judgements)} (champion)" in report and "(challenger)" in report
    for attribute in spec.protected_attributes:
        assert f"### {attribute}: passed" in report
    assert "| group | rows | positives | positive rate | flagged | AUC | TPR | FPR |" in report


def test_a_family_that_fails_its_fairness_gate_is_not_registered(two_families):
    from assets.datasets import registration
    from keel.datasets.families import champion
    from keel.datasets.modeling import families_markdown, judge

    spec, parts, fitted, judged = two_families
    judged = dict(judged)
    # A policy no disparity meets (no gap at all allowed) fails whichever family it judges.
    strict = dataclasses.replace(
        spec,
        gates={
            **spec.gates,
            "max_demographic_parity_difference": 0.0,
            "max_equalized_odds_difference": 0.0,
        },
    )
    best = max(judged, key=lambda family: judged[family].metrics["roc_auc"])
    other = next(family for family in judged if family != best)
    judged[best] = judge(strict, fitted[best], parts)
    fairness = next(g for g in judged[best].gates if g["name"] == "fairness")
    assert not fairness["passed"] and judged[best].metrics["roc_auc"] > 0.68
    assert champion(judged) == other
    record = {
        "champion": champion(judged),
        "families": {
            family: {
                "run_id": f"run-{family}",
                "metrics": j.metrics,
                "gates": j.gates,
                "passed": j.passed,
            }
            for family, j in judged.items()
        },
    }
    candidate = registration(record)
    assert candidate["run_id"] == f"run-{other}" and all(candidate["gates"].values())
    tags = candidate["extra_tags"]
    assert tags["keel.champion_family"] == other
    assert tags[f"keel.challenger.{best}.gates_passed"] == "false"
    assert float(tags[f"keel.challenger.{best}.roc_auc"]) == pytest.approx(
        judged[best].metrics["roc_auc"], rel=1e-5
    )
    report = families_markdown(judged, other)
    assert f"## {best} (challenger)" in report and "**failed a gate**" in report
    assert "### sex: failed" in report
    # No family past its gates: nothing to register.
    judged[other] = judge(strict, fitted[other], parts)
    record["families"][other]["passed"] = judged[other].passed
    record["champion"] = champion(judged)
    assert record["champion"] is None
    with pytest.raises(ValueError, match="no family passed every gate"):
        registration(record)


def daily_loans(tmp_path: Path, monkeypatch) -> tuple[Path, pd.DataFrame]:
    """The scaffolded loans dataset made daily: one landing file per screening day."""
    from click.testing import CliRunner

    from keel.cli import cli

    monkeypatch.setenv("KEEL_DATASETS_DIR", relative_to_dbt(tmp_path / "datasets"))
    source = tmp_path / "applications.csv"
    frame = write_screening_file(source, rows=600)
    result = CliRunner().invoke(cli, ["dataset", "new", "loans", "--from", str(source)])
    assert result.exit_code == 0, result.output
    spec_file = tmp_path / "datasets" / "loans" / "dataset.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["source"] = {
        "kind": "landing",
        "path": "loans/{day}.csv",
        "rename": data["source"]["rename"],
    }
    data.update(partitions="daily", first_day="2024-01-01")
    data["dataset_checks"]["min_rows"] = 1
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec_file.parent, frame


def test_a_daily_dataset_loads_scores_and_monitors_one_day_at_a_time(
    tmp_path, monkeypatch, data_resources, keel_home
):
    import json

    import dagster as dg

    from assets.datasets import dataset_drift, dataset_landing_raw, dataset_scores
    from assets.ingestion import validation_check
    from keel.datasets.families import fit_lightgbm, model_files
    from keel.datasets.modeling import split
    from orchestration.jobs import dataset_job
    from orchestration.schedules import dataset_schedule

    folder, frame = daily_loans(tmp_path, monkeypatch)
    spec = load_spec(folder)
    frame["day"] = frame["screening_date"].dt.strftime("%Y-%m-%d")
    days = frame["day"].value_counts()
    day, other = days.index[0], days.index[1]
    landing = keel_home.landing / "loans"
    landing.mkdir(parents=True)
    for name in (day, other):
        frame[frame["day"] == name].drop(columns="day").to_csv(landing / f"{name}.csv", index=False)
    raw = dataset_landing_raw(spec)
    days_since = dg.DailyPartitionsDefinition(start_date="2024-01-01")
    assert raw.partitions_def == days_since
    # Its job runs one day, and a schedule runs the day just over.
    job = dataset_job(dataclasses.replace(spec, schedule="0 6 * * *"))
    assert job.partitions_def == days_since
    schedule = dataset_schedule(dataclasses.replace(spec, schedule="0 6 * * *"), job)
    tick = dg.build_schedule_context(
        scheduled_execution_time=pd.Timestamp("2024-03-05 06:00", tz="UTC").to_pydatetime()
    )
    assert [r.partition_key for r in schedule.evaluate_tick(tick).run_requests] == ["2024-03-04"]
    assets = [raw, validation_check(raw, spec.raw_table)]
    loaded = dg.materialize(assets, partition_key=day, resources=data_resources)
    assert loaded.success
    assert all(e.passed for e in loaded.get_asset_check_evaluations())
    # A day whose file has not landed fails naming it, and loads nothing.
    missing = "2025-06-30"
    failed = dg.materialize(
        assets, partition_key=missing, resources=data_resources, raise_on_error=False
    )
    assert not failed.success
    assert str(landing / f"{missing}.csv") in str(failed.get_step_failure_events()[0])
    with duckdb.connect(str(keel_home.warehouse)) as connection:
        partitions = dict(
            connection.execute(
                f"select _partition, count(*) from raw.{spec.raw_table} group by 1"
            ).fetchall()
        )
    assert partitions == {day: days[day]}
    # The registered model scores one day's rows, and that day's drift is reported.
    rows = frame.rename(columns={"Applicant ID": "applicant_id", "Income": "income"})
    rows["event_timestamp"] = pd.to_datetime(rows["screening_date"], utc=True)
    rows["observation_date"] = rows["event_timestamp"]
    mart = keel_home.marts / spec.features_mart
    mart.parent.mkdir(parents=True, exist_ok=True)
    rows.drop(columns="defaulted").to_parquet(mart)
    training = keel_home.artefacts / "training.parquet"
    rows.to_parquet(training)
    model = fit_lightgbm(spec, split(spec, rows))
    models = keel_home.artefacts / "models" / spec.name
    (models / "run-1").mkdir(parents=True)
    files = model_files(model)
    for name, data in files.items():
        (models / "run-1" / name).write_bytes(data)
    registered = {"run_id": "run-1", "files": sorted(files), "threshold": 0.5, "version": "1"}
    registered.update(family="lightgbm", training_set=str(training))
    (models / "registered.json").write_text(json.dumps(registered))
    scores = dataset_scores(spec, raw)
    drift = dataset_drift(spec, scores)
    assert scores.partitions_def == drift.partitions_def == raw.partitions_def
    run = dg.materialize([scores, drift], partition_key=day, resources=data_resources)
    built = {
        e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in run.get_asset_materialization_events()
    }
    assert built["loans/scores"]["rows"].value == days[day]
    assert built["loans/drift"]["load"].value == day
    scored = pd.read_parquet(keel_home.artefacts / "scores" / "loans" / f"{day}.parquet")
    assert set(scored["applicant_id"]) == set(rows.loc[rows["day"] == day, "applicant_id"])
