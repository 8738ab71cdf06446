"""Streaming window features as plain functions, and their batch recomputation.

Every value is taken as of the account's newest event: spend and transaction count over the
hour that ends with it, and over its UTC day up to it. Amounts are integer cents, so sums are
exact whatever order the events are added in, and a stream and a batch agree to the cent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

HOUR_US = 3_600 * 1_000_000
DAY_US = 24 * HOUR_US

# The push source's offline files, under the data folder ($KEEL_HOME).
OFFLINE_FOLDER = "streaming/account_stream"
FEATURE_VIEW = "account_stream_fv"
PUSH_SOURCE = "account_stream_push"
# Feature name -> Feast type name; counts are integers, money is float euros.
FEATURES = {
    "spend_1h": "Float64",
    "transactions_1h": "Int64",
    "spend_today": "Float64",
    "transactions_today": "Int64",
}


def day_start_us(event_us: np.ndarray | int) -> np.ndarray | int:
    """The start of the UTC day that holds each instant (microseconds since 1970)."""
    return event_us - event_us % DAY_US


def recompute(
    account_id: np.ndarray, event_us: np.ndarray, amount_cents: np.ndarray
) -> pd.DataFrame:
    """The streaming features of every account from all its events at once, as a batch job would.

    Returns one row per account: ``account_id``, ``event_us`` (its newest event) and the
    features, sorted by account.
    """
    import pandas as pd

    events = pd.DataFrame(
        {
            "account_id": np.asarray(account_id, dtype=np.int64),
            "event_us": np.asarray(event_us, dtype=np.int64),
            "cents": np.asarray(amount_cents, dtype=np.int64),
        }
    )
    newest = events.groupby("account_id")["event_us"].max().rename("newest")
    events = events.join(newest, on="account_id")
    in_hour = (events["event_us"] > events["newest"] - HOUR_US) & (
        events["event_us"] <= events["newest"]
    )
    in_day = events["event_us"] >= day_start_us(events["newest"])
    grouped = pd.DataFrame(
        {
            "account_id": events["account_id"],
            "hour_cents": events["cents"].where(in_hour, 0),
            "hour_count": in_hour.astype(np.int64),
            "day_cents": events["cents"].where(in_day, 0),
            "day_count": in_day.astype(np.int64),
        }
    ).groupby("account_id", sort=True)
    sums = grouped.sum()
    return pd.DataFrame(
        {
            "account_id": sums.index.to_numpy(),
            "event_us": newest.loc[sums.index].to_numpy(),
            "spend_1h": sums["hour_cents"].to_numpy() / 100.0,
            "transactions_1h": sums["hour_count"].to_numpy(),
            "spend_today": sums["day_cents"].to_numpy() / 100.0,
            "transactions_today": sums["day_count"].to_numpy(),
        }
    )
