"""Canary guardrails: the canary against the champion over a sliding window of the prediction log.

Plain functions over the frame `keel.serving.prediction_log.read_prediction_log` returns (one
row per scored entity: ``ts``, ``arm``, ``model_version``, ``score``, ``latency_ms``,
``error``...). Four comparisons, each judged only once both arms have enough rows:

- error rate: the canary's share of rows whose model failed (the client got the champion's
  score instead), against an absolute bar and against the champion's own rate;
- p99 latency: canary over champion over the time span both arms cover, with enough rows in
  each for a p99 and a floor in milliseconds so that noise on a fast service never trips it;
- score distribution: population stability index of the canary's live scores against its own
  expected distribution, the histogram of its scores on the held-out window at evaluation
  (`score_histogram`, stored with the version), so it catches a canary that behaves
  differently online than offline; two differently trained models score the same traffic
  differently, so the PSI against the champion's scores is reported as evidence only;
- AUC, once labels have arrived for enough of the scored entities.

Rows answered from the prediction cache are left out: the model never ran for them. A canary
that breaches any of them is rolled back; one that breaches none and has answered
enough requests for long enough is promoted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

COLLECTING, HEALTHY, BREACHED, PROMOTE = "collecting", "healthy", "breached", "promote"
# Values of the GUARDRAIL_STATE gauge: none (no canary) < collecting < healthy < breached.
STATE_VALUES = {"none": 0.0, COLLECTING: 1.0, HEALTHY: 2.0, PROMOTE: 2.0, BREACHED: 3.0}
_PSI_FLOOR = 1e-4
# Version tag holding a version's `score_histogram` on its held-out window (JSON).
TAG_SCORE_HISTOGRAM = "keel.score_histogram"


class GuardrailError(ValueError):
    """A policy or log the guardrails cannot judge with."""


@dataclass(frozen=True)
class GuardrailPolicy:
    """When a canary is rolled back and when it is promoted.

    Attributes:
        window_minutes: The sliding window of the prediction log that is judged.
        min_requests: Rows each arm needs in the window before anything is judged.
        max_error_rate: Largest share of canary rows whose model failed.
        max_error_rate_excess: Largest canary error rate above the champion's.
        max_p99_ratio: Largest canary p99 latency as a multiple of the champion's.
        min_p99_excess_ms: A latency breach also needs the canary's p99 this much higher.
        min_latency_rows: Rows each arm needs, in the time span both arms cover, before their
            p99 latencies are compared: the p99 of a few hundred rows rests on a few requests,
            and one busy moment of the machine decides it.
        max_psi: Largest population stability index of the canary's live scores against its
            expected (held-out) score distribution.
        min_labelled: Labelled rows each arm needs before AUC is compared.
        max_auc_drop: Largest AUC the canary may lose against the champion.
        promote_after_requests: Canary rows answered since the start before promotion.
        promote_after_minutes: Minutes since the start before promotion.
    """

    window_minutes: float = 15.0
    min_requests: int = 200
    max_error_rate: float = 0.01
    max_error_rate_excess: float = 0.005
    max_p99_ratio: float = 1.5
    min_p99_excess_ms: float = 5.0
    min_latency_rows: int = 500
    max_psi: float = 0.2
    min_labelled: int = 200
    max_auc_drop: float = 0.02
    promote_after_requests: int = 2_000
    promote_after_minutes: float = 30.0

    def __post_init__(self) -> None:
        for name in ("window_minutes", "max_p99_ratio", "max_psi"):
            if not getattr(self, name) > 0:
                raise GuardrailError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_requests < 1 or self.min_labelled < 2 or self.min_latency_rows < 1:
            raise GuardrailError(
                "min_requests and min_latency_rows must be at least 1 and min_labelled at least 2"
            )
        if not 0 <= self.max_error_rate < 1:
            raise GuardrailError(f"max_error_rate must lie in [0, 1), got {self.max_error_rate}")
        if self.promote_after_requests < self.min_requests:
            raise GuardrailError("promote_after_requests must be at least min_requests")


@dataclass(frozen=True)
class Check:
    """One guardrail's verdict: the canary's and champion's values and the bar."""

    name: str
    passed: bool | None  # None: not enough rows to judge yet
    canary: float | None
    champion: float | None
    limit: float
    detail: str


@dataclass(frozen=True)
class Verdict:
    """What the guardrails say about one canary at one moment, with the evidence."""

    state: str
    canary_version: str
    champion_version: str
    canary_rows: int
    champion_rows: int
    canary_rows_since_start: int
    minutes_since_start: float
    window_start: str
    window_end: str
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def breaches(self) -> list[Check]:
        return [check for check in self.checks if check.passed is False]

    def summary(self) -> str:
        if self.state == BREACHED:
            return "; ".join(f"{c.name}: {c.detail}" for c in self.breaches)
        if self.state == PROMOTE:
            return (
                f"held for {self.canary_rows_since_start} requests and "
                f"{self.minutes_since_start:.1f} min with every guardrail passed"
            )
        judged = sum(c.passed is not None for c in self.checks)
        return f"{self.state}: {judged}/{len(self.checks)} guardrails judged, none breached"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checks"] = [asdict(check) for check in self.checks]
        data["summary"] = self.summary()
        return _finite(data)


def _finite(value: Any) -> Any:
    """NaN and infinities as None, so evidence is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def score_histogram(scores: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """A score distribution as PSI needs it: inner edges at its quantiles, share per bin."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise GuardrailError("a score histogram needs scores")
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, scores, side="right"), minlength=edges.size + 1)
    return {"edges": edges.tolist(), "shares": (counts / scores.size).tolist()}


def psi_against_histogram(histogram: dict[str, list[float]], current: np.ndarray) -> float:
    """PSI of ``current`` against a stored `score_histogram`."""
    import numpy as np

    edges = np.asarray(histogram["edges"], dtype=np.float64)
    expected = np.asarray(histogram["shares"], dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if current.size == 0:
        raise GuardrailError("PSI needs values on both sides")
    if expected.size != edges.size + 1:
        raise GuardrailError(
            f"a score histogram has one share more than inner edges, got {expected.size} "
            f"shares and {edges.size} edges"
        )
    counts = np.bincount(np.searchsorted(edges, current, side="right"), minlength=edges.size + 1)
    expected = np.maximum(expected, _PSI_FLOOR)
    actual = np.maximum(counts / current.size, _PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def population_stability_index(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of ``current`` against ``reference``, bins at the reference's quantiles."""
    import numpy as np

    if np.asarray(reference).size == 0 or np.asarray(current).size == 0:
        raise GuardrailError("PSI needs values on both sides")
    return psi_against_histogram(score_histogram(reference, bins), current)


def _error_check(canary: pd.DataFrame, champion: pd.DataFrame, policy: GuardrailPolicy) -> Check:
    canary_rate = float(canary["error"].notna().mean())
    champion_rate = float(champion["error"].notna().mean())
    passed = (
        canary_rate <= policy.max_error_rate
        or canary_rate - champion_rate <= policy.max_error_rate_excess
    )
    return Check(
        "error_rate",
        passed,
        canary_rate,
        champion_rate,
        policy.max_error_rate,
        f"canary {canary_rate:.2%} of {len(canary)} rows failed, champion {champion_rate:.2%} "
        f"(bar {policy.max_error_rate:.2%}, or {policy.max_error_rate_excess:.2%} above champion)",
    )


def _latency_check(canary: pd.DataFrame, champion: pd.DataFrame, policy: GuardrailPolicy) -> Check:
    """p99 request latency of both arms over the same span of time.

    Load on the machine moves every request's latency; comparing the arms over the span both
    cover (not a champion hour against a canary minute) keeps that out of the ratio.
    """
    import numpy as np

    start = max(canary["ts"].min(), champion["ts"].min())
    end = min(canary["ts"].max(), champion["ts"].max())
    canary = canary[canary["ts"].between(start, end)]
    champion = champion[champion["ts"].between(start, end)]
    if min(len(canary), len(champion)) < policy.min_latency_rows:
        return Check(
            "p99_latency_ms",
            None,
            None,
            None,
            policy.max_p99_ratio,
            f"{len(canary)} canary and {len(champion)} champion rows in the span both arms "
            f"cover; a p99 needs {policy.min_latency_rows} of each",
        )
    canary_p99 = float(np.quantile(canary["latency_ms"].to_numpy(dtype=float), 0.99))
    champion_p99 = float(np.quantile(champion["latency_ms"].to_numpy(dtype=float), 0.99))
    ratio = canary_p99 / champion_p99 if champion_p99 > 0 else math.inf
    passed = not (
        ratio > policy.max_p99_ratio and canary_p99 - champion_p99 > policy.min_p99_excess_ms
    )
    return Check(
        "p99_latency_ms",
        passed,
        canary_p99,
        champion_p99,
        policy.max_p99_ratio,
        f"canary p99 {canary_p99:.1f} ms is {ratio:.2f}x the champion's {champion_p99:.1f} ms "
        f"over the same {len(canary)} / {len(champion)} rows' span "
        f"(bar {policy.max_p99_ratio:g}x and +{policy.min_p99_excess_ms:g} ms)",
    )


def _psi_check(
    canary: pd.DataFrame,
    champion: pd.DataFrame,
    policy: GuardrailPolicy,
    expected: dict[str, list[float]] | None,
) -> Check:
    """The canary's PSI against its expected scores (judged), and against the champion's.

    The champion comparison is evidence only: a retrained model scores differently.
    """
    # Rows where the canary failed carry the champion's fallback score: leave them out.
    canary_scores = canary.loc[canary["error"].isna(), "score"].dropna().to_numpy(dtype=float)
    champion_scores = champion["score"].dropna().to_numpy(dtype=float)
    if canary_scores.size < policy.min_requests or champion_scores.size < policy.min_requests:
        return Check("score_psi", None, None, None, policy.max_psi, "too few scores yet")
    versus_champion = population_stability_index(champion_scores, canary_scores)
    evidence = f"against the champion's live scores {versus_champion:.3f} (evidence only)"
    if expected is None:
        return Check(
            "score_psi",
            None,
            None,
            versus_champion,
            policy.max_psi,
            f"no expected score distribution stored with the canary's version; PSI {evidence}",
        )
    psi = psi_against_histogram(expected, canary_scores)
    return Check(
        "score_psi",
        psi <= policy.max_psi,
        psi,
        versus_champion,
        policy.max_psi,
        f"PSI of the canary's live scores against its held-out scores is {psi:.3f} "
        f"(bar {policy.max_psi:g}); {evidence}",
    )


def _auc_check(
    canary: pd.DataFrame,
    champion: pd.DataFrame,
    labels: pd.DataFrame | None,
    policy: GuardrailPolicy,
) -> Check:
    from sklearn.metrics import roc_auc_score

    no_labels = Check("auc", None, None, None, policy.max_auc_drop, "no labels yet")
    if labels is None or labels.empty:
        return no_labels
    known = labels.drop_duplicates("account_id", keep="last").set_index("account_id")["label"]
    aucs = []
    for rows in (canary[canary["error"].isna()], champion):
        joined = rows.dropna(subset=["account_id", "score"])
        joined = joined.assign(label=joined["account_id"].map(known)).dropna(subset=["label"])
        if len(joined) < policy.min_labelled or joined["label"].nunique() < 2:
            return Check(
                "auc", None, None, None, policy.max_auc_drop, f"{len(joined)} labelled rows"
            )
        aucs.append(float(roc_auc_score(joined["label"].astype(int), joined["score"])))
    canary_auc, champion_auc = aucs
    return Check(
        "auc",
        champion_auc - canary_auc <= policy.max_auc_drop,
        canary_auc,
        champion_auc,
        policy.max_auc_drop,
        f"canary AUC {canary_auc:.3f} against champion {champion_auc:.3f} "
        f"(may lose at most {policy.max_auc_drop:g})",
    )


def evaluate_canary(
    log: pd.DataFrame,
    canary_version: str,
    champion_version: str,
    started_at: datetime,
    policy: GuardrailPolicy,
    now: datetime | None = None,
    labels: pd.DataFrame | None = None,
    expected_scores: dict[str, list[float]] | None = None,
    canary_rows_before: int = 0,
) -> Verdict:
    """Judge the canary on the prediction log.

    Args:
        log: Prediction-log rows since the canary started (`read_prediction_log`).
        canary_version: The canary's registry version.
        champion_version: The champion's registry version.
        started_at: When the canary started taking traffic (UTC).
        policy: The bars and the promotion rule.
        now: The end of the window (default: the current time).
        labels: ``account_id`` and ``label`` (0/1) of entities whose outcome is known.
        expected_scores: The canary's `score_histogram` on the held-out window; without it
            the score distribution is reported, not judged.
        canary_rows_before: Canary rows since the start that ``log`` no longer holds (a
            reader that keeps only the window counts them); they count towards promotion.
    """
    import pandas as pd

    now = now or datetime.now(UTC)
    window_start = max(started_at, now - timedelta(minutes=policy.window_minutes))
    since_start = log[log["ts"] >= pd.Timestamp(started_at)]
    is_canary = (since_start["arm"] == "canary") & (
        since_start["model_version"].astype(str) == str(canary_version)
    )
    is_champion = (since_start["arm"] == "champion") & (
        since_start["model_version"].astype(str) == str(champion_version)
    )
    # A cached score never reached the model: it says nothing of the model's errors or speed.
    judged = (since_start["ts"] >= pd.Timestamp(window_start)) & ~since_start["cache_hit"].astype(
        bool
    )
    canary, champion = since_start[is_canary & judged], since_start[is_champion & judged]
    enough = len(canary) >= policy.min_requests and len(champion) >= policy.min_requests
    if enough:
        checks = (
            _error_check(canary, champion, policy),
            _latency_check(canary, champion, policy),
            _psi_check(canary, champion, policy, expected_scores),
            _auc_check(canary, champion, labels, policy),
        )
    else:
        checks = tuple(
            Check(name, None, None, None, limit, f"{len(canary)} canary / {len(champion)} rows")
            for name, limit in (
                ("error_rate", policy.max_error_rate),
                ("p99_latency_ms", policy.max_p99_ratio),
                ("score_psi", policy.max_psi),
                ("auc", policy.max_auc_drop),
            )
        )
    rows_since_start = int(is_canary.sum()) + canary_rows_before
    minutes = (now - started_at).total_seconds() / 60.0
    if any(check.passed is False for check in checks):
        state = BREACHED
    elif not enough:
        state = COLLECTING
    elif (
        rows_since_start >= policy.promote_after_requests
        and minutes >= policy.promote_after_minutes
    ):
        state = PROMOTE
    else:
        state = HEALTHY
    return Verdict(
        state=state,
        canary_version=str(canary_version),
        champion_version=str(champion_version),
        canary_rows=len(canary),
        champion_rows=len(champion),
        canary_rows_since_start=rows_since_start,
        minutes_since_start=round(minutes, 3),
        window_start=window_start.isoformat(),
        window_end=now.isoformat(),
        checks=checks,
    )
