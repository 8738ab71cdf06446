"""A dataset's models judged by its own gates and fairness policy, on the same held-out rows.

The split follows the label's timing: rows ordered by the time their outcome became known,
the earliest for training, so no training label postdates a validation one. A snapshot, where
every outcome became known at once, is split by a stable hash of the entity key instead (each
entity lands in one part, whichever load it comes from). The decision threshold comes from the
validation part; quality and fairness are judged on the held-out test part, with the dataset's
gate bounds (``gates`` in dataset.yaml) over the defaults.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from keel.datasets.spec import DatasetSpec


class Scorer(Protocol):
    """A fitted model of any family (``keel.datasets.families.DatasetModel``)."""

    def predict(self, rows: pd.DataFrame) -> np.ndarray: ...


SHARES = (0.7, 0.15)  # train, validation; the rest is the test part


class DatasetModelError(ValueError):
    """A training set this module cannot fit or judge a model on."""


@dataclass
class Judgement:
    """The model's scores on the held-out part, its gates and its fairness by attribute."""

    metrics: dict[str, float]
    threshold: dict[str, Any]
    gates: list[dict[str, Any]]
    fairness: dict[str, Any]
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(gate["passed"] for gate in self.gates)


def _bucket(value: object) -> float:
    digest = hashlib.sha256(str(value).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(spec: DatasetSpec, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Train, validation and test parts (see the module docstring)."""
    if frame.empty:
        raise DatasetModelError(f"the {spec.name} training set has no rows")
    known = pd.to_datetime(frame[spec.event_time], utc=True)
    train_share, validation_share = SHARES
    if known.nunique() >= 3:
        rank = known.rank(method="min", pct=True)
    else:
        rank = frame[spec.entity_key].map(_bucket)
    parts = {
        "train": frame[rank <= train_share],
        "validation": frame[(rank > train_share) & (rank <= train_share + validation_share)],
        "test": frame[rank > train_share + validation_share],
    }
    for name, part in parts.items():
        if part[spec.label.column].nunique() < 2:
            raise DatasetModelError(
                f"the {name} part of {spec.name} has {len(part)} rows and not both label values"
            )
    return parts


def judge(spec: DatasetSpec, model: Scorer, parts: dict[str, pd.DataFrame]) -> Judgement:
    """Quality and fairness on the test part against the dataset's gate policy."""
    from sklearn.metrics import roc_auc_score

    from keel.evaluation.comparison import fairness_gate
    from keel.evaluation.fairness import fairness_report
    from keel.evaluation.metrics import choose_threshold

    policy = spec.gate_policy()
    label = spec.label.column
    validation, test = parts["validation"], parts["test"]
    threshold = choose_threshold(
        validation[label].to_numpy(),
        model.predict(validation),
        policy.threshold_strategy,
        policy.fixed_threshold,
    )
    labels, scores = test[label].to_numpy(), model.predict(test)
    predicted = (scores >= threshold["value"]).astype(int)
    auc = float(roc_auc_score(labels, scores))
    fairness = fairness_report(
        labels,
        predicted,
        test[list(spec.protected_attributes)].reset_index(drop=True),
        policy.fairness_min_group_rows,
        policy.fairness_min_group_positives,
        samples=policy.bootstrap_samples,
        confidence=policy.confidence,
    )
    _add_group_auc(fairness, labels, scores, test[list(spec.protected_attributes)])
    bounds = {
        "demographic_parity_difference": policy.max_demographic_parity_difference,
        "equalized_odds_difference": policy.max_equalized_odds_difference,
    }
    for result in fairness.values():
        result["verdict"] = _verdict(result, bounds)
    quality = {
        "name": "minimum_quality",
        "passed": auc >= policy.min_roc_auc,
        "value": auc,
        "limit": policy.min_roc_auc,
        "detail": f"ROC AUC {auc:.3f} on {len(test)} held-out rows (bar {policy.min_roc_auc:g})",
    }
    return Judgement(
        metrics={
            "roc_auc": auc,
            "label_rate": float(labels.mean()),
            "selection_rate": float(predicted.mean()),
        },
        threshold=threshold,
        gates=[quality, fairness_gate(fairness, policy)],
        fairness=fairness,
        rows={name: len(part) for name, part in parts.items()},
    )


def _add_group_auc(
    fairness: dict[str, Any], labels: np.ndarray, scores: np.ndarray, protected: pd.DataFrame
) -> None:
    """Each group's ROC AUC on its own rows (None with a single label value), in place."""
    from sklearn.metrics import roc_auc_score

    for attribute, result in fairness.items():
        # The groups as the fairness report names them.
        groups = protected[attribute].astype("string").fillna("(missing)").to_numpy()
        for group in result["groups"]:
            rows = groups == group["group"]
            both = len(np.unique(labels[rows])) == 2
            group["auc"] = float(roc_auc_score(labels[rows], scores[rows])) if both else None


def _verdict(result: dict[str, Any], bounds: dict[str, float]) -> str:
    """An attribute's verdict as the fairness gate decides it (the low end above a bound)."""
    if result["intervals"] is None:
        return "not judged"
    breached = any(result["intervals"][name][0] > bound for name, bound in bounds.items())
    return "failed" if breached else "passed"


def fairness_markdown(judgement: Judgement) -> str:
    """One table per protected attribute, and its disparities with their intervals."""
    from keel.reporting import markdown_table

    sections = []
    for attribute, result in judgement.fairness.items():
        rows = [
            [
                g["group"],
                g["count"],
                g["positives"],
                f"{g['positives'] / g['count']:.1%}" if g["count"] else "",
                f"{g['selection_rate']:.1%}",
                "" if g.get("auc") is None else f"{g['auc']:.3f}",
                f"{g['tpr']:.1%}",
                f"{g['fpr']:.1%}",
                "yes" if g["judged"] else "too few",
            ]
            for g in result["groups"]
        ]
        header = ["group", "rows", "positives", "positive rate", "flagged", "AUC", "TPR", "FPR"]
        table = markdown_table([*header, "judged"], rows)
        verdict = result.get("verdict", "")
        lines = [f"### {attribute}: {verdict}" if verdict else f"### {attribute}", "", table, ""]
        for name in ("demographic_parity_difference", "equalized_odds_difference"):
            if result[name] is None:
                lines.append(f"- {name.replace('_', ' ')}: not judged (fewer than two groups)")
                continue
            low, high = result["intervals"][name]
            lines.append(f"- {name.replace('_', ' ')}: {result[name]:.3f} [{low:.3f}, {high:.3f}]")
        sections.append("\n".join(lines))
    gate = next(g for g in judgement.gates if g["name"] == "fairness")
    verdict = "passed" if gate["passed"] else "**failed**"
    return "\n\n".join([f"Fairness gate {verdict}: {gate['detail']}.", *sections])


def families_markdown(judgements: dict[str, Judgement], champion: str | None) -> str:
    """Every family's fairness report under its own heading, the champion named."""
    sections = []
    for family, judgement in judgements.items():
        role = "champion" if family == champion else "challenger"
        auc = judgement.metrics["roc_auc"]
        verdict = "passed every gate" if judgement.passed else "**failed a gate**"
        heading = f"## {family} ({role}): ROC AUC {auc:.3f}, {verdict}"
        sections.append(f"{heading}\n\n{fairness_markdown(judgement)}")
    if champion is None:
        sections.insert(0, "No family passed every gate: nothing is registered.")
    return "\n\n".join(sections)


def newest_rows(spec: DatasetSpec, features: pd.DataFrame) -> pd.DataFrame:
    """Each entity's newest feature row: what a snapshot load is scored and monitored on."""
    ordered = features.sort_values([spec.entity_key, spec.event_time])
    return ordered.drop_duplicates(spec.entity_key, keep="last").reset_index(drop=True)


def population_stability(reference: pd.Series, current: pd.Series, bins: int = 10) -> float:
    """The population stability index of ``current`` against ``reference``.

    Numbers fall into the reference's deciles, categories count as themselves; an empty bin
    counts as half a row, so the logarithm stays finite.
    """
    if pd.api.types.is_numeric_dtype(reference):
        ref = pd.to_numeric(reference, errors="coerce").dropna().to_numpy(float)
        cur = pd.to_numeric(current, errors="coerce").dropna().to_numpy(float)
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
        edges[0], edges[-1] = -np.inf, np.inf
        expected = np.histogram(ref, edges)[0].astype(float)
        actual = np.histogram(cur, edges)[0].astype(float)
    else:
        categories = sorted(set(reference.dropna()) | set(current.dropna()), key=str)
        expected = reference.value_counts().reindex(categories, fill_value=0).to_numpy(float)
        actual = current.value_counts().reindex(categories, fill_value=0).to_numpy(float)
    expected = np.maximum(expected, 0.5) / max(expected.sum(), 1.0)
    actual = np.maximum(actual, 0.5) / max(actual.sum(), 1.0)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def feature_drift(
    spec: DatasetSpec, reference: pd.DataFrame, current: pd.DataFrame, threshold: float = 0.2
) -> list[dict[str, Any]]:
    """PSI per feature of a scored load against the training set; above ``threshold`` drifts."""
    rows = []
    for name in spec.features:
        value = population_stability(reference[name], current[name])
        rows.append({"feature": name, "psi": value, "drifted": value > threshold})
    return rows
