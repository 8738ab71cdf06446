"""The consumer's durable state: an event log in SQLite, keyed by event id.

Delivery is at least once, so the same event can arrive again (after a crash before its ack).
The log recognises it by its id and keeps one copy; the features are then recomputed from the
log for the accounts a batch touched, never incremented, so a redelivered event changes
nothing. One transaction per batch: a process killed mid-batch leaves the log as it was before
the batch, and the batch comes back because it was never acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from keel.streaming.features import DAY_US, HOUR_US

# Events this far behind the newest one logged are set aside (rejected) as too late. An event
# taken just inside this horizon reads its day window, which starts up to a day before it: the
# log keeps a day more than the horizon, so that window is still whole.
HORIZON_US = 2 * DAY_US
KEEP_US = HORIZON_US + DAY_US

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, account_id INTEGER NOT NULL, event_us INTEGER NOT NULL,
    cents INTEGER NOT NULL, stream_seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_account ON events (account_id, event_us);
-- The newest event, read every batch, without a scan of the log.
CREATE INDEX IF NOT EXISTS events_by_time ON events (event_us);
CREATE TABLE IF NOT EXISTS rejected (
    stream_seq INTEGER PRIMARY KEY, body BLOB NOT NULL, reason TEXT NOT NULL,
    rejected_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS progress (
    name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The features of the touched accounts as of each one's newest logged event, from the log, as
# one JSON array of rows: fetched row by row, the rows would hand the interpreter lock back and
# forth between SQLite and Python once each.
_WINDOWS = f"""
WITH touched(account_id) AS (SELECT DISTINCT value FROM json_each(?)),
newest AS (
    SELECT e.account_id, max(e.event_us) AS t FROM events e JOIN touched USING (account_id)
    GROUP BY e.account_id),
windows AS (
    SELECT n.account_id AS account_id, n.t AS t,
        sum(CASE WHEN e.event_us > n.t - {HOUR_US} THEN e.cents ELSE 0 END) AS hour_cents,
        sum(e.event_us > n.t - {HOUR_US}) AS hour_count,
        sum(CASE WHEN e.event_us >= n.t - n.t % {DAY_US} THEN e.cents ELSE 0 END) AS day_cents,
        sum(e.event_us >= n.t - n.t % {DAY_US}) AS day_count
    FROM newest n JOIN events e ON e.account_id = n.account_id
        AND e.event_us > min(n.t - {HOUR_US}, n.t - n.t % {DAY_US} - 1) AND e.event_us <= n.t
    GROUP BY n.account_id)
SELECT json_group_array(json_array(account_id, t, hour_cents, hour_count, day_cents, day_count))
FROM windows
"""
# Events per INSERT statement (at most): one statement runs all its rows inside SQLite, away from
# Python's interpreter lock, which a row-by-row insert waits for again after every row.
_CHUNK = 1_024


class EventLog:
    """The event log of one durable consumer (one SQLite file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The consumer hands batches to a worker thread, one at a time.
        self.connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch survives a power cut, not only a killed process.
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.executescript(_SCHEMA)

    def close(self) -> None:
        self.connection.close()

    def begin(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.connection.execute("COMMIT")

    def rollback(self) -> None:
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")

    def newest_us(self) -> int | None:
        (value,) = self.connection.execute("SELECT max(event_us) FROM events").fetchone()
        return value

    def add(self, events: list[tuple[str, int, int, int, int]]) -> int:
        """Log ``(event_id, account_id, event_us, cents, stream_seq)`` rows; count the new ones."""
        before = self.connection.total_changes
        for start in range(0, len(events), _CHUNK):
            chunk = events[start : start + _CHUNK]
            rows = ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk))
            values = [value for event in chunk for value in event]
            self.connection.execute(f"INSERT OR IGNORE INTO events VALUES {rows}", values)
        new = self.connection.total_changes - before
        # Every event ever counted, in the same transaction: the log forgets old events, this
        # count does not, so a lost or doubled event shows here.
        self.connection.execute(
            "INSERT INTO progress VALUES ('events_counted', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
            (new,),
        )
        return new

    def reject(self, stream_seq: int, body: bytes, reason: str) -> None:
        """Keep an unreadable or too-late message with the reason, so nothing is lost silently."""
        self.connection.execute(
            "INSERT OR IGNORE INTO rejected VALUES (?, ?, ?, ?)",
            (stream_seq, body, reason, time.time()),
        )

    def windows(self, accounts: list[int]) -> list[tuple[int, int, int, int, int, int]]:
        """``(account_id, newest_us, hour_cents, hour_count, day_cents, day_count)`` per account."""
        (rows,) = self.connection.execute(_WINDOWS, (json.dumps(accounts),)).fetchone()
        return sorted(tuple(row) for row in json.loads(rows))

    def forget_unreachable(self) -> int:
        """Drop events that no window of an event still taken can reach."""
        newest = self.newest_us()
        return 0 if newest is None else self.forget_before(newest - KEEP_US)

    def forget_before(self, event_us: int) -> int:
        """Drop events older than ``event_us`` (no window reaches them any more)."""
        deleted = self.connection.execute("DELETE FROM events WHERE event_us < ?", (event_us,))
        return deleted.rowcount

    def counts(self) -> dict[str, int]:
        """Events counted since the start, events still logged, messages rejected."""
        (counted,) = self.connection.execute(
            "SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM progress "
            "WHERE name = 'events_counted'"
        ).fetchone()
        (logged,) = self.connection.execute("SELECT count(*) FROM events").fetchone()
        (rejected,) = self.connection.execute("SELECT count(*) FROM rejected").fetchone()
        return {"events_counted": counted, "events_logged": logged, "rejected": rejected}

    def set_progress(self, values: dict) -> None:
        self.connection.executemany(
            "INSERT INTO progress VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            [(name, json.dumps(value)) for name, value in values.items()],
        )

    def progress(self) -> dict:
        return {
            name: json.loads(value)
            for name, value in self.connection.execute("SELECT name, value FROM progress")
        }
