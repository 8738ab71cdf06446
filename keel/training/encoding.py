"""Feature encoding: one frame of model features to numeric arrays, at fit and predict time."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from keel.schema import (
    CATEGORICAL_FEATURES,
    CHANNELS,
    NUMERIC_FEATURES,
    PRODUCTS,
)
from keel.training.options import MONOTONE_INCREASING, TrainingDataError

CATEGORY_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "product": PRODUCTS,
    "main_channel_30d": CHANNELS,
}


@dataclass(frozen=True)
class FeatureEncoder:
    """Turns a frame of model features into numeric arrays, the same way at fit and predict time.

    Categories map to ``1..k`` by the schema's vocabulary; an unseen or missing category is
    ``0``. Numeric infinities (ratios over a zero denominator) count as missing. The network
    also needs ``mean``/``std`` (learnt from the training window) to standardise numbers.
    """

    numeric: tuple[str, ...] = NUMERIC_FEATURES
    categories: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
        (name, CATEGORY_VOCABULARIES[name]) for name in CATEGORICAL_FEATURES
    )
    monotone: tuple[str, ...] = MONOTONE_INCREASING
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    @property
    def categorical(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.categories)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Embedding table sizes: every known category plus the unknown code 0."""
        return tuple(len(vocabulary) + 1 for _, vocabulary in self.categories)

    def numeric_matrix(self, frame: pd.DataFrame, extra_columns: int = 0) -> np.ndarray:
        """Numeric features as float64 columns, infinities replaced by NaN.

        Args:
            frame: Rows to encode.
            extra_columns: Empty columns left at the right for the caller to fill.
        """
        self._check_columns(frame)
        matrix = np.empty((len(frame), len(self.numeric) + extra_columns), dtype=np.float64)
        for index, name in enumerate(self.numeric):
            try:
                matrix[:, index] = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError) as error:
                raise TrainingDataError(
                    f"feature {name!r} must be numeric, got dtype {frame[name].dtype}"
                ) from error
        numbers = matrix[:, : len(self.numeric)]
        numbers[np.isinf(numbers)] = np.nan
        return matrix

    def category_codes(self, frame: pd.DataFrame) -> np.ndarray:
        """Categorical features as int64 codes (0 = unseen or missing)."""
        self._check_columns(frame)
        codes = np.empty((len(frame), len(self.categories)), dtype=np.int64)
        for index, (name, vocabulary) in enumerate(self.categories):
            codes[:, index] = pd.Categorical(frame[name], categories=vocabulary).codes + 1
        return codes

    def lightgbm_matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """The LightGBM design matrix: numeric columns, then category codes."""
        matrix = self.numeric_matrix(frame, extra_columns=len(self.categories))
        matrix[:, len(self.numeric) :] = self.category_codes(frame)
        return matrix

    def fitted(self, train: pd.DataFrame) -> FeatureEncoder:
        """A copy that standardises with the training window's mean and standard deviation."""
        numbers = self.numeric_matrix(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-null columns are fine here
            mean = np.nanmean(numbers, axis=0)
            std = np.nanstd(numbers, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        return FeatureEncoder(
            numeric=self.numeric,
            categories=self.categories,
            monotone=self.monotone,
            mean=tuple(float(value) for value in mean),
            std=tuple(float(value) for value in std),
        )

    def network_arrays(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Network inputs: (free numbers + missing flags, monotone numbers, category codes).

        Monotone features reach the network only through its monotone block, so the score can
        never fall as they rise; their missing flags go with the free numbers.
        """
        if not self.mean:
            raise ValueError("call FeatureEncoder.fitted(train) before network_arrays")
        numbers = self.numeric_matrix(frame)
        missing = np.isnan(numbers)
        scaled = (numbers - np.asarray(self.mean)) / np.asarray(self.std)
        scaled[missing] = 0.0
        monotone_index = [self.numeric.index(name) for name in self.monotone]
        free_index = [i for i in range(len(self.numeric)) if i not in monotone_index]
        free = np.hstack([scaled[:, free_index], missing]).astype(np.float32)
        monotone = scaled[:, monotone_index].astype(np.float32)
        return free, monotone, self.category_codes(frame)

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            # Pairs, not a mapping: the column order must survive sorted JSON keys.
            "categories": [[name, list(vocabulary)] for name, vocabulary in self.categories],
            "monotone": list(self.monotone),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureEncoder:
        return cls(
            numeric=tuple(data["numeric"]),
            categories=tuple((name, tuple(vocab)) for name, vocab in data["categories"]),
            monotone=tuple(data["monotone"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )

    def _check_columns(self, frame: pd.DataFrame) -> None:
        missing = [name for name in self.feature_names if name not in frame.columns]
        if missing:
            raise TrainingDataError(f"frame lacks model features {', '.join(missing)}")


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # tanh form: no overflow for large negative logits.
    return 0.5 * (1.0 + np.tanh(0.5 * logits))
