"""A dataset as configuration: ``datasets/<name>/dataset.yaml`` read into a typed, checked spec.

The spec holds what differs from one dataset to the next: where the rows come from, the raw
columns and their types, the entity and event time, the label and when it becomes known, the
protected attributes, the features (with vocabularies and monotone directions), the columns
that must never become features, the validation rules with their reason codes (a generator's
raw tables each with their own: ``keel.datasets.rules``), the bounds of
the dataset-level checks, the gate bounds that differ from the defaults, and the names the
model goes by. Every mistake is reported with the file and the key it sits under.

One dataset drives the daily loop (generator, stream, serving, releases): the one whose
``dataset.yaml`` says ``loop: daily``. A flag in the folder keeps the choice with the data it
describes, so adding or swapping the loop's dataset is an edit of dataset folders alone;
``loop_dataset`` finds it and ``keel.schema`` reads its names from it. The asset factories
(``discover``) build every other folder.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from keel.datasets.reader import NAME as NAME
from keel.datasets.reader import Reader, SpecError, fail
from keel.datasets.rules import (
    RAW_ROLES,
    RawTableSpec,
    Rule,
    parse_columns,
    parse_raw_tables,
    parse_rules,
)
from keel.gates import EvaluationError, GatePolicy
from keel.registry_lineage import file_sha256
from keel.settings import PROJECT_ROOT, datasets_dir
from keel_edge.contract import Ratio

# The shipped datasets; ``discover`` reads ``datasets_dir()`` (KEEL_DATASETS_DIR may move it).
DATASETS_DIR = PROJECT_ROOT / "datasets"
# libyaml's loader when PyYAML was built with it: the same result, several times faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SPEC_FILE = "dataset.yaml"
CRON = re.compile(r"^\s*(\S+\s+){4}\S+\s*$")
SOURCE_KINDS = ("file", "landing", "generator")
PARTITIONINGS = ("daily", "none")
LABEL_TIMINGS = ("stream", "retrospective")
PERIODS = ("day", "month", "snapshot")
MODEL_FAMILIES = ("lightgbm", "torch")
LOOPS = ("daily",)
MART_ROLES = ("features", "labels", "entities")


@dataclass(frozen=True)
class Source:
    """Where the rows come from: a file in the folder, a landing pattern, or the generator."""

    kind: str
    path: str | None = None
    sha256: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    # Files without an id column: the 1-based row number becomes this column.
    row_number_as: str | None = None


@dataclass(frozen=True)
class Label:
    """The label column and when its value becomes known.

    ``stream``: labels arrive later, each stamped when it became known (``known_at``).
    ``retrospective``: the outcome is observed over ``outcome_window_days`` after the
    observation date (``observed_at``); rows whose window has not closed carry no label yet.
    """

    column: str
    timing: str
    observed_at: str
    known_at: str | None = None
    outcome_window_days: int | None = None


@dataclass(frozen=True)
class DatasetChecks:
    """Bounds on the dataset as a whole, per period: a silent change of the source fails."""

    period: str = "snapshot"
    period_column: str | None = None
    label_rate: tuple[float, float] | None = None
    feature_means: dict[str, tuple[float, float]] = field(default_factory=dict)
    min_rows: int = 1


@dataclass(frozen=True)
class DatasetSpec:
    """Everything Keel needs to know about one dataset (see the module docstring)."""

    name: str
    folder: Path
    description: str
    source: Source
    raw_table: str
    columns: dict[str, str]
    entity: str
    entity_key: str
    event_time: str
    partitions: str
    label: Label
    protected_attributes: tuple[str, ...]
    numeric_features: tuple[str, ...]
    categorical_features: dict[str, tuple[str, ...]]
    monotone: dict[str, int]
    # How long a feature row stays current in Feast (a monthly snapshot: about a month).
    feature_ttl_days: int
    leakage: tuple[str, ...]
    rules: tuple[Rule, ...]
    dataset_checks: DatasetChecks
    gates: dict[str, Any]
    feature_service: str
    experiment: str
    registered_model: str
    dbt_models: tuple[str, ...]
    features_model: str
    labels_model: str
    # A cron expression: the dataset's job runs on it (a file refreshed in place, say).
    schedule: str | None = None
    # The model families trained and judged; the best that passes its gates is registered.
    families: tuple[str, ...] = MODEL_FAMILIES
    # ``daily``: this dataset drives the daily loop (see the module docstring).
    loop: str | None = None
    # The first daily partition (ISO date) of a daily dataset.
    first_day: str | None = None
    # Feast names: the feature view of the features mart and the on-demand view of the ratios.
    feature_view: str = ""
    on_demand_view: str | None = None
    # Features computed at request time from the mart's features (`keel_edge.contract.Ratio`).
    on_demand: tuple[Ratio, ...] = ()
    # Allowed values of raw columns that are not features (protected attributes, say).
    vocabularies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Where the marts land under the marts folder, when not ``<name>/<role>.parquet``; daily
    # marts land one file per value of their day column.
    mart_paths: dict[str, str] = field(default_factory=dict)
    mart_day_columns: dict[str, str] = field(default_factory=dict)
    # A dimension of the entity (static and protected attributes) landed whole, and its columns.
    entities_model: str | None = None
    entity_columns: tuple[str, ...] = ()
    # A generated dataset's raw tables, each with its columns, key and rules (keel.datasets.rules).
    raw_tables: dict[str, RawTableSpec] = field(default_factory=dict)

    def raw_table_of(self, role: str) -> RawTableSpec:
        """The raw table with ``role`` (labels, entities, landing) among ``raw_tables``."""
        for table in self.raw_tables.values():
            if table.role == role:
                return table
        raise SpecError(f"dataset {self.name!r} declares no raw table with role {role!r}")

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric_features + tuple(self.categorical_features)

    @property
    def features_mart(self) -> str:
        """The features model as Parquet, relative to the marts folder."""
        return self.mart_paths.get("features", f"{self.name}/features.parquet")

    @property
    def labels_mart(self) -> str:
        return self.mart_paths.get("labels", f"{self.name}/labels.parquet")

    @property
    def entities_mart(self) -> str:
        return self.mart_paths.get("entities", f"{self.name}/entities.parquet")

    @property
    def on_demand_features(self) -> tuple[str, ...]:
        return tuple(ratio.name for ratio in self.on_demand)

    def vocabulary(self, column: str) -> tuple[str, ...]:
        """The allowed values of ``column``: a categorical feature's or a declared vocabulary."""
        values = self.categorical_features.get(column) or self.vocabularies.get(column)
        if not values:
            raise SpecError(f"dataset {self.name!r} declares no vocabulary for {column!r}")
        return values

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The labels mart: key, event time, label, its timing columns, protected attributes."""
        timing = (self.label.observed_at, self.label.known_at)
        extra = tuple(c for c in timing if c and c != self.event_time)
        return (
            self.entity_key,
            self.event_time,
            self.label.column,
            *extra,
            *self.protected_attributes,
        )

    def source_file(self) -> Path:
        """The source file, checked against its recorded sha256 when the spec gives one."""
        if self.source.kind != "file" or not self.source.path:
            raise SpecError(f"dataset {self.name!r} has no source file (kind {self.source.kind})")
        path = (self.folder / self.source.path).resolve()
        if not path.is_file():
            raise SpecError(f"dataset {self.name!r}: source file {path} is missing")
        if self.source.sha256:
            actual = file_sha256(path)
            if actual != self.source.sha256:
                raise SpecError(
                    f"dataset {self.name!r}: {path.name} has sha256 {actual}, the spec records "
                    f"{self.source.sha256}; the file changed or is damaged"
                )
        return path

    def gate_policy(self) -> GatePolicy:
        """The default gate bars with this dataset's overrides."""
        return GatePolicy(**self.gates)


def _bounds(value: Any, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or value[0] > value[1]
    ):
        raise fail(where, f"expected [low, high] with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _source(reader: Reader) -> Source:
    kind = reader.choice("kind", SOURCE_KINDS)
    path = reader.get("path", str, None)
    if kind in ("file", "landing") and not path:
        raise fail(reader._at("path"), f"is required for a {kind} source")
    sha = reader.get("sha256", str, None)
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise fail(reader._at("sha256"), "must be 64 lower-case hex digits")
    rename = reader.get("rename", dict, {})
    source = Source(kind, path, sha, dict(rename), reader.get("row_number_as", str, None))
    reader.done()
    return source


def _label(reader: Reader) -> Label:
    timing = reader.choice("timing", LABEL_TIMINGS)
    label = Label(
        column=reader.name("column"),
        timing=timing,
        observed_at=reader.name("observed_at"),
        known_at=reader.name("known_at", None),
        outcome_window_days=reader.get("outcome_window_days", int, None),
    )
    if timing == "stream" and not label.known_at:
        raise fail(reader._at("known_at"), "is required for stream labels")
    if timing == "retrospective" and not (label.outcome_window_days or 0) > 0:
        raise fail(
            reader._at("outcome_window_days"),
            "a positive number of days is required for retrospective labels",
        )
    reader.done()
    return label


def _dataset_checks(reader: Reader) -> DatasetChecks:
    rate = reader.get("label_rate", list, None)
    means = reader.get("feature_means", dict, {})
    checks = DatasetChecks(
        period=reader.choice("period", PERIODS, "snapshot"),
        period_column=reader.name("period_column", None),
        label_rate=_bounds(rate, reader._at("label_rate")) if rate is not None else None,
        feature_means={k: _bounds(v, reader._at(f"feature_means.{k}")) for k, v in means.items()},
        min_rows=reader.get("min_rows", int, 1),
    )
    if checks.period != "snapshot" and not checks.period_column:
        raise fail(reader._at("period_column"), f"is required for period {checks.period!r}")
    reader.done()
    return checks


def _ratios(items: Any, where: str) -> tuple[Ratio, ...]:
    if not isinstance(items, list):
        raise fail(where, "expected a list of ratios")
    ratios = []
    for i, item in enumerate(items):
        reader = Reader(item, f"{where}[{i}]")
        numbers = {
            key: float(reader.get(key, (int, float), default))
            for key, default in (("multiplier", 1.0), ("divisor", 1.0), ("floor", 1.0))
        }
        if numbers["divisor"] == 0:
            raise fail(reader._at("divisor"), "must not be 0")
        ratio = Ratio(
            reader.name("name"), reader.name("numerator"), reader.name("denominator"), **numbers
        )
        reader.done()
        ratios.append(ratio)
    return tuple(ratios)


def _vocabularies(data: dict[str, Any], where: str) -> dict[str, tuple[str, ...]]:
    for column, values in data.items():
        if not isinstance(values, list) or not values:
            raise fail(f"{where}.{column}", "needs its list of values")
    return {column: tuple(str(v) for v in values) for column, values in data.items()}


def _first_day(value: Any, where: str) -> str | None:
    if value is None:
        return None
    # YAML reads an unquoted 2026-01-01 as a date.
    text = value.isoformat() if isinstance(value, date) else str(value)
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError as error:
        raise fail(where, f"{value!r} is not an ISO date (YYYY-MM-DD)") from error


def parse_spec(data: Any, folder: Path, where: str) -> DatasetSpec:
    """Build a spec from the parsed YAML ``data`` of ``folder``; ``where`` names it in errors."""
    top = Reader(data, where)
    name = top.name("name")
    if name != folder.name:
        raise fail(f"{where}.name", f"{name!r} must match the folder name {folder.name!r}")
    columns = parse_columns(top.get("columns", dict), f"{where}.columns")
    entity = top.sub("entity")
    features = top.sub("features")
    model = top.sub("model")
    marts = top.sub("marts")
    label = _label(top.sub("label"))
    categorical = features.get("categorical", dict, {})
    for feature, vocabulary in categorical.items():
        if not isinstance(vocabulary, list) or not vocabulary:
            raise fail(f"{where}.features.categorical.{feature}", "needs its list of categories")
    on_demand = features.sub("on_demand", {})
    vocabularies = _vocabularies(top.get("vocabularies", dict, {}), f"{where}.vocabularies")
    categories = {k: tuple(str(v) for v in vs) for k, vs in categorical.items()}
    # An in_set rule without values takes the column's categories or vocabulary.
    known_values = {**vocabularies, **categories}
    mart_paths = marts.get("paths", dict, {})
    day_columns = marts.get("day_columns", dict, {})
    for section, values in (("paths", mart_paths), ("day_columns", day_columns)):
        unknown = sorted(set(values) - set(MART_ROLES))
        if unknown:
            raise fail(f"{where}.marts.{section}", f"{unknown} are not {', '.join(MART_ROLES)}")
    monotone = features.get("monotone", dict, {})
    for feature, direction in monotone.items():
        if direction not in (-1, 1):
            raise fail(
                f"{where}.features.monotone.{feature}", f"must be 1 or -1, got {direction!r}"
            )
    gates = top.get("gates", dict, {})
    known_gates = {f.name for f in fields(GatePolicy)}
    for gate in gates:
        if gate not in known_gates:
            bounds = ", ".join(sorted(known_gates))
            raise fail(f"{where}.gates.{gate}", f"is not a gate bound ({bounds})")
    spec = DatasetSpec(
        name=name,
        folder=folder,
        description=top.get("description", str),
        source=_source(top.sub("source")),
        raw_table=top.name("raw_table", name),
        columns=columns,
        entity=entity.name("name"),
        entity_key=entity.name("key"),
        event_time=top.name("event_time", "event_timestamp"),
        partitions=top.choice("partitions", PARTITIONINGS, "none"),
        label=label,
        protected_attributes=top.names("protected_attributes", []),
        numeric_features=features.names("numeric", []),
        categorical_features=categories,
        monotone=dict(monotone),
        feature_ttl_days=features.get("ttl_days", int, 1),
        leakage=top.names("leakage", []),
        rules=parse_rules(top.get("rules", list, []), f"{where}.rules", columns, known_values),
        raw_tables=parse_raw_tables(
            top.get("raw_tables", dict, {}), f"{where}.raw_tables", columns, known_values
        ),
        dataset_checks=_dataset_checks(top.sub("dataset_checks")),
        gates=dict(gates),
        feature_service=model.name("feature_service", f"{name}_v1"),
        experiment=model.model_name("experiment", name),
        registered_model=model.model_name("registered_model", name),
        # Every model of the folder's dbt/ (subfolders too) by default, as dbt finds them.
        dbt_models=marts.names("dbt_models", None)
        or tuple(sorted(p.stem for p in (folder / "dbt").rglob("*.sql"))),
        features_model=marts.name("features"),
        labels_model=marts.name("labels"),
        schedule=top.get("schedule", str, None),
        families=model.names("families", list(MODEL_FAMILIES)),
        loop=top.choice("loop", LOOPS, None),
        first_day=_first_day(top.get("first_day", (str, date), None), f"{where}.first_day"),
        feature_view=features.name("view", f"{name}_fv"),
        on_demand_view=on_demand.name("view", None),
        on_demand=_ratios(on_demand.get("ratios", list, []), f"{where}.features.on_demand.ratios"),
        vocabularies=vocabularies,
        mart_paths={k: str(v) for k, v in mart_paths.items()},
        mart_day_columns={k: str(v) for k, v in day_columns.items()},
        entities_model=marts.name("entities", None),
        entity_columns=marts.names("entity_columns", []),
    )
    for section in (entity, features, on_demand, model, marts, top):
        section.done()
    _cross_check(spec, where)
    try:
        spec.gate_policy()
    except EvaluationError as error:
        raise fail(f"{where}.gates", str(error)) from error
    return spec


def _cross_check(spec: DatasetSpec, where: str) -> None:
    """Names that must agree with each other across sections."""
    if not spec.features:
        raise fail(f"{where}.features", "declares no feature")
    clash = set(spec.features) & (set(spec.leakage) | {spec.label.column})
    if clash:
        raise fail(f"{where}.features", f"{', '.join(sorted(clash))} is the label or leakage")
    protected = set(spec.features) & set(spec.protected_attributes)
    if protected:
        raise fail(
            f"{where}.features", f"{', '.join(sorted(protected))} is protected, never a feature"
        )
    unknown = set(spec.monotone) - set(spec.numeric_features)
    if unknown:
        raise fail(
            f"{where}.features.monotone", f"{', '.join(sorted(unknown))} is not a numeric feature"
        )
    if spec.source.row_number_as and spec.source.row_number_as not in spec.columns:
        raise fail(f"{where}.source.row_number_as", "must name a declared column")
    if spec.schedule is not None and not CRON.match(spec.schedule):
        raise fail(f"{where}.schedule", f"{spec.schedule!r} is not a five-field cron expression")
    for model in (spec.features_model, spec.labels_model, spec.entities_model):
        if model and spec.dbt_models and model not in spec.dbt_models:
            raise fail(f"{where}.marts", f"{model!r} is not one of marts.dbt_models")
    if spec.entity_key not in spec.columns:
        raise fail(f"{where}.entity.key", f"{spec.entity_key!r} is not a declared column")
    if spec.entities_model and not spec.entity_columns:
        raise fail(f"{where}.marts.entity_columns", "is required with marts.entities")
    if spec.partitions == "daily" and spec.first_day is None:
        raise fail(f"{where}.first_day", "is required for daily partitions")
    if spec.on_demand and not spec.on_demand_view:
        raise fail(f"{where}.features.on_demand.view", "is required with ratios")
    for ratio in spec.on_demand:
        missing = {ratio.numerator, ratio.denominator} - set(spec.numeric_features)
        if missing:
            raise fail(
                f"{where}.features.on_demand.{ratio.name}",
                f"{', '.join(sorted(missing))} is not a numeric feature",
            )
    clash = set(spec.on_demand_features) & (set(spec.columns) | set(spec.features))
    if clash:
        raise fail(f"{where}.features.on_demand", f"{', '.join(sorted(clash))} already exists")
    _check_raw_tables(spec, where)
    unknown = [f for f in spec.families if f not in MODEL_FAMILIES]
    if unknown or not spec.families or len(set(spec.families)) < len(spec.families):
        raise fail(
            f"{where}.model.families",
            f"{list(spec.families)!r} must list some of {', '.join(MODEL_FAMILIES)}, each once",
        )


def _check_raw_tables(spec: DatasetSpec, where: str) -> None:
    """A generator's tables: its daily raw table among them, the others each with a role."""
    at = f"{where}.raw_tables"
    if not spec.raw_tables:
        if spec.loop:
            raise fail(at, "is required for the loop's dataset (roles: labels, entities, landing)")
        return
    if spec.source.kind != "generator":
        raise fail(at, f"only a generator delivers several tables (source {spec.source.kind})")
    if spec.raw_table not in spec.raw_tables:
        raise fail(at, f"must declare the dataset's raw_table {spec.raw_table!r}")
    if spec.raw_tables[spec.raw_table].role:
        raise fail(f"{at}.{spec.raw_table}.role", "the dataset's raw_table takes no role")
    for table in spec.raw_tables.values():
        if table.name != spec.raw_table and not table.role:
            raise fail(f"{at}.{table.name}.role", f"is required (one of {', '.join(RAW_ROLES)})")
    missing = [role for role in RAW_ROLES if spec.loop and role not in _roles(spec)]
    if missing:
        raise fail(at, f"the loop's dataset needs a table for {', '.join(missing)}")


def _roles(spec: DatasetSpec) -> set[str]:
    return {table.role for table in spec.raw_tables.values() if table.role}


def load_spec(folder: str | Path) -> DatasetSpec:
    """Read and check ``<folder>/dataset.yaml``."""
    folder = Path(folder).resolve()
    path = folder / SPEC_FILE
    if not path.is_file():
        raise SpecError(f"{path}: no dataset specification here")
    try:
        data = yaml.load(path.read_text(), Loader=_LOADER)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from error
    return parse_spec(data, folder, str(path))


def discover(root: str | Path | None = None) -> list[DatasetSpec]:
    """The datasets the asset factories build: every one under ``root`` but the loop's."""
    return [spec for spec in all_datasets(root) if spec.loop is None]


def loop_dataset() -> DatasetSpec:
    """The dataset that drives the daily loop (``loop: daily``): exactly one per folder.

    Looked for in ``datasets_dir()``, then among the shipped datasets, so a datasets folder
    moved elsewhere (a test's, say) need not copy it. Only its own file is checked here: a
    broken folder beside it fails where the factories read it, not every import of Keel.
    """
    for root in dict.fromkeys((datasets_dir(), DATASETS_DIR)):
        found = [path.parent for path in sorted(root.glob(f"*/{SPEC_FILE}")) if _is_loop(path)]
        if len(found) > 1:
            names = ", ".join(folder.name for folder in found)
            raise SpecError(f"{root}: {names} each say loop: daily; only one dataset may")
        if found:
            folder = found[0]
            key = (str(folder), (folder / SPEC_FILE).stat().st_mtime_ns, _mtime(folder / "dbt"))
            return _load_all((key,))[0]
    raise SpecError(f"no dataset under {DATASETS_DIR} says loop: daily")


def _is_loop(path: Path) -> bool:
    text = path.read_text()
    # Most folders have no top-level ``loop`` key: no need to parse them.
    if not re.search(r"^loop\s*:", text, re.MULTILINE):
        return False
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("loop") == "daily"


def all_datasets(root: str | Path | None = None) -> list[DatasetSpec]:
    """Every dataset under ``root`` (default ``datasets_dir()``), one folder each, by name."""
    root = Path(root) if root is not None else datasets_dir()
    if not root.is_dir():
        return []
    # Loading the definitions asks a dozen times: parse each folder once until it changes.
    folders = tuple(
        (str(path.parent), path.stat().st_mtime_ns, _mtime(path.parent / "dbt"))
        for path in sorted(root.glob(f"*/{SPEC_FILE}"))
    )
    return list(_load_all(folders))


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


@functools.lru_cache(maxsize=16)
def _load_all(folders: tuple[tuple[str, int, int], ...]) -> tuple[DatasetSpec, ...]:
    return tuple(load_spec(folder) for folder, _, _ in folders)
