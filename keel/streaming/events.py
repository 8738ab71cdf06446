"""Account events: the generator's days as timestamped transactions, encoded and published.

The generator gives one activity row per account per day (transaction count and spend). A
day's stream splits each row into its transactions, at seeded random instants of the day and
with the day's spend shared between them, so the same seed gives the same events in the same
order. Each event's id (day and position) rides as JetStream's ``Nats-Msg-Id``, so publishing
a day again within the stream's duplicate window (a day on the streams made here) stores
nothing twice; later, the consumer's log still knows the ids of the last three days, and sets
aside events over two days behind its newest, so none is counted twice either way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING

import numpy as np

from keel.streaming.features import DAY_US

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from keel.generator import GeneratorConfig

# A random stream of the generator's seed that its own streams (0-6) never use.
_EVENT_TIMES = 101
REQUIRED = ("id", "account_id", "event_us", "cents")
# How long JetStream remembers a message id: a day's events published again within it are not
# stored again (JetStream's default is two minutes).
DUPLICATE_WINDOW_S = 24 * 3_600.0


class EventError(ValueError):
    """An event message that cannot be read; the message says what is wrong with it."""


@dataclass(frozen=True)
class DayEvents:
    """A day's transactions in time order, as columns."""

    day: date
    event_id: np.ndarray  # str: "<day>:<position>"
    account_id: np.ndarray  # int64
    event_us: np.ndarray  # int64 microseconds since 1970, UTC
    cents: np.ndarray  # int64 spend in cents

    def __len__(self) -> int:
        return len(self.event_id)


def day_events(config: GeneratorConfig, day: date) -> DayEvents:
    """Every transaction of ``day`` from the generator's activity, in time order."""
    from keel.generator import activity_table, build_accounts

    activity = activity_table(config, day, build_accounts(config))
    if "spend_amount" not in activity.column_names or activity["account_id"].null_count:
        raise EventError(
            f"the generator's activity for {day} has drifted from its schema (spend_amount, "
            "non-null account_id); streaming needs clean days"
        )
    counts = np.nan_to_num(activity["n_transactions"].to_numpy(zero_copy_only=False)).astype(
        np.int64
    )
    counts = np.clip(counts, 0, None)
    spend = np.nan_to_num(activity["spend_amount"].to_numpy(zero_copy_only=False))
    accounts = activity["account_id"].to_numpy(zero_copy_only=False).astype(np.int64)
    rng = np.random.default_rng([config.seed, _EVENT_TIMES, config.day_index(day)])
    owner = np.repeat(np.arange(len(counts)), counts)
    # Each row's spend shared by its transactions: exponential draws normalised per row.
    weights = rng.exponential(1.0, len(owner))
    totals = np.bincount(owner, weights=weights, minlength=len(counts))
    cents = np.round(spend[owner] * 100 * weights / totals[owner]).astype(np.int64)
    start_us = (np.datetime64(day, "us") - np.datetime64(0, "us")).astype(np.int64)
    event_us = start_us + rng.integers(0, DAY_US, len(owner))
    order = np.argsort(event_us, kind="stable")
    ids = np.array([f"{day.isoformat()}:{i}" for i in range(len(order))], dtype=object)
    return DayEvents(
        day=day,
        event_id=ids,
        account_id=accounts[owner][order],
        event_us=event_us[order],
        cents=cents[order],
    )


def encode(event_id: str, account_id: int, event_us: int, cents: int) -> bytes:
    """One event as the JSON message body; ``published_at`` (seconds) measures freshness."""
    return json.dumps(
        {
            "id": event_id,
            "account_id": int(account_id),
            "event_us": int(event_us),
            "cents": int(cents),
            "published_at": time.time(),
        },
        separators=(",", ":"),
    ).encode()


def decode(body: bytes) -> dict:
    """An event message's fields, checked; raises ``EventError`` with the reason otherwise."""
    try:
        event = json.loads(body.decode())  # text: json.loads would detect the encoding first
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EventError(f"not JSON: {error}") from None
    if not isinstance(event, dict):
        raise EventError(f"not a JSON object: {type(event).__name__}")
    missing = [name for name in REQUIRED if name not in event]
    if missing:
        raise EventError(f"missing field(s) {', '.join(missing)}")
    if not isinstance(event["id"], str) or not event["id"]:
        raise EventError(f"id must be a non-empty string, got {event['id']!r}")
    for name in ("account_id", "event_us", "cents"):
        value = event[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise EventError(f"{name} must be an integer, got {value!r}")
    if event["cents"] < 0:
        raise EventError(f"cents must not be negative, got {event['cents']}")
    published = event.get("published_at")
    if published is not None and not isinstance(published, int | float):
        raise EventError(f"published_at must be a number of seconds, got {published!r}")
    return event


async def ensure_stream(js: JetStreamContext, stream: str, subject: str) -> None:
    """Create the stream that holds ``subject`` unless it exists; file storage survives restarts.

    A stream that remembers message ids for less than ``DUPLICATE_WINDOW_S`` gets that window.
    """
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[subject],
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_S,
            )
        )
        return
    window = info.config.duplicate_window or 0
    max_age = info.config.max_age or 0
    if window < DUPLICATE_WINDOW_S and (not max_age or max_age >= DUPLICATE_WINDOW_S):
        await js.update_stream(replace(info.config, duplicate_window=DUPLICATE_WINDOW_S))


async def publish(
    js: JetStreamContext, subject: str, events: DayEvents, rate: float | None = None
) -> int:
    """Publish ``events`` to ``subject`` (``rate`` per second, or as fast as acks come back).

    Returns how many JetStream stored (duplicates within its window are not stored again).
    """
    stored = 0
    window: list = []
    started = time.perf_counter()
    for i in range(len(events)):
        if rate:
            wait = started + i / rate - time.perf_counter()
            if wait > 0:
                import asyncio

                await asyncio.sleep(wait)
        event_id = events.event_id[i]
        body = encode(event_id, events.account_id[i], events.event_us[i], events.cents[i])
        window.append(await js.publish_async(subject, body, headers={"Nats-Msg-Id": event_id}))
        if len(window) >= 500:
            stored += await _settle(window)
    return stored + await _settle(window)


async def _settle(window: list) -> int:
    """Wait for the publish acks in ``window``; count the ones that stored a new message."""
    stored = 0
    for future in window:
        ack = await future
        stored += not ack.duplicate
    window.clear()
    return stored


async def publish_days(
    url: str,
    stream: str,
    subject: str,
    config: GeneratorConfig,
    days: list[date],
    rate: float | None = None,
) -> dict[str, dict[str, int]]:
    """Publish the generator's transactions of each day, days in the order given.

    Returns per day (ISO) the events generated and how many JetStream stored; the rest it
    recognised by their ids as published before.
    """
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream, subject)
        counts = {}
        for day in days:
            events = day_events(config, day)
            counts[day.isoformat()] = {
                "events": len(events),
                "stored": await publish(js, subject, events, rate),
            }
        return counts
    finally:
        await nc.close()
