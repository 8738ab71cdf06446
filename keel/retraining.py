"""When monitoring results start a retraining: drift and decay episodes, debounced.

A drift or decay *episode* is a run of consecutive bad calendar days (partitions), whatever
order their reports come in: a day reported twice counts once, with its latest verdict, and a
backfilled day can join or split episodes. An episode starts at most one retraining, once it
spans ``min_days`` days (so a one-day blip does not retrain); a good day ends it. The state
is small, bounded and serialisable: sensors keep it in their cursor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import date, timedelta

# Verdicts older than this many days before the newest day seen are forgotten: an episode
# longer than this is still one episode, because its covered days move along with it.
HISTORY_DAYS = 120


@dataclass(frozen=True)
class Episode:
    """An episode that needs a retraining.

    ``start`` is its first day, ``partition`` the day that completed it, and ``since`` when its
    first bad report was seen: a retraining queued before that does not cover it.
    """

    start: str
    partition: str
    since: float

    def to_dict(self) -> dict:
        return {"start": self.start, "partition": self.partition, "since": self.since}


@dataclass(frozen=True)
class EpisodeState:
    """The latest verdict of each recent day, and the days whose episode has a retraining."""

    verdicts: dict[str, bool] = field(default_factory=dict)
    # When each bad day's bad verdict was first seen (seconds since the epoch).
    bad_since: dict[str, float] = field(default_factory=dict)
    # Days of episodes that already have a retraining (requested, waiting or covered).
    covered: tuple[str, ...] = ()
    # The episode whose retraining waits for a retraining queued before it to finish.
    pending: Episode | None = None

    def to_dict(self) -> dict:
        return {
            "verdicts": dict(sorted(self.verdicts.items())),
            "bad_since": dict(sorted(self.bad_since.items())),
            "covered": sorted(self.covered),
            "pending": self.pending.to_dict() if self.pending else None,
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> EpisodeState:
        """The state from a cursor; a cursor in an older format starts afresh."""
        data = data or {}
        if set(data) - {f.name for f in fields(cls)}:
            return cls()
        pending = data.get("pending")
        return cls(
            verdicts=dict(data.get("verdicts", {})),
            bad_since=dict(data.get("bad_since", {})),
            covered=tuple(data.get("covered", ())),
            pending=Episode(**pending) if pending else None,
        )

    def episode_of(self, day: str) -> list[str]:
        """The consecutive bad days around ``day`` (empty when ``day`` is not bad)."""
        if not self.verdicts.get(day):
            return []
        start = end = date.fromisoformat(day)
        while self.verdicts.get((start - timedelta(days=1)).isoformat()):
            start -= timedelta(days=1)
        while self.verdicts.get((end + timedelta(days=1)).isoformat()):
            end += timedelta(days=1)
        return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def observe_day(
    state: EpisodeState, partition: str, bad: bool, min_days: int, seen_at: float = 0.0
) -> tuple[EpisodeState, Episode | None]:
    """Fold one day's verdict into the state; returns it and the episode to retrain, if any.

    Args:
        state: The state so far.
        partition: The day (ISO date) the verdict is about.
        bad: Whether the day is drifted (or decayed).
        min_days: Consecutive bad days an episode needs before it retrains.
        seen_at: When the verdict was reported (seconds since the epoch).
    """
    date.fromisoformat(partition)  # a clear error for a key that is not a day
    bad = bool(bad)  # NumPy booleans do not go into a JSON cursor
    verdicts = {**state.verdicts, partition: bad}
    bad_since = {d: t for d, t in state.bad_since.items() if d != partition or bad}
    if bad:
        bad_since.setdefault(partition, seen_at)
    state = _forget_old_days(replace(state, verdicts=verdicts, bad_since=bad_since))
    days = state.episode_of(partition)
    if not days:
        return state, None
    covered = set(state.covered)
    if covered & set(days):
        # The episode already has its retraining; the days it grew by are covered too.
        return replace(state, covered=tuple(sorted(covered | set(days)))), None
    if len(days) < min_days:
        return state, None
    episode = Episode(days[0], partition, min(bad_since[d] for d in days))
    return replace(state, covered=tuple(sorted(covered | set(days)))), episode


def _forget_old_days(state: EpisodeState) -> EpisodeState:
    newest = max(date.fromisoformat(day) for day in state.verdicts)
    oldest = (newest - timedelta(days=HISTORY_DAYS)).isoformat()
    return replace(
        state,
        verdicts={d: v for d, v in state.verdicts.items() if d >= oldest},
        bad_since={d: t for d, t in state.bad_since.items() if d >= oldest},
        covered=tuple(d for d in state.covered if d >= oldest),
    )
