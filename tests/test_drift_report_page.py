"""The drift report page: its header and Evidently's widget count the same columns."""

import re

import numpy as np
import pandas as pd

from keel import monitoring
from keel.monitoring import build_reference_profile, data_drift

NUMERIC = ["spend_30d", "utilisation", "transactions_7d"]
CATEGORICAL = ["product", "main_channel_30d"]


def _frame(rows: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "spend_30d": rng.lognormal(4.0 + shift, 1.0, rows),
            "utilisation": rng.beta(2.0, 5.0, rows),
            "transactions_7d": rng.poisson(6.0, rows).astype(float),
            "product": rng.choice(["classic", "gold", "platinum"], rows, p=[0.6, 0.3, 0.1]),
            "main_channel_30d": rng.choice(["online", "pos"], rows),
            "score": rng.beta(2, 8 - 4 * shift, rows),
        }
    )


def test_the_header_and_evidentlys_widget_count_the_same_columns(tmp_path):
    reference = _frame(1200, seed=1)
    profile = build_reference_profile(
        reference,
        NUMERIC,
        CATEGORICAL,
        champion_version="1",
        training_set_hash="abc",
        reference_scores=reference["score"],
        sample_rows=300,
    )
    current = _frame(600, seed=2, shift=0.5)
    drift = data_drift(profile, current)
    page = monitoring.write_drift_report(
        tmp_path / "drift.html", profile, current, drift, sample_rows=300
    ).read_text()

    header = re.search(r"drifted features</b>: (\d+) of (\d+)", page)
    widget = re.search(r"Drift is detected for [\d.]+% of columns \((\d+) out of (\d+)\)", page)
    assert header and widget, "the page lacks the header or Evidently's drift widget"
    assert int(header.group(2)) == int(widget.group(2)) == len(NUMERIC) + len(CATEGORICAL)
    # The score is not counted but still tested, in a widget of its own.
    assert "Value Drift for column score" in page
