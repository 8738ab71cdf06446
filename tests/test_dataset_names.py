"""Pipeline code names no dataset: every name a dataset goes by lives in its own folder."""

from __future__ import annotations

import re

from keel.datasets.spec import DATASETS_DIR, DatasetSpec, all_datasets, loop_dataset
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
    return names


def test_every_shipped_dataset_names_itself_and_the_loop_has_one():
    specs = all_datasets(DATASETS_DIR)
    assert len(specs) >= 2, [spec.name for spec in specs]
    for spec in specs:
        # The dbt models, found in the folder's dbt/ (subfolders too), include the marts.
        assert {spec.features_model, spec.labels_model} <= set(spec.dbt_models), spec.name
        assert spec.name in spec.folder.name
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
