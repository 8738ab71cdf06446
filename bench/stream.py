"""Streaming features through JetStream into Feast, against a bare consumer that only acks.

Two measurements, each side by side with a bare JetStream consumer (same durable pull
consumer settings, same fetch size, the same acks, no work):

- throughput: ``EVENTS`` generated transactions are published first; each consumer (its own
  durable on the same stream) drains them, alternately, ``ROUNDS`` times. ``events_per_s`` is
  events through to Feast's online store (log, windows, online write, offline Parquet, read
  back, ack) per second of draining; ``ratio_vs_bare_consumer`` divides it by the bare rate.
- freshness: a publisher in its own process sends ``FRESHNESS_EVENTS`` events at ``RATE`` per
  second while the consumer runs; freshness is published -> servable (read back through the
  online store) for Keel, published -> acknowledged for the bare consumer.

Exits non-zero when the sides disagree: every event acknowledged by both, each counted once,
and the online values equal to a batch recomputation from all events.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from bench.common import require_same_answers, write_result

NATS_URL = os.environ.get("KEEL_NATS_URL", "nats://127.0.0.1:4222")
EVENTS = int(os.environ.get("KEEL_BENCH_STREAM_EVENTS", "30000"))
FRESHNESS_EVENTS = int(os.environ.get("KEEL_BENCH_STREAM_FRESHNESS_EVENTS", "10000"))
RATE = float(os.environ.get("KEEL_BENCH_STREAM_RATE", "500"))
ACCOUNTS = 10_000
BATCH = 1_000
ROUNDS = 2
SEED = 23
FIRST_DAY = date(2026, 1, 5)
# The publisher starts once the consumer's durable subscription exists (the consumer creates it
# when ready to take events), then this long after, at most LISTENER_TIMEOUT_S after its start.
PUBLISHER_DELAY_S = 1.0
LISTENER_TIMEOUT_S = 180.0


def generated_events(count: int, first_day: date = FIRST_DAY):
    """The first ``count`` transactions of the generator's days from ``first_day`` on."""
    from keel.generator import GeneratorConfig
    from keel.streaming.events import DayEvents, day_events

    config = GeneratorConfig(accounts=ACCOUNTS, seed=SEED)
    days, total = [], 0
    while total < count:
        days.append(day_events(config, first_day + timedelta(days=len(days))))
        total += len(days[-1])
    columns = ("event_id", "account_id", "event_us", "cents")
    return DayEvents(
        day=first_day, **{c: np.concatenate([getattr(d, c) for d in days])[:count] for c in columns}
    )


async def _new_stream(name: str, subject: str) -> None:
    import nats

    from keel.streaming.events import ensure_stream

    nc = await nats.connect(NATS_URL)
    await ensure_stream(nc.jetstream(), name, subject)
    await nc.close()


async def _delete_stream(name: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    await nc.jetstream().delete_stream(name)
    await nc.close()


async def _publish(subject: str, events, rate: float | None) -> int:
    import nats

    from keel.streaming.events import publish

    nc = await nats.connect(NATS_URL)
    stored = await publish(nc.jetstream(), subject, events, rate)
    await nc.close()
    return stored


async def _wait_for_listener(stream: str, durable: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    js, deadline = nc.jetstream(), time.monotonic() + LISTENER_TIMEOUT_S
    try:
        while True:
            try:
                await js.consumer_info(stream, durable)
                return
            except Exception:  # not created yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no consumer {durable} on {stream}") from None
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


def publisher_process(subject: str, count: int, rate: float, stream: str, durable: str) -> None:
    """Entry point of the publisher's own process (the consumer must not delay its clock).

    Its events come a month after the throughput run's, so each one lands in the online store
    (newest wins), and it starts once the consumer is listening: a consumer's start-up
    (Feast's imports) is not freshness.
    """
    events = generated_events(count, FIRST_DAY + timedelta(days=30))
    asyncio.run(_wait_for_listener(stream, durable))
    time.sleep(PUBLISHER_DELAY_S)
    asyncio.run(_publish(subject, events, rate))


async def bare_consumer(stream: str, subject: str, durable: str, expected: int, idle_s: float):
    """Fetch and acknowledge, nothing else; returns (acked, busy seconds, freshness samples)."""
    import json

    import nats
    from nats.errors import TimeoutError as NatsTimeout

    from keel.streaming.consumer import StreamSettings, acknowledge_all, durable_subscription

    settings = StreamSettings(
        state_path=Path("unused"), offline_dir=Path("unused"), url=NATS_URL, stream=stream,
        subject=subject, durable=durable, batch=BATCH,
    )  # fmt: skip
    nc = await nats.connect(NATS_URL)
    sub = await durable_subscription(nc.jetstream(), settings)
    acked, batches, started = 0, [], time.perf_counter()
    busy, idle_since = 0.0, time.monotonic()
    while acked < expected and time.monotonic() - idle_since < idle_s:
        try:
            msgs = await sub.fetch(BATCH, timeout=0.5)
        except (TimeoutError, NatsTimeout):
            continue
        if not msgs:
            continue
        await acknowledge_all(nc, msgs)
        acked += len(msgs)
        busy = time.perf_counter() - started
        batches.append((time.time(), msgs))
        idle_since = time.monotonic()
    await nc.close()
    # Read the publish times only after the clock stopped: the bare side does no parsing.
    freshness = [at - json.loads(m.data)["published_at"] for at, msgs in batches for m in msgs]
    return acked, busy, freshness


def keel_settings(home: Path, stream: str, subject: str, durable: str):
    from keel.streaming.consumer import StreamSettings
    from keel.streaming.features import OFFLINE_FOLDER

    return StreamSettings(
        state_path=home / "streaming" / f"{durable}.sqlite", offline_dir=home / OFFLINE_FOLDER,
        url=NATS_URL, stream=stream, subject=subject, durable=durable, batch=BATCH,
    )  # fmt: skip


def online_values_equal(store, events) -> bool:
    from keel.streaming.features import FEATURE_VIEW, FEATURES, recompute

    expected = recompute(events.account_id, events.event_us, events.cents)
    refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
    rows = [{"account_id": int(a)} for a in expected["account_id"]]
    online = store.get_online_features(features=refs, entity_rows=rows).to_dict()
    return all(np.array_equal(np.array(online[n]), expected[n].to_numpy()) for n in FEATURES)


def percentiles(samples) -> tuple[float, float]:
    values = np.asarray(list(samples), dtype=np.float64)
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="keel-bench-stream-"))
    os.environ["KEEL_HOME"] = str(scratch)
    streams: list[str] = []
    try:
        from keel.features import open_store
        from keel.streaming.consumer import consume, register_stream_features

        events = generated_events(EVENTS)
        suffix = uuid.uuid4().hex[:8]
        stream, subject = f"KEEL_BENCH_{suffix}", f"keel.bench.{suffix}"
        streams.append(stream)
        asyncio.run(_new_stream(stream, subject))
        assert asyncio.run(_publish(subject, events, None)) == EVENTS

        rounds, checks = [], {}
        for round_ in range(ROUNDS):
            acked, bare_s, _ = asyncio.run(
                bare_consumer(stream, subject, f"bare{round_}", EVENTS, idle_s=5)
            )
            # Each round its own log and stores, so each one writes every value anew.
            home = scratch / f"round{round_}"
            store = open_store(variables={"KEEL_HOME": str(home)})
            register_stream_features(store)
            settings = keel_settings(home, stream, subject, f"keel{round_}")
            stats = asyncio.run(consume(settings, store, idle_exit_s=2))
            rounds.append(
                {
                    "bare_events_per_s": acked / bare_s,
                    "events_per_s": stats.new_events / stats.busy_s,
                    "batches": stats.batches,
                }
            )
            checks[f"round {round_}: bare acked every event"] = acked == EVENTS
            checks[f"round {round_}: keel counted every event once"] = (
                stats.new_events == EVENTS and stats.duplicates == 0 and stats.rejected == 0
            )
            checks[f"round {round_}: read back equals written"] = stats.readback_mismatches == 0
        checks["online values equal the batch recomputation"] = online_values_equal(store, events)

        # Freshness: the publisher in its own process at a fixed rate, one consumer at a time.
        fresh = {}
        for side in ("bare", "keel"):
            suffix = uuid.uuid4().hex[:8]
            stream, subject = f"KEEL_FRESH_{suffix}", f"keel.fresh.{suffix}"
            streams.append(stream)
            asyncio.run(_new_stream(stream, subject))
            publisher = subprocess.Popen(
                [
                    sys.executable, "-c",
                    "import sys; from bench.stream import publisher_process; "
                    "publisher_process(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), "
                    "sys.argv[4], sys.argv[5])",
                    subject, str(FRESHNESS_EVENTS), str(RATE), stream, side,
                ],
                cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            if side == "bare":
                acked, _, samples = asyncio.run(
                    bare_consumer(stream, subject, "bare", FRESHNESS_EVENTS, idle_s=60)
                )
                checks["freshness run: bare acked every event"] = acked == FRESHNESS_EVENTS
                fresh["bare"] = percentiles(samples)
            else:
                home = scratch / "fresh"
                store = open_store(variables={"KEEL_HOME": str(home)})
                register_stream_features(store)
                settings = keel_settings(home, stream, subject, "keel")
                stats = asyncio.run(
                    consume(settings, store, idle_exit_s=60, max_events=FRESHNESS_EVENTS)
                )
                checks["freshness run: keel counted every event once"] = (
                    stats.new_events == FRESHNESS_EVENTS and stats.readback_mismatches == 0
                )
                fresh["keel"] = (
                    stats.freshness()["freshness_p50_s"],
                    stats.freshness()["freshness_p99_s"],
                )
            checks[f"freshness run: {side} publisher finished"] = publisher.wait() == 0

        keel_rate = float(np.mean([r["events_per_s"] for r in rounds]))
        bare_rate = float(np.mean([r["bare_events_per_s"] for r in rounds]))
        figures = {
            "events_per_s": keel_rate,
            "bare_events_per_s": bare_rate,
            "ratio_vs_bare_consumer": keel_rate / bare_rate,
            "freshness_p50_s": fresh["keel"][0],
            "freshness_p99_s": fresh["keel"][1],
            "bare_freshness_p50_s": fresh["bare"][0],
            "bare_freshness_p99_s": fresh["bare"][1],
            "goals": {
                "ratio_vs_bare_consumer_at_least_0_5": keel_rate / bare_rate >= 0.5,
                "freshness_p99_under_1_s": fresh["keel"][1] < 1.0,
            },
            "rounds": rounds,
            "checks": checks,
            "params": {
                "events": EVENTS,
                "accounts": ACCOUNTS,
                "generator_seed": SEED,
                "fetch_batch": BATCH,
                "rounds": ROUNDS,
                "freshness_events": FRESHNESS_EVENTS,
                "freshness_publish_rate_per_s": RATE,
                "online_store": store.config.online_store.type,
                "nats": NATS_URL,
                "cpus": os.cpu_count(),
                "load_average_1m": os.getloadavg()[0],
            },
        }
        write_result("stream", figures)
        require_same_answers("stream", checks)
    finally:
        for name in streams:
            try:
                asyncio.run(_delete_stream(name))
            except Exception as error:  # cleanup must not hide the result
                print(f"could not delete stream {name}: {error}", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
