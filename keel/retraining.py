"""When monitoring results start a retraining: drift and decay episodes, debounced.

A drift or decay *episode* is a run of consecutive bad days. An episode starts at most one
retraining, once it has lasted ``min_days`` days (so a one-day blip does not retrain), and a
good day ends it. The state is small and serialisable: sensors keep it in their cursor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EpisodeState:
    """Where the current episode stands."""

    bad_days: int = 0
    triggered: bool = False
    last_partition: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> EpisodeState:
        return cls(**(data or {}))


def observe_day(
    state: EpisodeState, partition: str, bad: bool, min_days: int
) -> tuple[EpisodeState, bool]:
    """Fold one day's verdict into the episode; returns the new state and whether to retrain."""
    if not bad:
        return EpisodeState(0, False, partition), False
    bad_days = state.bad_days + 1
    trigger = not state.triggered and bad_days >= min_days
    return EpisodeState(bad_days, state.triggered or trigger, partition), trigger
