"""The feature contract of a bundle: which inputs a request carries and how they become tensors.

This is the bundle's "tiny preprocessing step", in NumPy only, and it mirrors
``keel.training.FeatureEncoder`` operation for operation so that the ONNX graph sees exactly the
arrays the native model saw:

- numbers are float64; ``None`` and infinities (a ratio over zero) are missing (NaN);
- a category is its 1-based position in the vocabulary; missing or unseen categories are 0;
- LightGBM takes one matrix: the numbers, then the category codes, as float64;
- the network takes three tensors: standardised free numbers plus one missing flag per number
  (missing numbers standardise to 0), the standardised monotone numbers, and the int64 codes;
- on-demand features (ratios the feature store computes at request time) are computed here
  from the daily features when a request does not carry them:
  ``numerator / max(denominator * multiplier / divisor, floor)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class ContractError(ValueError):
    """A request that breaks the bundle's feature contract (missing feature, wrong type)."""


@dataclass(frozen=True)
class Ratio:
    """One on-demand feature: ``numerator / max(denominator * multiplier / divisor, floor)``."""

    name: str
    numerator: str
    denominator: str
    multiplier: float = 1.0
    divisor: float = 1.0
    floor: float = 1.0

    def compute(self, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        # Same operation order as the feature store's definition, so values match bit for bit.
        scaled = denominator * self.multiplier / self.divisor
        return numerator / np.maximum(scaled, self.floor)


@dataclass(frozen=True)
class Contract:
    """What ``contract.json`` holds (see `Contract.from_dict` for the layout)."""

    family: str
    numeric: tuple[str, ...]
    categories: tuple[tuple[str, tuple[str, ...]], ...]
    on_demand: tuple[Ratio, ...]
    logit_offset: float
    graph_inputs: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    monotone: tuple[str, ...] = ()

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The model's features in the order the graph takes them."""
        return (*self.numeric, *(name for name, _ in self.categories))

    @property
    def request_features(self) -> tuple[str, ...]:
        """What a request must carry: every feature except the on-demand ones."""
        derived = {ratio.name for ratio in self.on_demand}
        return tuple(name for name in self.feature_names if name not in derived)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Contract:
        features = data["features"]
        numeric = tuple(f["name"] for f in features if f["type"] == "number")
        categories = tuple(
            (f["name"], tuple(f["vocabulary"])) for f in features if f["type"] == "category"
        )
        order = [f["name"] for f in features]
        if order != [*numeric, *(name for name, _ in categories)]:
            raise ContractError("contract features must list every number before the categories")
        encoding = data.get("normalisation") or {}
        return cls(
            family=data["family"],
            numeric=numeric,
            categories=categories,
            on_demand=tuple(Ratio(**ratio) for ratio in data.get("on_demand", [])),
            logit_offset=float(data["logit_offset"]),
            graph_inputs=tuple(data["graph_inputs"]),
            mean=tuple(encoding.get("mean", ())),
            std=tuple(encoding.get("std", ())),
            monotone=tuple(data.get("monotone", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        features: list[dict[str, Any]] = [{"name": n, "type": "number"} for n in self.numeric]
        features += [
            {"name": name, "type": "category", "vocabulary": list(vocabulary)}
            for name, vocabulary in self.categories
        ]
        data: dict[str, Any] = {
            "family": self.family,
            "features": features,
            "on_demand": [ratio.__dict__ for ratio in self.on_demand],
            "logit_offset": self.logit_offset,
            "graph_inputs": list(self.graph_inputs),
        }
        if self.family == "torch":
            data["normalisation"] = {"mean": list(self.mean), "std": list(self.std)}
            data["monotone"] = list(self.monotone)
        return data

    # -- encoding --------------------------------------------------------------------------------

    def columns(self, rows: Any) -> dict[str, Any]:
        """Rows (a list of dicts) or columns (a mapping of name -> values) as columns."""
        if isinstance(rows, Mapping) or hasattr(rows, "columns"):
            return {name: rows[name] for name in self.feature_names if name in rows}
        if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
            if not all(isinstance(row, Mapping) for row in rows):
                raise ContractError("rows must be objects mapping feature names to values")
            present = set(self.feature_names).intersection(*rows) if rows else set()
            names = [name for name in self.feature_names if name in present]
            return {name: [row[name] for row in rows] for name in names}
        raise ContractError(f"expected a list of rows or a mapping of columns, got {type(rows)}")

    def numbers(self, columns: Mapping[str, Any]) -> np.ndarray:
        """The numeric features as float64 columns, infinities and None as NaN."""
        self._add_on_demand(columns)
        missing = [name for name in self.numeric if name not in columns]
        if missing:
            raise ContractError(f"request lacks features {', '.join(missing)}")
        arrays = [_floats(name, columns[name]) for name in self.numeric]
        lengths = {len(array) for array in arrays}
        if len(lengths) != 1:
            raise ContractError(f"features have different numbers of values: {sorted(lengths)}")
        matrix = np.column_stack(arrays)
        matrix[np.isinf(matrix)] = np.nan
        return matrix

    def codes(self, columns: Mapping[str, Any], rows: int) -> np.ndarray:
        """The categorical features as int64 codes (0 = unseen or missing)."""
        missing = [name for name, _ in self.categories if name not in columns]
        if missing:
            raise ContractError(f"request lacks features {', '.join(missing)}")
        codes = np.zeros((rows, len(self.categories)), dtype=np.int64)
        for index, (name, vocabulary) in enumerate(self.categories):
            lookup = {value: code for code, value in enumerate(vocabulary, start=1)}
            values = list(columns[name])
            if len(values) != rows:
                raise ContractError(f"feature {name!r} has {len(values)} values for {rows} rows")
            try:
                codes[:, index] = [lookup.get(value, 0) for value in values]
            except TypeError as error:
                raise ContractError(f"feature {name!r} holds a non-category value") from error
        return codes

    def graph_feeds(self, rows: Any) -> dict[str, np.ndarray]:
        """The ONNX graph's inputs for ``rows``."""
        columns = self.columns(rows)
        missing = [name for name in self.request_features if name not in columns]
        if missing:
            raise ContractError(f"request lacks features {', '.join(missing)}")
        numbers = self.numbers(columns)
        codes = self.codes(columns, len(numbers))
        if self.family == "lightgbm":
            matrix = np.hstack([numbers, codes.astype(np.float64)])
            return {self.graph_inputs[0]: matrix}
        missing = np.isnan(numbers)
        scaled = (numbers - np.asarray(self.mean)) / np.asarray(self.std)
        scaled[missing] = 0.0
        monotone_index = [self.numeric.index(name) for name in self.monotone]
        free_index = [i for i in range(len(self.numeric)) if i not in monotone_index]
        free = np.hstack([scaled[:, free_index], missing]).astype(np.float32)
        monotone = scaled[:, monotone_index].astype(np.float32)
        return dict(zip(self.graph_inputs, (free, monotone, codes), strict=True))

    def _add_on_demand(self, columns: dict[str, Any]) -> None:
        for ratio in self.on_demand:
            if ratio.name in columns:
                continue
            absent = [n for n in (ratio.numerator, ratio.denominator) if n not in columns]
            if absent:
                raise ContractError(
                    f"request lacks {', '.join(absent)}, needed for the on-demand {ratio.name!r}"
                )
            columns[ratio.name] = ratio.compute(
                _floats(ratio.numerator, columns[ratio.numerator]),
                _floats(ratio.denominator, columns[ratio.denominator]),
            )


def _floats(name: str, values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return values.astype(np.float64, copy=False)
    try:
        return np.array(
            [np.nan if value is None else value for value in values], dtype=np.float64
        ).reshape(-1)
    except (TypeError, ValueError) as error:
        raise ContractError(f"feature {name!r} must be numeric") from error


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """P(defaulted=1) from logits, in the tanh form that never overflows (as in Keel)."""
    return 0.5 * (1.0 + np.tanh(0.5 * logits))
