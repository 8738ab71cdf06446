"""A seeded generator of credit-card accounts, their daily activity and late default labels.

Everything derives from ``(seed, day, stream)``: any day can be generated on its own, in any
order, and the same seed and scale always give the same bytes. Memory stays at one day of
activity, so 10 million events are a loop over days, never a frame in memory.

The world it simulates:
- account holders with static attributes, protected ones included (age, sex, region), and a
  latent riskiness that differs by group (so fairness checks have something real to find);
- one activity row per account per day (transactions, spend, payments, balance, whether a due
  payment was missed, the channel used);
- a default label per account once a month (on its statement day), which arrives
  ``label_delay_days`` later (30 by default).

Drift scenarios switch on from a chosen day: covariate shift, label shift, concept drift, a
schema change, and malformed rows (null keys, out-of-range values, wrong types, duplicates,
unknown categories).

A data folder records the settings of its first generation (``generator.json``); generating
into it with other settings is refused, so one warehouse never mixes two worlds.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keel.files import replace_durably
from keel.schema import AGE_BANDS, CHANNELS, FIRST_DAY, PRODUCTS, REGIONS, SEXES

DRIFT_KINDS = ("covariate", "label", "concept", "schema", "malformed")
LANDING_FORMATS = ("csv", "parquet", "jsonl")
LABEL_DELAY_DAYS = 30
FIRST_DATE = date.fromisoformat(FIRST_DAY)
STATEMENT_CYCLE_DAYS = 30
# Written into a data folder by its first generation: every later one must use these settings.
SETTINGS_FILE = "generator.json"
_FINGERPRINT = re.compile(r"[0-9a-f]{12}")

# Independent random streams, so that one variable can be regenerated without the others.
_ACCOUNTS, _ACTIVITY, _MISSED, _LABELS, _MALFORMED, _LATE, _UTILISATION = range(7)


class GeneratorConfigError(ValueError):
    """A generator setting that cannot produce data."""


@dataclass(frozen=True)
class DriftScenario:
    """One drift from ``start`` on, of ``strength`` in [0, 1] (for ``malformed``: the share)."""

    kind: str
    start: date
    strength: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise GeneratorConfigError(
                f"unknown drift kind {self.kind!r}; use one of {', '.join(DRIFT_KINDS)}"
            )
        if not 0 <= self.strength <= 1:
            raise GeneratorConfigError(f"drift strength must be in [0, 1], got {self.strength}")

    def active_on(self, day: date) -> bool:
        return day >= self.start


@dataclass(frozen=True)
class GeneratorConfig:
    """Scale, seed, calendar and drift of one generated world."""

    seed: int = 7
    accounts: int = 2_000
    start: date = FIRST_DATE
    late_share: float = 0.0
    scenarios: tuple[DriftScenario, ...] = field(default_factory=tuple)
    # Outcomes are known this many days after the observation; shorten it to see retraining on
    # drifted labels within a short demo.
    label_delay_days: int = LABEL_DELAY_DAYS

    def __post_init__(self) -> None:
        if self.label_delay_days < 1:
            raise GeneratorConfigError(
                f"label_delay_days must be at least 1, got {self.label_delay_days}"
            )
        if self.accounts < 1:
            raise GeneratorConfigError(f"accounts must be positive, got {self.accounts}")
        if not 0 <= self.late_share < 1:
            raise GeneratorConfigError(f"late_share must be in [0, 1), got {self.late_share}")

    def day_index(self, day: date) -> int:
        index = (day - self.start).days
        if index < 0:
            raise GeneratorConfigError(f"{day} is before the generator's first day {self.start}")
        return index

    def strength(self, kind: str, day: date) -> float:
        """Total strength of the scenarios of ``kind`` active on ``day`` (0 when none)."""
        return sum(s.strength for s in self.scenarios if s.kind == kind and s.active_on(day))

    def fingerprint(self) -> str:
        """Short content hash: extracts of different configurations never mix."""
        import hashlib

        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def to_json(self) -> str:
        payload = asdict(self)
        payload["start"] = self.start.isoformat()
        payload["scenarios"] = [{**asdict(s), "start": s.start.isoformat()} for s in self.scenarios]
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_dict(cls, payload: dict) -> GeneratorConfig:
        scenarios = tuple(
            DriftScenario(
                kind=s["kind"], start=_as_date(s["start"]), strength=float(s.get("strength", 0.5))
            )
            for s in payload.get("scenarios", ())
        )
        return cls(
            seed=int(payload.get("seed", 7)),
            accounts=int(payload.get("accounts", 2_000)),
            start=_as_date(payload.get("start", FIRST_DAY)),
            late_share=float(payload.get("late_share", 0.0)),
            scenarios=scenarios,
            label_delay_days=int(payload.get("label_delay_days", LABEL_DELAY_DAYS)),
        )


def _as_date(value: str | date) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


def _rng(config: GeneratorConfig, stream: int, day_index: int = 0) -> np.random.Generator:
    return np.random.default_rng([config.seed, stream, day_index])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Accounts:
    """Static attributes and latent traits of every account (a few MB even at 1M accounts)."""

    account_id: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    region: np.ndarray
    product: np.ndarray
    credit_limit: np.ndarray
    opened_date: np.ndarray
    risk: np.ndarray
    base_utilisation: np.ndarray
    spend_rate: np.ndarray
    miss_rate: np.ndarray
    pay_ratio: np.ndarray
    channel_cdf: np.ndarray
    cycle_day: np.ndarray
    phase: np.ndarray


def build_accounts(config: GeneratorConfig) -> Accounts:
    """Draw the account holders; group differences in risk are deliberate and realistic."""
    rng = _rng(config, _ACCOUNTS)
    n = config.accounts
    age = np.clip(np.round(rng.gamma(4.0, 5.5, n) + 18), 18, 90).astype(np.int64)
    sex = rng.choice(np.array(SEXES), n, p=[0.52, 0.48])
    region = rng.choice(np.array(REGIONS), n, p=[0.25, 0.2, 0.2, 0.2, 0.15])
    product = rng.choice(np.array(PRODUCTS), n, p=[0.6, 0.3, 0.1])
    limit_scale = np.select([product == "classic", product == "gold"], [2_000.0, 8_000.0], 25_000.0)
    credit_limit = np.round(limit_scale * rng.lognormal(0.0, 0.35, n), -1)
    opened_days_ago = rng.integers(30, 3_650, n)
    opened_date = np.datetime64(config.start) - opened_days_ago.astype("timedelta64[D]")

    # Young and male holders default more often, as in most real credit books (the Taiwan data
    # shows 24% vs 21% by sex); regions differ through local economies.
    region_effect = {"north": -0.15, "south": 0.3, "east": 0.0, "west": -0.05, "central": 0.1}
    risk = (
        rng.normal(0.0, 1.0, n)
        + np.where(age < 26, 0.45, np.where(age > 65, 0.2, 0.0))
        + np.where(sex == "M", 0.15, 0.0)
        + np.vectorize(region_effect.get)(region)
        - np.where(product == "platinum", 0.3, 0.0)
    )
    base_utilisation = _sigmoid(-0.6 + 0.9 * risk + rng.normal(0.0, 0.4, n))
    spend_rate = 0.012 * rng.lognormal(0.0, 0.5, n)
    miss_rate = _sigmoid(-3.2 + 1.1 * risk)
    pay_ratio = np.clip(1.15 - 0.25 * risk + rng.normal(0.0, 0.1, n), 0.1, 1.6)
    channel_weights = rng.dirichlet([4.0, 3.0, 1.0, 0.5], n)
    return Accounts(
        account_id=np.arange(1, n + 1, dtype=np.int64),
        age=age,
        sex=sex,
        region=region,
        product=product,
        credit_limit=credit_limit,
        opened_date=opened_date,
        risk=risk,
        base_utilisation=base_utilisation,
        spend_rate=spend_rate,
        miss_rate=miss_rate,
        pay_ratio=pay_ratio,
        channel_cdf=np.cumsum(channel_weights, axis=1),
        cycle_day=np.arange(n, dtype=np.int64) % STATEMENT_CYCLE_DAYS,
        phase=rng.uniform(0.0, STATEMENT_CYCLE_DAYS, n),
    )


def age_band(age: np.ndarray) -> np.ndarray:
    """Map ages to the bands in ``schema.AGE_BANDS``."""
    edges = np.array([26, 36, 51, 66])
    return np.array(AGE_BANDS)[np.searchsorted(edges, age, side="right")]


def account_holders_table(config: GeneratorConfig, accounts: Accounts | None = None) -> pa.Table:
    """The account-holder snapshot the source system exports."""
    a = accounts or build_accounts(config)
    return pa.table(
        {
            "account_id": a.account_id,
            "opened_date": a.opened_date.astype("datetime64[D]"),
            "age": a.age,
            "sex": a.sex,
            "region": a.region,
            "product": a.product,
            "credit_limit": a.credit_limit,
        }
    )


def _missed_payments(config: GeneratorConfig, accounts: Accounts, day: date) -> np.ndarray:
    t = config.day_index(day)
    due = accounts.cycle_day == t % STATEMENT_CYCLE_DAYS
    miss_rate = accounts.miss_rate
    covariate = config.strength("covariate", day)
    if covariate:
        miss_rate = _sigmoid(np.log(miss_rate / (1 - miss_rate)) + 0.8 * covariate)
    draws = _rng(config, _MISSED, t).random(len(accounts.account_id))
    return due & (draws < miss_rate)


def _utilisation(config: GeneratorConfig, accounts: Accounts, day: date) -> np.ndarray:
    t = config.day_index(day)
    rng = _rng(config, _UTILISATION, t)
    cycle = 0.08 * np.sin(2 * np.pi * (t + accounts.phase) / STATEMENT_CYCLE_DAYS)
    shift = 0.25 * config.strength("covariate", day)
    noise = rng.normal(0.0, 0.03, len(accounts.account_id))
    return np.clip(accounts.base_utilisation + shift + cycle + noise, 0.0, 1.2)


def activity_table(
    config: GeneratorConfig, day: date, accounts: Accounts | None = None
) -> pa.Table:
    """Every account's activity on ``day``, drift and malformed rows included."""
    a = accounts or build_accounts(config)
    t = config.day_index(day)
    rng = _rng(config, _ACTIVITY, t)
    n = len(a.account_id)
    covariate = config.strength("covariate", day)

    transactions = rng.poisson(1.6 * (1 + 0.5 * covariate), n)
    ticket = a.spend_rate * a.credit_limit / 1.6 * (1 + covariate)
    spend = np.where(transactions > 0, rng.gamma(2.0, 0.5, n) * ticket * transactions, 0.0)
    utilisation = _utilisation(config, a, day)
    balance = np.round(utilisation * a.credit_limit, 2)
    missed = _missed_payments(config, a, day)
    due = a.cycle_day == t % STATEMENT_CYCLE_DAYS
    statement_payment = a.pay_ratio * a.spend_rate * a.credit_limit * STATEMENT_CYCLE_DAYS
    extra_payment = rng.random(n) < 0.04
    payment = np.where(due & ~missed, statement_payment, 0.0) + np.where(
        extra_payment, rng.gamma(2.0, 0.1, n) * a.credit_limit * 0.1, 0.0
    )
    # Covariate drift also moves customers online.
    channel_draw = rng.random(n) * (1 - 0.5 * covariate)
    channel = np.array(CHANNELS)[(channel_draw[:, None] > a.channel_cdf).sum(axis=1).clip(0, 3)]

    columns = {
        "account_id": pa.array(a.account_id),
        "activity_date": pa.array(np.full(n, np.datetime64(day, "D"))),
        "n_transactions": pa.array(transactions.astype(np.int64)),
        "spend_amount": pa.array(np.round(spend, 2)),
        "payment_amount": pa.array(np.round(payment, 2)),
        "balance": pa.array(balance),
        "missed_payment": pa.array(missed),
        "channel": pa.array(channel),
    }
    table = pa.table(columns)
    malformed = config.strength("malformed", day)
    if malformed:
        table = _inject_malformed_rows(table, malformed, _rng(config, _MALFORMED, t))
    if config.strength("schema", day):
        # The upstream system renamed a column and started sending a currency.
        table = table.rename_columns(
            ["spend_amt" if c == "spend_amount" else c for c in table.column_names]
        ).append_column("currency", pa.array(["EUR"] * table.num_rows))
    return table


def _inject_malformed_rows(table: pa.Table, share: float, rng: np.random.Generator) -> pa.Table:
    """Corrupt ``share`` of the rows, evenly across five kinds of damage."""
    frame = table.to_pandas()
    n = len(frame)
    victims = rng.choice(n, size=round(share * n), replace=False)
    kinds = np.array_split(victims, 5)
    null_keys, out_of_range, wrong_types, duplicates, unknown = kinds
    for column in ("n_transactions", "spend_amount", "payment_amount", "balance"):
        frame[column] = frame[column].astype(str)
    frame["account_id"] = frame["account_id"].astype("Int64")
    frame.loc[null_keys, "account_id"] = None
    frame.loc[out_of_range, "spend_amount"] = "-250.0"
    frame.loc[out_of_range, "n_transactions"] = "-3"
    frame.loc[wrong_types, "payment_amount"] = "n/a"
    frame.loc[unknown, "channel"] = "crypto"
    frame = _append_rows(frame, duplicates)
    return pa.Table.from_pandas(frame, preserve_index=False)


def _append_rows(frame, rows: np.ndarray):
    import pandas as pd

    return pd.concat([frame, frame.iloc[rows]], ignore_index=True)


def labels_table(config: GeneratorConfig, arrival_day: date, accounts: Accounts | None = None):
    """Labels that ARRIVE on ``arrival_day``: did each account observed earlier default?

    One label per account on its statement day; the outcome depends on the account's latent
    risk, its utilisation and its recent missed payments, so observable features predict it.
    """
    a = accounts or build_accounts(config)
    observed = arrival_day - timedelta(days=config.label_delay_days)
    empty = pa.table(
        {
            "account_id": pa.array([], pa.int64()),
            "observation_date": pa.array([], pa.date32()),
            "label_date": pa.array([], pa.date32()),
            "defaulted": pa.array([], pa.int64()),
        }
    )
    if observed < config.start:
        return empty
    t = config.day_index(observed)
    due = a.cycle_day == t % STATEMENT_CYCLE_DAYS
    utilisation = _utilisation(config, a, observed)
    recent_misses = sum(
        _missed_payments(config, a, observed - timedelta(days=lag)).astype(float)
        for lag in (0, 30, 60)
        if observed - timedelta(days=lag) >= config.start
    )
    concept = config.strength("concept", observed)
    label_shift = config.strength("label", observed)
    logit = (
        -3.4
        + 0.9 * a.risk
        # Concept drift turns the old signals around: high utilisation stops meaning risk (its
        # effect reverses) and missed payments count for less, so a model trained before decays.
        + (2.2 - 4.4 * concept) * (utilisation - 0.5)
        + (1.1 - 0.8 * concept) * recent_misses
        + 1.5 * label_shift
    )
    defaulted = _rng(config, _LABELS, t).random(len(a.account_id)) < _sigmoid(logit)
    ids = a.account_id[due]
    return pa.table(
        {
            "account_id": pa.array(ids),
            "observation_date": pa.array(np.full(len(ids), np.datetime64(observed, "D"))),
            "label_date": pa.array(np.full(len(ids), np.datetime64(arrival_day, "D"))),
            "defaulted": pa.array(defaulted[due].astype(np.int64)),
        }
    )


def split_late_rows(config: GeneratorConfig, day: date, table: pa.Table):
    """Hold back ``late_share`` of a day's rows: they arrive later through the landing folder."""
    if not config.late_share:
        return table, table.slice(0, 0)
    late = _rng(config, _LATE, config.day_index(day)).random(table.num_rows) < config.late_share
    return table.filter(pa.array(~late)), table.filter(pa.array(late))


def write_table(table: pa.Table, path: Path) -> Path:
    """Write Parquet atomically: a reader never sees half a file, a crash leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A scratch name of this writer's own: two workers generating one day never meet.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, temporary, compression="zstd")
        replace_durably(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_landing_file(table: pa.Table, folder: Path | str, stem: str, file_format: str):
    """Drop rows into the landing folder as CSV, Parquet or JSON lines, atomically.

    ``folder`` may be on an object store (``s3://...``): the file is written locally, then
    uploaded whole.
    """
    if file_format not in LANDING_FORMATS:
        raise GeneratorConfigError(f"landing format must be one of {LANDING_FORMATS}")
    from keel.storage import is_local, location, publish, scratch_folder

    if not is_local(folder):
        with scratch_folder(folder) as scratch:
            written = write_landing_file(table, scratch, stem, file_format)
            return publish(written, location(folder, written.name))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}.{file_format}"
    temporary = folder / f".{stem}.{file_format}.{uuid.uuid4().hex}.tmp"
    try:
        if file_format == "parquet":
            pq.write_table(table, temporary)
        elif file_format == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, temporary)
        else:
            frame = table.to_pandas()
            for column in frame.columns:
                if str(frame[column].dtype).startswith(("datetime", "object")):
                    frame[column] = frame[column].astype(str).where(frame[column].notna(), None)
            frame.to_json(temporary, orient="records", lines=True, date_format="iso")
        replace_durably(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class GeneratedDay:
    """Where one generated day landed."""

    activity: Path
    labels: Path
    landing: Path | None


def recorded_config(folder: Path) -> GeneratorConfig | None:
    """The settings the data folder was generated with, or None before its first generation."""
    path = folder / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        return GeneratorConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise GeneratorConfigError(f"{path} is not a generator settings file: {error}") from error


def settings_mismatch(recorded: GeneratorConfig, requested: GeneratorConfig) -> dict[str, tuple]:
    """The settings that differ, each as (recorded, requested)."""
    old, new = json.loads(recorded.to_json()), json.loads(requested.to_json())
    return {name: (old[name], new[name]) for name in old if old[name] != new[name]}


def mismatch_error(folder: Path, differences: dict[str, tuple]) -> GeneratorConfigError:
    """The error for settings that would mix two generated worlds in one data folder."""
    listed = "; ".join(
        f"{name}: folder {was!r}, requested {asked!r}" for name, (was, asked) in differences.items()
    )
    return GeneratorConfigError(
        f"the data folder {folder} was generated with other settings ({listed}), recorded in "
        f"{folder / SETTINGS_FILE}. Mixing two worlds in one warehouse duplicates labels: leave "
        "these settings unset to continue the folder's world, or use a new KEEL_HOME."
    )


def record_config(folder: Path, config: GeneratorConfig) -> GeneratorConfig:
    """Record ``config`` as the folder's settings on its first generation, else check it.

    Raises:
        GeneratorConfigError: the folder was generated with other settings.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SETTINGS_FILE
    if not path.exists():
        unrecorded = sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.is_dir()
            and _FINGERPRINT.fullmatch(entry.name)
            and entry.name != config.fingerprint()
        )
        if unrecorded:
            # Extracts from before settings were recorded: their settings are unknown.
            raise GeneratorConfigError(
                f"the data folder {folder} holds extracts of other, unrecorded generator "
                f"settings ({', '.join(unrecorded)}); generating with these settings would mix "
                "two worlds in one warehouse. Use a new KEEL_HOME, or delete the folder's "
                "warehouse and generated data to start over."
            )
        temporary = folder / f".{SETTINGS_FILE}.{os.getpid()}.tmp"
        temporary.write_text(config.to_json())
        try:
            # A hard link never replaces an existing file: of two first generations, one wins.
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    recorded = recorded_config(folder)
    differences = settings_mismatch(recorded, config)
    if differences:
        raise mismatch_error(folder, differences)
    return config


def generate_day(config: GeneratorConfig, day: date, folder: Path, landing: Path) -> GeneratedDay:
    """Write one day's extracts (activity, arriving labels) and its late rows, if missing."""
    record_config(folder, config)
    folder = folder / config.fingerprint()
    activity_path = folder / "account_activity" / f"{day.isoformat()}.parquet"
    labels_path = folder / "default_labels" / f"{day.isoformat()}.parquet"
    landing_path = None
    if not activity_path.exists() or not labels_path.exists():
        accounts = build_accounts(config)
        on_time, late = split_late_rows(config, day, activity_table(config, day, accounts))
        if late.num_rows:
            file_format = LANDING_FORMATS[config.day_index(day) % len(LANDING_FORMATS)]
            landing_path = write_landing_file(
                late, landing, f"late_activity_{day.isoformat()}", file_format
            )
        write_table(on_time, activity_path)
        write_table(labels_table(config, day, accounts), labels_path)
    return GeneratedDay(activity=activity_path, labels=labels_path, landing=landing_path)


def generate_account_holders(config: GeneratorConfig, folder: Path) -> Path:
    """Write the account-holder snapshot, if missing."""
    record_config(folder, config)
    path = folder / config.fingerprint() / "account_holders.parquet"
    if not path.exists():
        write_table(account_holders_table(config), path)
    return path


def days(start: date, count: int) -> list[date]:
    """``count`` consecutive days from ``start``."""
    return [start + timedelta(days=i) for i in range(count)]
